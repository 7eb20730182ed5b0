//! The messages on the control socket, one JSON object per line.

use serde::{Deserialize, Serialize};

use super::report::{ReloadReport, StatsReport, StatusReport};
use crate::{
    firewall::IpNet,
    ssh_guard::{BanInfo, Unbanned},
};

/// Longer request lines are refused: no request comes near it.
pub(super) const MAX_REQUEST_BYTES: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    // Braces, so that unknown fields are refused as for the other commands.
    Bans {},
    /// `address` is an address (an IPv6 one is widened to the offender prefix) or a network.
    Ban {
        address: IpNet,
        for_seconds: u64,
    },
    /// `address` is what a ban in force was made on (a fleet ban of one IPv6 address is
    /// lifted as it is), or else it is widened like a ban of it.
    Unban {
        address: IpNet,
    },
    Status {},
    Stats {},
    Reload {},
    /// Thaw or lift the isolation of a service its containment policy holds.
    Release {
        service: String,
    },
}

/// The daemon's answer. On the wire an `ok` flag says which kind it is, which serde's tagged
/// enums cannot express with a boolean, so it goes through [`WireResponse`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "WireResponse", try_from = "WireResponse")]
pub enum Response {
    Bans(Vec<BanInfo>),
    /// The network a ban or unban applied to (see `Request::Ban` and `Request::Unban`).
    Changed(IpNet),
    /// An unban of a ban from the fleet, lifted on this host only for as long as it had left.
    FleetOverride(Unbanned),
    Status(Box<StatusReport>),
    Stats(Box<StatsReport>),
    Reloaded(ReloadReport),
    /// What a release undid.
    Released(String),
    Error(String),
}

/// `ok` and exactly one of the other fields.
#[derive(Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct WireResponse {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    bans: Option<Vec<BanInfo>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<String>,
    /// Only beside `address`, after the unban of a fleet ban.
    #[serde(skip_serializing_if = "Option::is_none")]
    fleet_override_seconds: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<Box<StatusReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    stats: Option<Box<StatsReport>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reload: Option<ReloadReport>,
    #[serde(skip_serializing_if = "Option::is_none")]
    released: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl From<Response> for WireResponse {
    fn from(response: Response) -> Self {
        let ok = Self {
            ok: true,
            ..Self::default()
        };
        match response {
            Response::Bans(bans) => Self {
                bans: Some(bans),
                ..ok
            },
            Response::Changed(net) => Self {
                address: Some(net.to_string()),
                ..ok
            },
            Response::FleetOverride(unbanned) => Self {
                address: Some(unbanned.net.to_string()),
                fleet_override_seconds: unbanned.fleet_override.map(|left| left.as_secs()),
                ..ok
            },
            Response::Status(status) => Self {
                status: Some(status),
                ..ok
            },
            Response::Stats(stats) => Self {
                stats: Some(stats),
                ..ok
            },
            Response::Reloaded(reload) => Self {
                reload: Some(reload),
                ..ok
            },
            Response::Released(released) => Self {
                released: Some(released),
                ..ok
            },
            Response::Error(error) => Self {
                error: Some(error),
                ..Self::default()
            },
        }
    }
}

impl TryFrom<WireResponse> for Response {
    type Error = String;

    fn try_from(wire: WireResponse) -> Result<Self, String> {
        const EXPECTED: &str = "expected `ok` with one of `bans`, `address`, `status`, `stats`, `reload`, \
             `released`, or `ok: false` with `error`";
        let WireResponse {
            ok,
            bans,
            address,
            fleet_override_seconds,
            status,
            stats,
            reload,
            released,
            error,
        } = wire;
        let payloads = [
            bans.is_some(),
            address.is_some(),
            status.is_some(),
            stats.is_some(),
            reload.is_some(),
            released.is_some(),
            error.is_some(),
        ];
        if payloads.iter().filter(|present| **present).count() != 1
            || ok == error.is_some()
            || (fleet_override_seconds.is_some() && address.is_none())
        {
            return Err(EXPECTED.into());
        }
        if let Some(address) = address {
            let net = address
                .parse()
                .map_err(|_| format!("{address:?} is not an IP address or network"))?;
            return Ok(match fleet_override_seconds {
                Some(seconds) => Self::FleetOverride(Unbanned {
                    net,
                    fleet_override: Some(std::time::Duration::from_secs(seconds)),
                }),
                None => Self::Changed(net),
            });
        }
        Ok(bans
            .map(Self::Bans)
            .or(status.map(Self::Status))
            .or(stats.map(Self::Stats))
            .or(reload.map(Self::Reloaded))
            .or(released.map(Self::Released))
            .or(error.map(Self::Error))
            .expect("exactly one payload is present"))
    }
}

/// `message` as one JSON line.
pub(super) fn to_line(message: &impl Serialize) -> Vec<u8> {
    let mut line = serde_json::to_vec(message).expect("requests and responses always serialize");
    line.push(b'\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn json(message: &impl Serialize) -> String {
        String::from_utf8(to_line(message)).unwrap()
    }

    #[test]
    fn requests_are_tagged_by_command() {
        let address: IpNet = "1.2.3.4".parse().unwrap();
        assert_eq!(json(&Request::Bans {}), "{\"command\":\"bans\"}\n");
        assert_eq!(
            json(&Request::Ban {
                address,
                for_seconds: 3600
            }),
            "{\"command\":\"ban\",\"address\":\"1.2.3.4\",\"for_seconds\":3600}\n"
        );
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"command":"unban","address":"1.2.3.4"}"#).unwrap(),
            Request::Unban { address }
        );
        assert_eq!(
            serde_json::from_str::<Request>(
                r#"{"command":"ban","address":"203.0.113.9/24","for_seconds":60}"#
            )
            .unwrap(),
            Request::Ban {
                address: "203.0.113.0/24".parse().unwrap(),
                for_seconds: 60
            }
        );
        assert_eq!(json(&Request::Reload {}), "{\"command\":\"reload\"}\n");
        for bad in [
            r#"{"command":"reboot"}"#,
            r#"{"command":"unban","address":"1.2.3"}"#,
            r#"{"command":"unban","address":"1.2.3.4/33"}"#,
            r#"{"command":"status","verbose":true}"#,
            r#"{"command":"ban","address":"1.2.3.4","for":"1h"}"#,
            r#"{"command":"ban","address":"1.2.3.4","for_seconds":-1}"#,
        ] {
            assert!(serde_json::from_str::<Request>(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn responses_carry_an_ok_flag() {
        let ban = BanInfo {
            address: "1.2.3.4".into(),
            reason: "operator".into(),
            failures: 0,
            expires_in_seconds: 60,
        };
        let cases = [
            (
                Response::Bans(vec![ban]),
                r#"{"ok":true,"bans":[{"address":"1.2.3.4","reason":"operator","failures":0,"expires_in_seconds":60}]}"#,
            ),
            (
                Response::Changed("2001:db8::/64".parse().unwrap()),
                r#"{"ok":true,"address":"2001:db8::/64"}"#,
            ),
            (
                Response::FleetOverride(Unbanned {
                    net: "198.51.100.0/28".parse().unwrap(),
                    fleet_override: Some(std::time::Duration::from_secs(3599)),
                }),
                r#"{"ok":true,"address":"198.51.100.0/28","fleet_override_seconds":3599}"#,
            ),
            (Response::Error("no".into()), r#"{"ok":false,"error":"no"}"#),
        ];
        for (response, text) in cases {
            assert_eq!(json(&response), format!("{text}\n"));
            assert_eq!(serde_json::from_str::<Response>(text).unwrap(), response);
        }
    }

    #[test]
    fn inconsistent_responses_are_rejected() {
        for bad in [
            r#"{"ok":true}"#,
            r#"{"ok":false}"#,
            r#"{"ok":true,"error":"no"}"#,
            r#"{"ok":false,"address":"1.2.3.4"}"#,
            r#"{"ok":true,"address":"1.2.3.4","bans":[]}"#,
            r#"{"ok":true,"address":"banned"}"#,
            r#"{"ok":true,"bans":[],"fleet_override_seconds":60}"#,
            r#"{"ok":true,"bans":[],"reboot":true}"#,
        ] {
            assert!(serde_json::from_str::<Response>(bad).is_err(), "{bad}");
        }
    }
}
