//! The one place `sentinel top`'s figures are gathered, all from memory: the kernel's
//! per-service counters (eBPF maps, as a scrape reads them) and, for the services a policy
//! applies to, the resource refresh's latest snapshot (the figures `/metrics` exports).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use super::report::ServiceStats;
use crate::{
    cgroup::{service_name, stats::Figure},
    metrics::KernelCounters,
    policy::{enforcer::AppliedView, resources::ResourceSnapshot},
};

/// One row per service, sorted by name.
pub fn collect(
    counters: &KernelCounters,
    applied: &Mutex<AppliedView>,
    snapshot: &ResourceSnapshot,
) -> Vec<ServiceStats> {
    let mut rows: BTreeMap<String, ServiceStats> = BTreeMap::new();
    for totals in counters.service_totals() {
        let row = rows.entry(totals.service.clone()).or_default();
        row.execs = totals.counters.execs;
        row.tcp_connects = totals.counters.tcp_connects;
        row.oom_kills = totals.oom_kills;
    }
    let policed = Arc::clone(&applied.lock().expect("applied view lock").cgroups);
    for (path, applied, stats) in snapshot.along(&policed) {
        let row = rows.entry(service_name(path).to_string()).or_default();
        row.policy = Some(applied.policy.to_string());
        // Applied since the last refresh: no figures until the next.
        let Some(stats) = stats else {
            continue;
        };
        let detail = stats.detail.as_deref();
        let some_pressure = |resource: &str| {
            detail?
                .pressure_stall_seconds
                .iter()
                .find(|(r, scope, _)| *r == resource && *scope == "some")
                .map(|(_, _, seconds)| *seconds)
        };
        row.memory_bytes = stats.get(Figure::MemoryCurrent);
        row.memory_max_bytes = stats.get(Figure::MemoryMax);
        row.cpu_usage_seconds = stats.seconds(Figure::CpuUsage);
        row.cpu_throttled_seconds = stats.seconds(Figure::CpuThrottled);
        row.pids = stats.get(Figure::PidsCurrent);
        row.pids_max = detail.and_then(|detail| detail.pids_max);
        row.memory_pressure_seconds = some_pressure("memory");
        row.cpu_pressure_seconds = some_pressure("cpu");
    }
    rows.into_iter()
        .map(|(service, row)| ServiceStats { service, ..row })
        .collect()
}
