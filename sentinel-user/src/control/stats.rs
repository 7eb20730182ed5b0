//! The one place `sentinel top`'s figures are gathered: the kernel's per-service counters (eBPF
//! maps, as a scrape reads them) and, for the services a policy applies to, their cgroup files.
//! A cache kept fresh in the background could replace the cgroup reads here without the
//! control socket noticing.

use std::{collections::BTreeMap, sync::Mutex};

use super::report::ServiceStats;
use crate::{
    cgroup::{
        cgroupfs::CgroupFs,
        service_name,
        stats::{ResourceDetail, StatsReader},
    },
    metrics::KernelCounters,
    policy::enforcer::AppliedView,
};

/// One row per service, sorted by name.
pub fn collect(
    counters: &KernelCounters,
    applied: &Mutex<AppliedView>,
    fs: &CgroupFs,
) -> Vec<ServiceStats> {
    let mut rows: BTreeMap<String, ServiceStats> = BTreeMap::new();
    for totals in counters.service_totals() {
        let row = rows.entry(totals.service.clone()).or_default();
        row.execs = totals.counters.execs;
        row.tcp_connects = totals.counters.tcp_connects;
        row.oom_kills = totals.oom_kills;
    }
    let policed = applied.lock().expect("applied view lock").policies();
    let mut reader = StatsReader::new(fs.clone(), ResourceDetail::Full);
    for (path, policy) in policed {
        let stats = reader.read(&path);
        let some_pressure = |resource: &str| {
            stats
                .pressure_stall_seconds
                .iter()
                .find(|(r, scope, _)| *r == resource && *scope == "some")
                .map(|(_, _, seconds)| *seconds)
        };
        let row = rows.entry(service_name(&path).to_string()).or_default();
        row.policy = Some(policy);
        row.memory_bytes = stats.memory_current_bytes;
        row.memory_max_bytes = stats.memory_max_bytes;
        row.cpu_usage_seconds = stats.cpu_usage_seconds;
        row.cpu_throttled_seconds = stats.cpu_throttled_seconds;
        row.pids = stats.pids_current;
        row.pids_max = stats.pids_max;
        row.memory_pressure_seconds = some_pressure("memory");
        row.cpu_pressure_seconds = some_pressure("cpu");
    }
    rows.into_iter()
        .map(|(service, row)| ServiceStats { service, ..row })
        .collect()
}
