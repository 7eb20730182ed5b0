//! The port-scan detector's metrics. No address or port ever becomes a label.

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::ssh_guard::GuardMode;

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Clone)]
pub struct PortScanMetrics {
    pub hits: Counter,
    scanners: Family<Labels, Counter>,
    tracked: Gauge,
    evicted: Counter,
}

impl PortScanMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            hits: Counter::default(),
            scanners: Family::default(),
            tracked: Gauge::default(),
            evicted: Counter::default(),
        };
        registry.register(
            "sentinel_port_scan_closed_port_hits",
            "Segments to closed ports of Sentinel's network namespace (answered with a reset)",
            metrics.hits.clone(),
        );
        registry.register(
            "sentinel_port_scan_scanners",
            "Addresses found scanning (distinct closed ports within the window), by mode",
            metrics.scanners.clone(),
        );
        registry.register(
            "sentinel_port_scan_tracked_addresses",
            "Addresses with recent closed-port hits being tracked",
            metrics.tracked.clone(),
        );
        registry.register(
            "sentinel_port_scan_tracking_evictions",
            "Addresses with recent closed-port hits forgotten because the tracking table was full",
            metrics.evicted.clone(),
        );
        for mode in [GuardMode::Enforce, GuardMode::Observe] {
            metrics.scanners(mode);
        }
        metrics
    }

    pub fn scanners(&self, mode: GuardMode) -> Counter {
        let mode = match mode {
            GuardMode::Enforce => "enforce",
            GuardMode::Observe => "observe",
        };
        self.scanners.get_or_create(&vec![("mode", mode)]).clone()
    }

    /// `evicted_total` is the detector's running total; the counter catches up to it.
    pub fn set_tracked(&self, tracked: usize, evicted_total: u64) {
        self.tracked.set(tracked as i64);
        let seen = self.evicted.get();
        if evicted_total > seen {
            self.evicted.inc_by(evicted_total - seen);
        }
    }
}
