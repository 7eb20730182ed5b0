//! The watcher's queue: the local bans waiting to reach LAPI as alerts, bounded, retried with a
//! growing delay while LAPI is away. Pure logic: time comes in as arguments.

use std::{
    collections::VecDeque,
    time::{Duration, Instant, SystemTime},
};

use serde::Serialize;

use super::LocalBan;
use crate::ssh_guard::audit::rfc3339;

/// The scenario Sentinel's alerts carry, as `sentinel bans` shows them on the other hosts.
pub const SCENARIO: &str = "sentinel/ssh-bf";
/// The scenario of port-scan bans.
pub const PORT_SCAN_SCENARIO: &str = "sentinel/port-scan";

/// The scenario of a local ban made for `reason`.
fn scenario(reason: &str) -> &'static str {
    if reason == crate::port_scan::PORT_SCAN_REASON {
        PORT_SCAN_SCENARIO
    } else {
        SCENARIO
    }
}

/// Alerts sent in one request.
pub const BATCH: usize = 50;

const FIRST_RETRY: Duration = Duration::from_secs(1);
const LAST_RETRY: Duration = Duration::from_secs(60);

/// A delay that doubles with each failure in a row, from one second up to a minute.
#[derive(Debug, Default)]
pub struct Backoff {
    failures: u32,
    next_try: Option<Instant>,
}

impl Backoff {
    pub fn ready(&self, now: Instant) -> bool {
        self.next_try.is_none_or(|at| at <= now)
    }

    /// When to try again, if waiting.
    pub fn next_try(&self) -> Option<Instant> {
        self.next_try
    }

    pub fn failed(&mut self, now: Instant) -> Duration {
        let delay = FIRST_RETRY
            .saturating_mul(1 << self.failures.min(6))
            .min(LAST_RETRY);
        self.failures = self.failures.saturating_add(1);
        self.next_try = Some(now + delay);
        delay
    }

    pub fn succeeded(&mut self) {
        self.failures = 0;
        self.next_try = None;
    }
}

/// Why a local ban was not pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dropped {
    /// The queue was full; the oldest waiting ban made room.
    QueueFull,
    /// The ban ended while it waited: the fleet has nothing left to enforce.
    Ended,
}

impl Dropped {
    pub fn label(self) -> &'static str {
        match self {
            Self::QueueFull => "queue_full",
            Self::Ended => "ended",
        }
    }
}

/// Local bans waiting to be pushed, oldest first.
#[derive(Debug)]
pub struct PushQueue {
    waiting: VecDeque<LocalBan>,
    capacity: usize,
    pub backoff: Backoff,
}

impl PushQueue {
    pub fn new(capacity: usize) -> Self {
        Self {
            waiting: VecDeque::new(),
            capacity: capacity.max(1),
            backoff: Backoff::default(),
        }
    }

    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// Queues `ban`; when full, the oldest waiting ban (the nearest to its end) is dropped.
    pub fn push(&mut self, ban: LocalBan) -> Option<Dropped> {
        let dropped = (self.waiting.len() >= self.capacity).then(|| {
            self.waiting.pop_front();
            Dropped::QueueFull
        });
        self.waiting.push_back(ban);
        dropped
    }

    /// The alerts to send at `wall` (the wall clock: alerts carry it), if it is time to try;
    /// bans that ended while waiting are dropped and counted in the second value.
    pub fn due(&mut self, now: Instant, wall: SystemTime) -> (Vec<Alert>, usize) {
        let before = self.waiting.len();
        self.waiting.retain(|ban| ban.until > wall);
        let ended = before - self.waiting.len();
        if !self.backoff.ready(now) {
            return (Vec::new(), ended);
        }
        let alerts = self
            .waiting
            .iter()
            .take(BATCH)
            .map(|ban| Alert::new(ban, wall))
            .collect();
        (alerts, ended)
    }

    /// LAPI took the first `sent` alerts.
    pub fn delivered(&mut self, sent: usize) {
        self.waiting.drain(..sent.min(self.waiting.len()));
        self.backoff.succeeded();
    }
}

/// A LAPI alert for one local ban, with the ban as its decision, stamped with the time it is
/// sent: LAPI computes a ban's end from `stop_at`, so an alert sent late still bans for the
/// time the local ban has left, not less.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Alert {
    scenario: &'static str,
    scenario_hash: &'static str,
    scenario_version: &'static str,
    message: String,
    events_count: u32,
    events: [(); 0],
    start_at: String,
    stop_at: String,
    capacity: u32,
    leakspeed: &'static str,
    simulated: bool,
    /// LAPI's profiles turn only alerts with `remediation` into bans.
    remediation: bool,
    source: Source,
    decisions: [AlertDecision; 1],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct Source {
    /// Exactly `Ip` or `Range`: LAPI's profiles compare it as written.
    scope: &'static str,
    value: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    ip: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    range: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
struct AlertDecision {
    duration: String,
    origin: &'static str,
    scenario: &'static str,
    scope: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    value: String,
}

impl Alert {
    fn new(ban: &LocalBan, wall: SystemTime) -> Self {
        let single = ban.net.prefix_len() == if ban.net.is_ipv4() { 32 } else { 128 };
        let scope = if single { "Ip" } else { "Range" };
        let value = ban.net.to_string();
        let now = rfc3339(wall);
        let scenario = scenario(ban.reason);
        let what = if scenario == PORT_SCAN_SCENARIO {
            "closed ports scanned"
        } else {
            "failed SSH authentications"
        };
        // Whole seconds, rounded up: the fleet's ban never ends before the local one.
        let left = ban.until.duration_since(wall).unwrap_or_default();
        let seconds = left.as_secs() + u64::from(left.subsec_nanos() > 0);
        Self {
            scenario,
            scenario_hash: "",
            scenario_version: "",
            message: format!(
                "Sentinel banned {value} after {} {what} ({})",
                ban.failures, ban.reason
            ),
            events_count: ban.failures,
            events: [],
            start_at: now.clone(),
            stop_at: now,
            capacity: 0,
            leakspeed: "0",
            simulated: false,
            remediation: true,
            source: Source {
                scope,
                value: value.clone(),
                ip: single.then(|| value.clone()),
                range: (!single).then(|| value.clone()),
            },
            decisions: [AlertDecision {
                duration: format!("{seconds}s"),
                origin: "crowdsec",
                scenario,
                scope,
                kind: "ban",
                value,
            }],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::IpNet;

    fn ban(net: &str, until: SystemTime) -> LocalBan {
        LocalBan {
            net: net.parse::<IpNet>().unwrap(),
            until,
            reason: "ssh_failures",
            failures: 5,
        }
    }

    #[test]
    fn an_alert_bans_for_the_time_the_local_ban_has_left_stamped_when_sent() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let until = sent + Duration::from_millis(599_200);
        let mut queue = PushQueue::new(10);
        queue.push(ban("203.0.113.9", until));
        let (alerts, ended) = queue.due(Instant::now(), sent);
        assert_eq!(ended, 0);
        let json = serde_json::to_value(&alerts).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{
                "scenario": "sentinel/ssh-bf",
                "scenario_hash": "",
                "scenario_version": "",
                "message": "Sentinel banned 203.0.113.9 after 5 failed SSH authentications (ssh_failures)",
                "events_count": 5,
                "events": [],
                "start_at": "2027-01-15T08:00:00.000Z",
                "stop_at": "2027-01-15T08:00:00.000Z",
                "capacity": 0,
                "leakspeed": "0",
                "simulated": false,
                "remediation": true,
                "source": {"scope": "Ip", "value": "203.0.113.9", "ip": "203.0.113.9"},
                "decisions": [{
                    "duration": "600s",
                    "origin": "crowdsec",
                    "scenario": "sentinel/ssh-bf",
                    "scope": "Ip",
                    "type": "ban",
                    "value": "203.0.113.9"
                }]
            }])
        );
    }

    #[test]
    fn a_port_scan_ban_carries_its_own_scenario() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut queue = PushQueue::new(10);
        queue.push(LocalBan {
            reason: crate::port_scan::PORT_SCAN_REASON,
            failures: 21,
            ..ban("203.0.113.9", sent + Duration::from_secs(60))
        });
        let (alerts, _) = queue.due(Instant::now(), sent);
        let json = serde_json::to_value(&alerts[0]).unwrap();
        assert_eq!(json["scenario"], "sentinel/port-scan");
        assert_eq!(json["decisions"][0]["scenario"], "sentinel/port-scan");
        assert_eq!(
            json["message"],
            "Sentinel banned 203.0.113.9 after 21 closed ports scanned (port_scan)"
        );
    }

    #[test]
    fn a_prefix_ban_is_pushed_as_a_range() {
        let sent = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut queue = PushQueue::new(10);
        queue.push(ban("2001:db8:6::/64", sent + Duration::from_secs(60)));
        let (alerts, _) = queue.due(Instant::now(), sent);
        let json = serde_json::to_value(&alerts[0]).unwrap();
        assert_eq!(
            json["source"],
            serde_json::json!({"scope": "Range", "value": "2001:db8:6::/64", "range": "2001:db8:6::/64"})
        );
        assert_eq!(json["decisions"][0]["scope"], "Range");
        assert_eq!(json["decisions"][0]["duration"], "60s");
    }

    #[test]
    fn failures_back_off_from_one_second_to_a_minute_and_delivery_resets() {
        let start = Instant::now();
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut queue = PushQueue::new(10);
        queue.push(ban("203.0.113.9", wall + Duration::from_secs(3600)));
        let mut now = start;
        let mut delays = Vec::new();
        for _ in 0..9 {
            assert_eq!(queue.due(now, wall).0.len(), 1);
            let delay = queue.backoff.failed(now);
            delays.push(delay.as_secs());
            // Not a moment before the delay is over.
            assert!(
                queue
                    .due(now + delay - Duration::from_millis(1), wall)
                    .0
                    .is_empty()
            );
            now += delay;
        }
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(queue.due(now, wall).0.len(), 1);
        queue.delivered(1);
        assert_eq!(queue.len(), 0);
        queue.push(ban("203.0.113.10", wall + Duration::from_secs(3600)));
        assert_eq!(queue.due(now, wall).0.len(), 1, "no delay after a delivery");
        assert_eq!(queue.backoff.failed(now), Duration::from_secs(1));
    }

    #[test]
    fn a_full_queue_drops_the_oldest_and_ended_bans_are_not_pushed() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut queue = PushQueue::new(2);
        assert_eq!(
            queue.push(ban("192.0.2.1", wall + Duration::from_secs(5))),
            None
        );
        assert_eq!(
            queue.push(ban("192.0.2.2", wall + Duration::from_secs(50))),
            None
        );
        assert_eq!(
            queue.push(ban("192.0.2.3", wall + Duration::from_secs(60))),
            Some(Dropped::QueueFull)
        );
        let later = wall + Duration::from_secs(55);
        let (alerts, ended) = queue.due(Instant::now(), later);
        assert_eq!(ended, 1, "192.0.2.2 ended while it waited");
        let values: Vec<_> = alerts
            .iter()
            .map(|alert| serde_json::to_value(alert).unwrap()["source"]["value"].clone())
            .collect();
        assert_eq!(values, ["192.0.2.3"]);
        queue.delivered(alerts.len());
        assert_eq!(queue.len(), 0);
    }

    #[test]
    fn alerts_go_in_batches() {
        let wall = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut queue = PushQueue::new(1000);
        for host in 0..120u32 {
            let net = IpNet::from(std::net::Ipv4Addr::from(0xc000_0200 + host));
            queue.push(LocalBan {
                net,
                until: wall + Duration::from_secs(60),
                reason: "ssh_failures",
                failures: 5,
            });
        }
        let now = Instant::now();
        let mut batches = Vec::new();
        while queue.len() > 0 {
            let (alerts, _) = queue.due(now, wall);
            batches.push(alerts.len());
            queue.delivered(alerts.len());
        }
        assert_eq!(batches, [50, 50, 20]);
    }
}
