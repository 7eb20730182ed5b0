//! Per-service resource and enforcement metrics. Resource figures are read from the cgroup
//! files at scrape time for every cgroup a policy applies to.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{
        counter::{ConstCounter, Counter},
        family::Family,
        gauge::ConstGauge,
    },
    registry::Registry,
};

use super::enforcer::AppliedView;
use crate::cgroup::{Attribution, cgroupfs::CgroupFs, service_name, stats::read_stats};

type Labels = Vec<(&'static str, String)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    SetLimits,
    WouldSetLimits,
    RestoredLimits,
    Terminate,
    WouldTerminate,
    Kill,
    Failed,
}

impl Action {
    fn label(self) -> &'static str {
        match self {
            Self::SetLimits => "set_limits",
            Self::WouldSetLimits => "would_set_limits",
            Self::RestoredLimits => "restored_limits",
            Self::Terminate => "sigterm",
            Self::WouldTerminate => "would_sigterm",
            Self::Kill => "sigkill",
            Self::Failed => "failed",
        }
    }
}

#[derive(Clone)]
pub struct PolicyMetrics {
    actions: Family<Labels, Counter>,
    drift: Family<Labels, Counter>,
    /// Service labels come from the attribution, so that these series share its cap
    /// (`services.max_labels`, then `other`).
    labels: Arc<Mutex<Attribution>>,
    pub reload_errors: Counter,
    pub reloads: Counter,
}

impl PolicyMetrics {
    pub fn new(
        registry: &mut Registry,
        fs: CgroupFs,
        view: Arc<Mutex<AppliedView>>,
        labels: Arc<Mutex<Attribution>>,
    ) -> Self {
        let metrics = Self {
            actions: Family::default(),
            drift: Family::default(),
            labels,
            reload_errors: Counter::default(),
            reloads: Counter::default(),
        };
        registry.register(
            "sentinel_actions",
            "Enforcement actions taken (or, in observe mode, that would be taken), per service",
            metrics.actions.clone(),
        );
        registry.register(
            "sentinel_policy_drift",
            "Limits found changed behind Sentinel's back and restored, per service",
            metrics.drift.clone(),
        );
        registry.register(
            "sentinel_policy_reload_errors",
            "Policy reloads rejected because the file was invalid; the running policy stayed",
            metrics.reload_errors.clone(),
        );
        registry.register(
            "sentinel_policy_reloads",
            "Policy reloads applied",
            metrics.reloads.clone(),
        );
        registry.register_collector(Box::new(ResourceCollector { fs, view }));
        metrics
    }

    pub fn action(&self, service: &str, action: Action) {
        self.actions
            .get_or_create(&vec![
                ("service", self.label(service)),
                ("action", action.label().to_string()),
            ])
            .inc();
    }

    pub fn drift(&self, service: &str) {
        self.drift
            .get_or_create(&vec![("service", self.label(service))])
            .inc();
    }

    fn label(&self, service: &str) -> String {
        self.labels
            .lock()
            .expect("attribution lock")
            .label_for_path(service)
    }
}

#[derive(Debug)]
struct ResourceCollector {
    fs: CgroupFs,
    view: Arc<Mutex<AppliedView>>,
}

/// One metric family: name, help, and the samples (labels, value).
struct Samples {
    name: &'static str,
    help: &'static str,
    counter: bool,
    rows: Vec<(Labels, f64)>,
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let paths = self.view.lock().expect("applied view lock").policies();
        let gauge = |name, help| Samples {
            name,
            help,
            counter: false,
            rows: Vec::new(),
        };
        let counter = |name, help| Samples {
            name,
            help,
            counter: true,
            rows: Vec::new(),
        };
        let mut families = [
            gauge(
                "sentinel_policy_applied",
                "Cgroups a policy applies to (1), by service and policy",
            ),
            gauge(
                "sentinel_memory_current_bytes",
                "Memory used by the service's cgroup",
            ),
            gauge(
                "sentinel_memory_limit_bytes",
                "memory.max of the service's cgroup",
            ),
            gauge(
                "sentinel_memory_high_bytes",
                "memory.high of the service's cgroup",
            ),
            counter(
                "sentinel_cpu_usage_seconds",
                "CPU time used by the service's cgroup",
            ),
            counter(
                "sentinel_cpu_throttled_seconds",
                "Time the service's cgroup was throttled by cpu.max",
            ),
            counter(
                "sentinel_cpu_throttled_periods",
                "Scheduler periods in which the service's cgroup was throttled",
            ),
            gauge(
                "sentinel_pids_current",
                "Processes and threads in the service's cgroup",
            ),
            gauge("sentinel_pids_limit", "pids.max of the service's cgroup"),
            counter(
                "sentinel_memory_events",
                "memory.events of the service's cgroup (high, max, oom, oom_kill)",
            ),
            counter(
                "sentinel_pressure_stall_seconds",
                "Pressure stall time (PSI) of the service's cgroup, by resource and scope",
            ),
        ];
        for (path, policy) in &paths {
            let service = service_name(path).to_string();
            let labels = |extra: &[(&'static str, &str)]| -> Labels {
                let mut labels = vec![("service", service.clone())];
                labels.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
                labels
            };
            let stats = read_stats(&self.fs, path);
            families[0].rows.push((labels(&[("policy", policy)]), 1.0));
            let simple = [
                (1, stats.memory_current_bytes.map(|v| v as f64)),
                (2, stats.memory_max_bytes.map(|v| v as f64)),
                (3, stats.memory_high_bytes.map(|v| v as f64)),
                (4, stats.cpu_usage_seconds),
                (5, stats.cpu_throttled_seconds),
                (6, stats.cpu_throttled_periods.map(|v| v as f64)),
                (7, stats.pids_current.map(|v| v as f64)),
                (8, stats.pids_max.map(|v| v as f64)),
            ];
            for (index, value) in simple {
                if let Some(value) = value {
                    families[index].rows.push((labels(&[]), value));
                }
            }
            for (event, count) in &stats.memory_events {
                families[9]
                    .rows
                    .push((labels(&[("event", event)]), *count as f64));
            }
            for (resource, scope, seconds) in &stats.pressure_stall_seconds {
                families[10].rows.push((
                    labels(&[("resource", resource), ("scope", scope)]),
                    *seconds,
                ));
            }
        }
        for family in families {
            let metric_type = if family.counter {
                ConstCounter::new(0.0).metric_type()
            } else {
                ConstGauge::new(0.0).metric_type()
            };
            let mut encoder =
                encoder.encode_descriptor(family.name, family.help, None, metric_type)?;
            for (labels, value) in &family.rows {
                let sample = encoder.encode_family(labels)?;
                if family.counter {
                    ConstCounter::new(*value).encode(sample)?;
                } else {
                    ConstGauge::new(*value).encode(sample)?;
                }
            }
        }
        Ok(())
    }
}
