//! The fleet's metrics. Origins are LAPI's few decision sources (`cscli`, `crowdsec`, `CAPI`,
//! `lists`); no address ever becomes a label.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct FleetMetrics {
    received: Family<Labels, Counter>,
    applied: Family<Labels, Counter>,
    expired: Family<Labels, Counter>,
    skipped: Family<Labels, Counter>,
    pushes: Family<Labels, Counter>,
    logins: Family<Labels, Counter>,
    heartbeats: Family<Labels, Counter>,
    push_dropped: Family<Labels, Counter>,
    pub push_queue: Gauge,
    pull_errors: Family<Labels, Counter>,
    pub reachable: Gauge,
    pub last_sync: Gauge,
}

impl FleetMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            received: Family::default(),
            applied: Family::default(),
            expired: Family::default(),
            skipped: Family::default(),
            pushes: Family::default(),
            logins: Family::default(),
            heartbeats: Family::default(),
            push_dropped: Family::default(),
            push_queue: Gauge::default(),
            pull_errors: Family::default(),
            reachable: Gauge::default(),
            last_sync: Gauge::default(),
        };
        let families = [
            (
                "sentinel_crowdsec_decisions_received",
                "Decisions received from CrowdSec's Local API, by origin",
                &metrics.received,
            ),
            (
                "sentinel_crowdsec_decisions_applied",
                "Decisions from the fleet committed to nftables, by origin",
                &metrics.applied,
            ),
            (
                "sentinel_crowdsec_decisions_expired",
                "Fleet decisions that ended (deleted in LAPI, or run out), by origin",
                &metrics.expired,
            ),
            (
                "sentinel_crowdsec_decisions_skipped",
                "Fleet decisions not enforced here, by reason: allowlisted, active_session, \
                 unsupported (not a ban of an address or range), lifted_here (sentinel unban)",
                &metrics.skipped,
            ),
            (
                "sentinel_crowdsec_pushes",
                "Alerts for local bans sent to LAPI (ok), and attempts that failed (failed)",
                &metrics.pushes,
            ),
            (
                "sentinel_crowdsec_logins",
                "Watcher logins to LAPI (at start, and when LAPI refuses the token): ok, failed",
                &metrics.logins,
            ),
            (
                "sentinel_crowdsec_heartbeats",
                "Watcher heartbeats sent to LAPI (one a minute): ok, failed",
                &metrics.heartbeats,
            ),
            (
                "sentinel_crowdsec_push_dropped",
                "Local bans never pushed: queue_full (the oldest made room), ended (the ban \
                 ended while LAPI was away)",
                &metrics.push_dropped,
            ),
            (
                "sentinel_crowdsec_pull_errors",
                "Failed decision pulls, by kind: unreachable, certificate (not signed by a CA \
                 trusted here), http, malformed",
                &metrics.pull_errors,
            ),
        ];
        for (name, help, family) in families {
            registry.register(name, help, family.clone());
        }
        registry.register(
            "sentinel_crowdsec_push_queue",
            "Local bans waiting to be pushed to LAPI",
            metrics.push_queue.clone(),
        );
        registry.register(
            "sentinel_crowdsec_lapi_reachable",
            "1 when the last request to CrowdSec's Local API was answered, 0 when it failed",
            metrics.reachable.clone(),
        );
        registry.register(
            "sentinel_crowdsec_last_sync_timestamp_seconds",
            "When the decisions were last pulled successfully (Unix time; 0 before the first)",
            metrics.last_sync.clone(),
        );
        // Exposed at 0 from the start: a series that must exist is never merely absent.
        for result in ["ok", "failed"] {
            for family in [&metrics.pushes, &metrics.logins, &metrics.heartbeats] {
                drop(family.get_or_create(&label("result", result)));
            }
        }
        for kind in ["unreachable", "certificate", "http", "malformed"] {
            drop(metrics.pull_errors.get_or_create(&label("kind", kind)));
        }
        metrics
    }

    pub fn received(&self, origin: &str) -> Counter {
        self.received
            .get_or_create(&label("origin", origin))
            .clone()
    }

    pub fn applied(&self, origin: &str) -> Counter {
        self.applied.get_or_create(&label("origin", origin)).clone()
    }

    pub fn expired(&self, origin: &str) -> Counter {
        self.expired.get_or_create(&label("origin", origin)).clone()
    }

    pub fn skipped(&self, reason: &str) -> Counter {
        self.skipped.get_or_create(&label("reason", reason)).clone()
    }

    pub fn pushes(&self, result: &str) -> Counter {
        self.pushes.get_or_create(&label("result", result)).clone()
    }

    pub fn logins(&self, result: &str) -> Counter {
        self.logins.get_or_create(&label("result", result)).clone()
    }

    pub fn heartbeats(&self, result: &str) -> Counter {
        self.heartbeats
            .get_or_create(&label("result", result))
            .clone()
    }

    pub fn push_dropped(&self, reason: &str) -> Counter {
        self.push_dropped
            .get_or_create(&label("reason", reason))
            .clone()
    }

    pub fn pull_errors(&self, kind: &str) -> Counter {
        self.pull_errors.get_or_create(&label("kind", kind)).clone()
    }
}

fn label(name: &'static str, value: &str) -> Labels {
    vec![(name, value.to_owned())]
}
