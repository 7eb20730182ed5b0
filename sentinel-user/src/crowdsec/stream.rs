//! The bouncer's decisions: a LAPI `/v1/decisions/stream` answer, checked whole before any of
//! it is applied, and the decisions known so far, which say what to ban and what to lift. Pure
//! logic: time comes in as an argument.
//!
//! LAPI 1.4.6 writes empty lists as `null`, repeats a deletion on the polls of the next seconds,
//! and lists decisions that expired long ago under `deleted` on a full sync; none of that may
//! lift a ban twice or lift one that another decision still holds.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use serde::Deserialize;

use super::{FleetBan, FleetUpdate, fleet_reason};
use crate::firewall::{IpNet, MAX_BAN_TIMEOUT};

/// One decision as LAPI lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
struct Decision {
    id: i64,
    origin: String,
    scenario: String,
    scope: String,
    value: String,
    #[serde(rename = "type")]
    kind: String,
    /// Time left, as Go prints a duration (`3h59m58.2s`, `-1.2s`).
    duration: String,
}

#[derive(Debug, Deserialize)]
struct StreamAnswer {
    new: Option<Vec<Decision>>,
    deleted: Option<Vec<Decision>>,
}

/// A decision Sentinel can enforce: a ban of an address or a network.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Enforceable {
    id: i64,
    net: IpNet,
    origin: String,
    reason: String,
    remaining: Duration,
}

/// A stream answer, checked: every decision of an address or range scope parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    new: Vec<Enforceable>,
    deleted: Vec<i64>,
    /// Origins of the new decisions, one entry a decision, enforceable or not.
    pub received: Vec<String>,
    /// New decisions of another kind (captcha) or scope (country, AS, user name): not for a
    /// firewall.
    pub unsupported: usize,
}

/// Reads a stream answer. Anything malformed (not JSON, a missing field, an address that is
/// not one, a duration that is not one) refuses the whole answer: nothing is banned from it.
pub fn check(body: &[u8]) -> Result<Checked, String> {
    let answer: StreamAnswer =
        serde_json::from_slice(body).map_err(|error| format!("not a decision stream: {error}"))?;
    let mut checked = Checked {
        new: Vec::new(),
        deleted: Vec::new(),
        received: Vec::new(),
        unsupported: 0,
    };
    for decision in answer.new.unwrap_or_default() {
        checked.received.push(decision.origin.clone());
        let net = target(&decision)?;
        let remaining = go_duration(&decision.duration).map_err(|reason| {
            format!(
                "decision {}: duration {:?}: {reason}",
                decision.id, decision.duration
            )
        })?;
        let Some(net) = net.filter(|_| decision.kind.eq_ignore_ascii_case("ban")) else {
            checked.unsupported += 1;
            continue;
        };
        // A decision that ends now (its duration ran out on the way) bans nothing.
        let Some(remaining) = remaining.filter(|left| !left.is_zero()) else {
            continue;
        };
        checked.new.push(Enforceable {
            id: decision.id,
            net,
            reason: fleet_reason(&decision.origin, &decision.scenario),
            origin: decision.origin,
            remaining: remaining.min(MAX_BAN_TIMEOUT),
        });
    }
    for decision in answer.deleted.unwrap_or_default() {
        target(&decision)?;
        checked.deleted.push(decision.id);
    }
    Ok(checked)
}

/// The network a decision bans, `None` for scopes a firewall cannot enforce.
fn target(decision: &Decision) -> Result<Option<IpNet>, String> {
    let single = decision.scope.eq_ignore_ascii_case("ip");
    if !single && !decision.scope.eq_ignore_ascii_case("range") {
        return Ok(None);
    }
    let invalid = || {
        format!(
            "decision {}: {:?} is not {}",
            decision.id,
            decision.value,
            if single { "an IP address" } else { "a network" }
        )
    };
    if single && decision.value.contains('/') {
        return Err(invalid());
    }
    decision.value.parse().map(Some).map_err(|_| invalid())
}

/// A Go duration (`1h2m3.5s`, `250ms`, `-1.2s`, `0s`): `None` when it is negative. Counted in
/// whole nanoseconds, as Go does, so no rounding creeps in.
pub fn go_duration(text: &str) -> Result<Option<Duration>, &'static str> {
    // Longest first, so that `ms` is not read as `m`.
    const UNITS: [(&str, u128); 7] = [
        ("ns", 1),
        ("us", 1_000),
        ("µs", 1_000),
        ("ms", 1_000_000),
        ("s", 1_000_000_000),
        ("m", 60_000_000_000),
        ("h", 3_600_000_000_000),
    ];
    let (negative, mut rest) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    if rest == "0" {
        return Ok(Some(Duration::ZERO));
    }
    if rest.is_empty() {
        return Err("empty");
    }
    let mut nanos: u128 = 0;
    while !rest.is_empty() {
        let number_end = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or("a number without a unit")?;
        let (whole, fraction) = rest[..number_end]
            .split_once('.')
            .unwrap_or((&rest[..number_end], ""));
        let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
        if (whole.is_empty() && fraction.is_empty())
            || !digits(whole)
            || !digits(fraction)
            || whole.len() > 20
            || fraction.len() > 18
        {
            return Err("not a number");
        }
        rest = &rest[number_end..];
        let &(unit, scale) = UNITS
            .iter()
            .filter(|(unit, _)| rest.starts_with(unit))
            .max_by_key(|(unit, _)| unit.len())
            .ok_or("an unknown unit")?;
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().map_err(|_| "not a number")?
        };
        let fraction_value: u128 = if fraction.is_empty() {
            0
        } else {
            fraction.parse().map_err(|_| "not a number")?
        };
        let fraction_nanos = fraction_value * scale / 10u128.pow(fraction.len() as u32);
        nanos = whole
            .checked_mul(scale)
            .and_then(|value| value.checked_add(fraction_nanos))
            .and_then(|value| value.checked_add(nanos))
            .ok_or("too long")?;
        rest = &rest[unit.len()..];
    }
    if negative {
        return Ok(None);
    }
    let seconds = u64::try_from(nanos / 1_000_000_000).map_err(|_| "too long")?;
    Ok(Some(Duration::new(seconds, (nanos % 1_000_000_000) as u32)))
}

/// The decisions applied so far, by LAPI id, with the network and when each ends: a deletion
/// lifts a network only when no other decision still bans it.
#[derive(Debug, Default)]
pub struct KnownDecisions {
    by_id: HashMap<i64, Known>,
}

#[derive(Debug, Clone)]
struct Known {
    net: IpNet,
    origin: String,
    ends: Instant,
}

/// What one answer changes, and the origins of the decisions it ended.
#[derive(Debug, PartialEq, Eq)]
pub struct Outcome {
    pub update: FleetUpdate,
    pub ended: Vec<String>,
}

impl KnownDecisions {
    /// Takes an answer at `now`. A full sync (`startup=true`) replaces everything known: its
    /// update is complete, and the guard lifts the fleet bans it does not list.
    pub fn apply(&mut self, checked: Checked, full: bool, now: Instant) -> Outcome {
        if full {
            self.by_id.clear();
        }
        let mut ended = Vec::new();
        // The kernel lifts an element when its timeout runs out; only the count is left to do.
        self.by_id.retain(|_, known| {
            let in_force = known.ends > now;
            if !in_force {
                ended.push(known.origin.clone());
            }
            in_force
        });
        let mut deleted_nets = Vec::new();
        for id in &checked.deleted {
            // Unknown ids: repeated deletions, or decisions that ended before this daemon saw them.
            if let Some(known) = self.by_id.remove(id) {
                ended.push(known.origin);
                deleted_nets.push(known.net);
            }
        }
        let mut bans = Vec::with_capacity(checked.new.len());
        for decision in checked.new {
            self.by_id.insert(
                decision.id,
                Known {
                    net: decision.net,
                    origin: decision.origin.clone(),
                    ends: now + decision.remaining,
                },
            );
            bans.push(FleetBan {
                net: decision.net,
                remaining: decision.remaining,
                origin: decision.origin,
                reason: decision.reason,
            });
        }
        let mut lifts: Vec<IpNet> = Vec::new();
        for net in deleted_nets {
            let still_banned = self.by_id.values().any(|known| known.net == net);
            if !still_banned && !lifts.contains(&net) {
                lifts.push(net);
            }
        }
        Outcome {
            update: FleetUpdate {
                complete: full,
                bans,
                lifts,
            },
            ended,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An answer as LAPI 1.4.6 gave it after three `cscli decisions add`.
    const THREE_NEW: &str = r#"{"deleted":null,"new":[
        {"duration":"29m59.375199933s","id":3,"origin":"cscli","scenario":"manual 'ban' from 'cscli-admin'","scope":"Ip","type":"ban","value":"2001:db8::5"},
        {"duration":"59m58.375196758s","id":1,"origin":"cscli","scenario":"manual 'ban' from 'cscli-admin'","scope":"Ip","type":"ban","value":"192.0.2.77"},
        {"duration":"1h59m59.375196017s","id":2,"origin":"crowdsec","scenario":"sentinel/ssh-bf","scope":"Range","type":"ban","value":"198.51.100.0/24"}]}"#;

    fn decision(id: i64, value: &str, duration: &str) -> String {
        format!(
            r#"{{"duration":"{duration}","id":{id},"origin":"cscli","scenario":"s","scope":"Ip","type":"ban","value":"{value}"}}"#
        )
    }

    fn answer(new: &[String], deleted: &[String]) -> Vec<u8> {
        let list = |items: &[String]| {
            if items.is_empty() {
                "null".to_string()
            } else {
                format!("[{}]", items.join(","))
            }
        };
        format!(r#"{{"new":{},"deleted":{}}}"#, list(new), list(deleted)).into_bytes()
    }

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn a_stream_answer_becomes_bans_of_addresses_and_ranges_with_their_time_left() {
        let now = Instant::now();
        let checked = check(THREE_NEW.as_bytes()).unwrap();
        assert_eq!(checked.received, ["cscli", "cscli", "crowdsec"]);
        let outcome = KnownDecisions::default().apply(checked, true, now);
        let bans: Vec<(String, u64, &str, &str)> = outcome
            .update
            .bans
            .iter()
            .map(|ban| {
                (
                    ban.net.to_string(),
                    ban.remaining.as_secs(),
                    ban.origin.as_str(),
                    ban.reason.as_str(),
                )
            })
            .collect();
        assert_eq!(
            bans,
            [
                ("2001:db8::5".into(), 1799, "cscli", "crowdsec:cscli"),
                ("192.0.2.77".into(), 3598, "cscli", "crowdsec:cscli"),
                (
                    "198.51.100.0/24".into(),
                    7199,
                    "crowdsec",
                    "crowdsec:sentinel/ssh-bf"
                ),
            ]
        );
        assert!(outcome.update.complete);
        assert!(outcome.update.lifts.is_empty());
    }

    #[test]
    fn null_lists_change_nothing() {
        let checked = check(br#"{"deleted":null,"new":null}"#).unwrap();
        let outcome = KnownDecisions::default().apply(checked, false, Instant::now());
        assert_eq!(
            outcome.update,
            FleetUpdate {
                complete: false,
                bans: vec![],
                lifts: vec![]
            }
        );
    }

    #[test]
    fn a_malformed_answer_is_refused_whole() {
        let good = decision(1, "192.0.2.1", "1h");
        let cases: [(Vec<u8>, &str); 7] = [
            (
                b"<html>502 Bad Gateway</html>".to_vec(),
                "not a decision stream",
            ),
            (b"{\"new\":[{\"id\":1}]}".to_vec(), "missing field"),
            (
                answer(&[good.clone(), decision(2, "192.0.2.300", "1h")], &[]),
                "\"192.0.2.300\" is not an IP address",
            ),
            (
                answer(&[good.clone(), decision(2, "192.0.2.0/24", "1h")], &[]),
                "\"192.0.2.0/24\" is not an IP address",
            ),
            (
                answer(&[good.clone(), decision(2, "192.0.2.2", "soon")], &[]),
                "duration \"soon\"",
            ),
            (
                answer(&[good.clone(), decision(2, "192.0.2.2", "5")], &[]),
                "a number without a unit",
            ),
            (
                answer(
                    std::slice::from_ref(&good),
                    &[decision(2, "not-an-ip", "-1s")],
                ),
                "\"not-an-ip\" is not an IP address",
            ),
        ];
        for (body, expected) in cases {
            let error = check(&body).unwrap_err();
            assert!(error.contains(expected), "{error} should name {expected:?}");
        }
    }

    #[test]
    fn decisions_a_firewall_cannot_enforce_are_received_not_applied() {
        let body = br#"{"deleted":null,"new":[
            {"duration":"1h","id":1,"origin":"cscli","scenario":"s","scope":"Country","type":"ban","value":"XX"},
            {"duration":"1h","id":2,"origin":"cscli","scenario":"s","scope":"Ip","type":"captcha","value":"192.0.2.2"},
            {"duration":"-3s","id":3,"origin":"cscli","scenario":"s","scope":"Ip","type":"ban","value":"192.0.2.3"}]}"#;
        let checked = check(body).unwrap();
        assert_eq!(checked.received.len(), 3);
        assert_eq!(checked.unsupported, 2);
        let outcome = KnownDecisions::default().apply(checked, false, Instant::now());
        assert!(outcome.update.bans.is_empty(), "{:?}", outcome.update);
    }

    #[test]
    fn go_durations() {
        let ok = |text, millis| {
            assert_eq!(
                go_duration(text),
                Ok(Some(Duration::from_millis(millis))),
                "{text}"
            )
        };
        ok("0s", 0);
        ok("0", 0);
        ok("250ms", 250);
        ok("1.5s", 1500);
        ok("4h0m0s", 14_400_000);
        ok("3h59m58.2s", 14_398_200);
        ok("1m30s", 90_000);
        ok("2000µs", 2);
        assert_eq!(
            go_duration("29m59.375199933s"),
            Ok(Some(Duration::new(1799, 375_199_933)))
        );
        assert_eq!(go_duration("-212.786834ms"), Ok(None));
        for bad in ["", "-", "h", "5", "5x", "1.2.3s", "abc"] {
            assert!(go_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_repeated_deletion_lifts_once_and_a_network_another_decision_holds_stays() {
        let start = Instant::now();
        let mut known = KnownDecisions::default();
        let first = answer(
            &[
                decision(1, "192.0.2.1", "1h"),
                decision(2, "192.0.2.2", "1h"),
                decision(3, "192.0.2.2", "2h"),
            ],
            &[],
        );
        known.apply(check(&first).unwrap(), true, start);
        // LAPI lists each deletion again on the polls of the next seconds.
        let deleted = answer(
            &[],
            &[
                decision(1, "192.0.2.1", "-1s"),
                decision(2, "192.0.2.2", "-1s"),
            ],
        );
        let outcome = known.apply(
            check(&deleted).unwrap(),
            false,
            start + Duration::from_secs(1),
        );
        assert_eq!(
            outcome.update.lifts,
            [net("192.0.2.1")],
            "decision 3 still bans 192.0.2.2"
        );
        assert_eq!(outcome.ended, ["cscli", "cscli"]);
        let again = known.apply(
            check(&deleted).unwrap(),
            false,
            start + Duration::from_secs(2),
        );
        assert!(again.update.lifts.is_empty());
        assert!(again.ended.is_empty());
    }

    #[test]
    fn decisions_that_run_out_are_counted_once_and_a_full_sync_starts_over() {
        let start = Instant::now();
        let mut known = KnownDecisions::default();
        let first = answer(
            &[
                decision(1, "192.0.2.1", "10s"),
                decision(2, "192.0.2.2", "1h"),
            ],
            &[],
        );
        known.apply(check(&first).unwrap(), true, start);
        let nothing = answer(&[], &[]);
        let later = known.apply(
            check(&nothing).unwrap(),
            false,
            start + Duration::from_secs(11),
        );
        // The kernel lifted the element itself; nothing to lift, one to count.
        assert!(later.update.lifts.is_empty());
        assert_eq!(later.ended, ["cscli"]);
        // A full sync with expired decisions under `deleted` (as LAPI lists them at startup).
        let resync = answer(
            &[decision(2, "192.0.2.2", "59m")],
            &[decision(1, "192.0.2.1", "-20s")],
        );
        let full = known.apply(
            check(&resync).unwrap(),
            true,
            start + Duration::from_secs(12),
        );
        assert!(full.update.complete);
        assert!(full.update.lifts.is_empty());
        assert!(full.ended.is_empty());
        assert_eq!(full.update.bans.len(), 1);
    }
}
