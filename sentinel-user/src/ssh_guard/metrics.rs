//! The SSH guard's metrics. No address ever becomes a label.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone)]
pub struct SshGuardMetrics {
    pub auth_failures: Counter,
    pub preauth_ends: Counter,
    bans: Family<Labels, Counter>,
    skipped: Family<Labels, Counter>,
    banned: Family<Labels, Gauge>,
    tracked: Gauge,
    evicted: Counter,
    pub ban_latency_seconds: Histogram,
    pub restored: Counter,
    pub commit_failures: Counter,
    pub state_write_failures: Counter,
}

impl SshGuardMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            auth_failures: Counter::default(),
            preauth_ends: Counter::default(),
            bans: Family::default(),
            skipped: Family::default(),
            banned: Family::default(),
            tracked: Gauge::default(),
            evicted: Counter::default(),
            restored: Counter::default(),
            commit_failures: Counter::default(),
            state_write_failures: Counter::default(),
            // 100 us .. ~3.3 s
            ban_latency_seconds: Histogram::new(
                prometheus_client::metrics::histogram::exponential_buckets(0.0001, 2.0, 16),
            ),
        };
        registry.register(
            "sentinel_ssh_auth_failures",
            "Failed SSH authentications seen in sshd's PAM calls",
            metrics.auth_failures.clone(),
        );
        registry.register(
            "sentinel_ssh_preauth_disconnects",
            "SSH connections that named a user and ended without authenticating (refused keys, \
             unknown users), seen in sshd's PAM calls; each counts ssh_guard.preauth_weight",
            metrics.preauth_ends.clone(),
        );
        registry.register(
            "sentinel_bans",
            "Addresses banned, by reason (ssh_failures, ssh_repeat_offender, operator, port_scan)",
            metrics.bans.clone(),
        );
        registry.register(
            "sentinel_bans_skipped",
            "Bans the failure threshold called for but that were not made, by reason",
            metrics.skipped.clone(),
        );
        registry.register(
            "sentinel_banned_addresses",
            "Bans in force, by address family",
            metrics.banned.clone(),
        );
        registry.register(
            "sentinel_ssh_tracked_addresses",
            "Addresses with recent failures being tracked",
            metrics.tracked.clone(),
        );
        registry.register(
            "sentinel_ssh_tracking_evictions",
            "Addresses with recent failures forgotten because the tracking table was full",
            metrics.evicted.clone(),
        );
        registry.register(
            "sentinel_ban_latency_seconds",
            "From the failing authentication (kernel timestamp) to the ban committed in nftables",
            metrics.ban_latency_seconds.clone(),
        );
        registry.register(
            "sentinel_bans_restored",
            "Bans in force that were found missing from the kernel (ruleset flushed, table or \
             element deleted by someone else) and put back with their remaining time",
            metrics.restored.clone(),
        );
        registry.register(
            "sentinel_ban_commit_failures",
            "Bans that could not be committed to nftables, and so were not made",
            metrics.commit_failures.clone(),
        );
        registry.register(
            "sentinel_state_write_failures",
            "Failed writes of the saved bans and offense counts (they would not survive a reboot)",
            metrics.state_write_failures.clone(),
        );
        for family in ["ipv4", "ipv6"] {
            metrics
                .banned
                .get_or_create(&vec![("family", family)])
                .set(0);
        }
        metrics
    }

    pub fn bans(&self, reason: &'static str) -> Counter {
        self.bans.get_or_create(&vec![("reason", reason)]).clone()
    }

    pub fn skipped(&self, reason: &'static str) -> Counter {
        self.skipped
            .get_or_create(&vec![("reason", reason)])
            .clone()
    }

    pub fn set_banned(&self, ipv4: usize, ipv6: usize) {
        self.banned
            .get_or_create(&vec![("family", "ipv4")])
            .set(ipv4 as i64);
        self.banned
            .get_or_create(&vec![("family", "ipv6")])
            .set(ipv6 as i64);
    }

    /// `evicted_total` is the engine's running total; the counter catches up to it.
    pub fn set_tracked(&self, tracked: usize, evicted_total: u64) {
        self.tracked.set(tracked as i64);
        let seen = self.evicted.get();
        if evicted_total > seen {
            self.evicted.inc_by(evicted_total - seen);
        }
    }
}
