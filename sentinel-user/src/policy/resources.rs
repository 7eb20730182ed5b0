//! Resource figures of policed services for `/metrics` and `sentinel top`. One task owns their
//! collection: every `metrics.resource_refresh` it reads the cgroup files of the services a
//! policy applies to, off the async workers, and publishes a snapshot. A scrape encodes that
//! snapshot from memory, and the control socket's `stats` answer carries it; neither touches a
//! cgroup file.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::enforcer::{AppliedSummary, AppliedView};
use crate::cgroup::{
    CgroupPath, service_name,
    stats::{CgroupStats, Figure, ResourceDetail, StatsReader},
};

/// The latest figures and when they were read. They follow the applied view the pass read,
/// so a pass neither copies a path nor hashes one.
#[derive(Debug, Default)]
pub struct ResourceSnapshot {
    /// When the pass that read them began (rates between two snapshots divide by the time
    /// between these); `None` before the first pass.
    pub read_at: Option<Instant>,
    /// The policed cgroups when the pass began, in path order.
    pub policed: Arc<BTreeMap<CgroupPath, AppliedSummary>>,
    /// What the pass read of each, in the same order.
    pub stats: Vec<CgroupStats>,
    /// How many times a pass read a cgroup from its interface files, since the start.
    pub from_files: u64,
}

impl ResourceSnapshot {
    /// The cgroups of `view`, in path order, with the figures this pass read of each (`None`
    /// for a cgroup policed since).
    pub fn along<'a>(
        &'a self,
        view: &'a BTreeMap<CgroupPath, AppliedSummary>,
    ) -> impl Iterator<Item = (&'a str, &'a AppliedSummary, Option<&'a CgroupStats>)> {
        let mut read = self.policed.keys().zip(&self.stats).peekable();
        view.iter().map(move |(path, applied)| {
            while read.next_if(|(seen, _)| *seen < path).is_some() {}
            let stats = read
                .next_if(|(seen, _)| *seen == path)
                .map(|(_, stats)| stats);
            (&**path, applied, stats)
        })
    }
}

/// Picks one figure out of a cgroup's stats.
type FigureOf = fn(&CgroupStats) -> Option<f64>;

/// Series with only the `service` label: name, help, type, figure. Those past `BASIC_SERIES`
/// are exported only with `resource_detail: full`.
const SERIES: [(&str, &str, MetricType, FigureOf); 8] = [
    (
        "sentinel_memory_current_bytes",
        "Memory used by the service's cgroup",
        MetricType::Gauge,
        |stats| stats.get(Figure::MemoryCurrent).map(|v| v as f64),
    ),
    (
        "sentinel_memory_limit_bytes",
        "memory.max of the service's cgroup (absent when unlimited)",
        MetricType::Gauge,
        |stats| stats.get(Figure::MemoryMax).map(|v| v as f64),
    ),
    (
        "sentinel_cpu_usage_seconds",
        "CPU time used by the service's cgroup",
        MetricType::Counter,
        |stats| stats.seconds(Figure::CpuUsage),
    ),
    (
        "sentinel_cpu_throttled_seconds",
        "Time the service's cgroup was throttled by cpu.max",
        MetricType::Counter,
        |stats| stats.seconds(Figure::CpuThrottled),
    ),
    (
        "sentinel_pids_current",
        "Processes and threads in the service's cgroup",
        MetricType::Gauge,
        |stats| stats.get(Figure::PidsCurrent).map(|v| v as f64),
    ),
    (
        "sentinel_memory_high_bytes",
        "memory.high of the service's cgroup (absent when unlimited)",
        MetricType::Gauge,
        |stats| stats.detail.as_ref()?.memory_high_bytes.map(|v| v as f64),
    ),
    (
        "sentinel_cpu_throttled_periods",
        "Scheduler periods in which the service's cgroup was throttled",
        MetricType::Counter,
        |stats| {
            stats
                .detail
                .as_ref()?
                .cpu_throttled_periods
                .map(|v| v as f64)
        },
    ),
    (
        "sentinel_pids_limit",
        "pids.max of the service's cgroup (absent when unlimited)",
        MetricType::Gauge,
        |stats| stats.detail.as_ref()?.pids_max.map(|v| v as f64),
    ),
];
const BASIC_SERIES: usize = 5;

pub fn snapshot_channel() -> (
    watch::Sender<Arc<ResourceSnapshot>>,
    watch::Receiver<Arc<ResourceSnapshot>>,
) {
    watch::channel(Arc::default())
}

/// Reads the policed cgroups every `every` and publishes what it read, until `cancel`.
pub async fn refresh(
    mut reader: StatsReader,
    view: Arc<Mutex<AppliedView>>,
    every: Duration,
    publish: watch::Sender<Arc<ResourceSnapshot>>,
    cancel: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    // A slow pass delays the next one instead of causing a burst to catch up.
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        let policed = Arc::clone(&view.lock().expect("applied view lock").cgroups);
        let read_at = Instant::now();
        let pass = tokio::task::spawn_blocking(move || {
            let stats = reader.read_all(policed.iter().map(|(path, applied)| (path, applied.id)));
            (reader, policed, stats)
        });
        let Ok((returned, policed, stats)) = pass.await else {
            // The blocking pool is shutting down with the daemon.
            return;
        };
        reader = returned;
        publish.send_replace(Arc::new(ResourceSnapshot {
            read_at: Some(read_at),
            policed,
            stats,
            from_files: reader.from_files(),
        }));
    }
}

/// Encodes `sentinel_policy_applied` from the enforcer's view and the resource series from the
/// latest snapshot.
#[derive(Debug)]
pub struct ResourceCollector {
    view: Arc<Mutex<AppliedView>>,
    snapshot: watch::Receiver<Arc<ResourceSnapshot>>,
    detail: ResourceDetail,
}

impl ResourceCollector {
    pub fn new(
        view: Arc<Mutex<AppliedView>>,
        snapshot: watch::Receiver<Arc<ResourceSnapshot>>,
        detail: ResourceDetail,
    ) -> Self {
        Self {
            view,
            snapshot,
            detail,
        }
    }
}

impl Collector for ResourceCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // In path order, so in service order.
        let applied = Arc::clone(&self.view.lock().expect("applied view lock").cgroups);
        let snapshot = Arc::clone(&self.snapshot.borrow());
        // Only services a policy still applies to, in service order.
        let policed: Vec<(&str, &CgroupStats)> = snapshot
            .along(&applied)
            .filter_map(|(path, _, stats)| Some((service_name(path), stats?)))
            .collect();

        ConstCounter::new(snapshot.from_files).encode(encoder.encode_descriptor(
            "sentinel_resource_cgroups_from_files",
            "Times a refresh read a policed cgroup's resource figures from its interface files, \
             not from the kernel's cgroup iterator",
            None,
            MetricType::Counter,
        )?)?;
        let mut family = encoder.encode_descriptor(
            "sentinel_policy_applied",
            "Cgroups a policy applies to (1), by service and policy",
            None,
            MetricType::Gauge,
        )?;
        for (path, applied) in applied.iter() {
            let labels = [("service", service_name(path)), ("policy", &applied.policy)];
            ConstGauge::new(1).encode(family.encode_family(&labels)?)?;
        }

        let series = match self.detail {
            ResourceDetail::Basic => &SERIES[..BASIC_SERIES],
            ResourceDetail::Full => &SERIES[..],
        };
        for &(name, help, metric_type, figure) in series {
            let mut family = encoder.encode_descriptor(name, help, None, metric_type)?;
            for &(service, stats) in &policed {
                if let Some(value) = figure(stats) {
                    encode_value(
                        metric_type,
                        value,
                        family.encode_family(&[("service", service)])?,
                    )?;
                }
            }
        }
        if self.detail == ResourceDetail::Basic {
            return Ok(());
        }

        let mut family = encoder.encode_descriptor(
            "sentinel_memory_events",
            "memory.events of the service's cgroup (high, max, oom, oom_kill)",
            None,
            MetricType::Counter,
        )?;
        let detailed = || {
            policed
                .iter()
                .filter_map(|&(service, stats)| Some((service, stats.detail.as_deref()?)))
        };
        for (service, detail) in detailed() {
            for &(event, count) in &detail.memory_events {
                let labels = [("service", service), ("event", event)];
                ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "sentinel_pressure_stall_seconds",
            "Pressure stall time (PSI) of the service's cgroup, by resource and scope",
            None,
            MetricType::Counter,
        )?;
        for (service, detail) in detailed() {
            for &(resource, scope, seconds) in &detail.pressure_stall_seconds {
                let labels = [
                    ("service", service),
                    ("resource", resource),
                    ("scope", scope),
                ];
                ConstCounter::new(seconds).encode(family.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

fn encode_value(
    metric_type: MetricType,
    value: f64,
    sample: prometheus_client::encoding::MetricEncoder,
) -> Result<(), std::fmt::Error> {
    match metric_type {
        MetricType::Counter => ConstCounter::new(value).encode(sample),
        _ => ConstGauge::new(value).encode(sample),
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;
    use crate::{
        cgroup::stats::DetailStats,
        policy::{Mode, enforcer::AppliedSummary},
    };

    fn stats() -> CgroupStats {
        let mut stats = CgroupStats::default()
            .with(Figure::MemoryCurrent, 1024)
            .with(Figure::MemoryMax, 4096)
            .with(Figure::CpuUsage, 2_500_000)
            .with(Figure::CpuThrottled, 500_000)
            .with(Figure::PidsCurrent, 3);
        stats.detail = Some(Box::new(DetailStats {
            memory_high_bytes: None,
            cpu_throttled_periods: Some(7),
            pids_max: Some(32),
            memory_events: vec![("oom_kill", 1)],
            pressure_stall_seconds: vec![("cpu", "some", 0.25)],
        }));
        stats
    }

    /// `/metrics` for two policed cgroups, one of which has not been read yet.
    fn scrape(detail: ResourceDetail) -> String {
        let view = Arc::new(Mutex::new(AppliedView::default()));
        for (path, policy) in [("/web", "web"), ("/new", "new")] {
            Arc::make_mut(&mut view.lock().unwrap().cgroups).insert(
                path.into(),
                AppliedSummary {
                    policy: policy.into(),
                    mode: Mode::Enforce,
                    memory_max: None,
                    id: 0,
                },
            );
        }
        let (publish, snapshot) = snapshot_channel();
        // `/new` is policed after the pass.
        let mut read = (*view.lock().unwrap().cgroups).clone();
        read.remove("/new");
        let stats = vec![stats()];
        publish.send_replace(Arc::new(ResourceSnapshot {
            read_at: Some(Instant::now()),
            policed: Arc::new(read),
            stats,
            from_files: 1,
        }));
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ResourceCollector::new(view, snapshot, detail)));
        let mut body = String::new();
        encode(&mut body, &registry).unwrap();
        body
    }

    fn samples(body: &str) -> Vec<&str> {
        body.lines().filter(|line| !line.starts_with('#')).collect()
    }

    #[test]
    fn each_policed_cgroup_gets_its_own_figures_whatever_changed_since_the_pass() {
        let summary = |policy: &str| AppliedSummary {
            policy: policy.into(),
            mode: Mode::Enforce,
            memory_max: None,
            id: 0,
        };
        let read = |bytes| CgroupStats::default().with(Figure::MemoryCurrent, bytes);
        let snapshot = ResourceSnapshot {
            read_at: Some(Instant::now()),
            policed: Arc::new(BTreeMap::from([
                ("/a".into(), summary("a")),
                ("/gone".into(), summary("gone")),
                ("/web".into(), summary("web")),
            ])),
            stats: vec![read(1), read(2), read(3)],
            from_files: 0,
        };
        // Since the pass: `/gone` let go, `/b` and `/z` policed.
        let view =
            BTreeMap::from(["/a", "/b", "/web", "/z"].map(|path| (path.into(), summary("p"))));
        let paired: Vec<(&str, Option<u64>)> = snapshot
            .along(&view)
            .map(|(path, _, stats)| {
                (
                    path,
                    stats.and_then(|stats| stats.get(Figure::MemoryCurrent)),
                )
            })
            .collect();
        assert_eq!(
            paired,
            [
                ("/a", Some(1)),
                ("/b", None),
                ("/web", Some(3)),
                ("/z", None)
            ]
        );
    }

    #[test]
    fn basic_detail_exports_the_operator_series_from_the_snapshot() {
        assert_eq!(
            samples(&scrape(ResourceDetail::Basic)),
            [
                "sentinel_resource_cgroups_from_files_total 1",
                "sentinel_policy_applied{service=\"new\",policy=\"new\"} 1",
                "sentinel_policy_applied{service=\"web\",policy=\"web\"} 1",
                "sentinel_memory_current_bytes{service=\"web\"} 1024.0",
                "sentinel_memory_limit_bytes{service=\"web\"} 4096.0",
                "sentinel_cpu_usage_seconds_total{service=\"web\"} 2.5",
                "sentinel_cpu_throttled_seconds_total{service=\"web\"} 0.5",
                "sentinel_pids_current{service=\"web\"} 3.0",
            ]
        );
    }

    #[test]
    fn full_detail_adds_limits_periods_events_and_pressure() {
        let body = scrape(ResourceDetail::Full);
        let full = samples(&body);
        assert_eq!(
            full[8..],
            [
                "sentinel_cpu_throttled_periods_total{service=\"web\"} 7.0",
                "sentinel_pids_limit{service=\"web\"} 32.0",
                "sentinel_memory_events_total{service=\"web\",event=\"oom_kill\"} 1",
                "sentinel_pressure_stall_seconds_total{service=\"web\",resource=\"cpu\",\
                 scope=\"some\"} 0.25",
            ]
        );
        // memory.high is unlimited: described, without a sample.
        assert!(body.contains("# TYPE sentinel_memory_high_bytes gauge\n"));
        assert!(!body.contains("sentinel_memory_high_bytes{"));
    }
}
