//! Per-service enforcement metrics, each action also in the daemon's recent events; the
//! resource figures are `resources`' concern.

use std::{
    sync::{Arc, Mutex},
    time::Instant,
};

use prometheus_client::{
    encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder},
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{cgroup::Attribution, recent::Recorder};

/// A series per service (and action): typed, so that thousands of services' series hold only
/// the service's name.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    service: String,
    action: Action,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq)]
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
    pub fn label(self) -> &'static str {
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

impl EncodeLabelValue for Action {
    fn encode(&self, encoder: &mut LabelValueEncoder) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.label())
    }
}

#[derive(Clone)]
pub struct PolicyMetrics {
    actions: Family<ActionLabels, Counter>,
    drift: Family<ServiceLabel, Counter>,
    /// Service labels come from the attribution, so that these series share its cap
    /// (`services.max_labels`, then `other`).
    labels: Arc<Mutex<Attribution>>,
    /// Where the actions go as recent events; reloads go there too.
    pub recent: Recorder,
    pub reload_errors: Counter,
    pub reloads: Counter,
    /// Policed cgroups read for drift at every check because the kernel cannot report their
    /// writes (no inotify watch: `fs.inotify.max_user_watches` reached, or no inotify).
    pub drift_polled: Gauge,
}

impl PolicyMetrics {
    pub fn new(registry: &mut Registry, labels: Arc<Mutex<Attribution>>, recent: Recorder) -> Self {
        let metrics = Self {
            actions: Family::default(),
            drift: Family::default(),
            labels,
            recent,
            reload_errors: Counter::default(),
            reloads: Counter::default(),
            drift_polled: Gauge::default(),
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
        registry.register(
            "sentinel_policy_drift_polled_cgroups",
            "Policed cgroups read for drift at every check, because the kernel cannot report \
             their writes (inotify watch limit reached)",
            metrics.drift_polled.clone(),
        );
        metrics
    }

    /// Counts `action` on `service` and puts it in the recent events.
    pub fn action(&self, service: &str, action: Action) {
        self.recent.record(action.label(), service, "");
        self.count(service, action);
    }

    /// Counts `action` on `service` only; the caller reports it in the recent events.
    pub fn count(&self, service: &str, action: Action) {
        self.count_each([service], action);
    }

    /// Counts `action` once on each of `services`, as [`Self::count`] does, with one clock
    /// reading and one label buffer for them all: a reload counts thousands. The attribution
    /// is locked for each label only, so that a scrape waiting for it is not held up by the
    /// whole batch.
    pub fn count_each<'s>(&self, services: impl IntoIterator<Item = &'s str>, action: Action) {
        let now = Instant::now();
        let mut key = ActionLabels {
            service: String::new(),
            action,
        };
        for service in services {
            key.service.clear();
            key.service.push_str(
                self.labels
                    .lock()
                    .expect("attribution lock")
                    .label_at(service, now),
            );
            self.actions.get_or_create(&key).inc();
        }
    }

    /// A limit found changed: `file` was `found`, and is put back to `expected`.
    pub fn drift(&self, service: &str, file: &str, found: &str, expected: &str) {
        self.recent.record(
            "drift",
            service,
            format!("{file} was {found}, put back to {expected}"),
        );
        self.drift
            .get_or_create(&ServiceLabel {
                service: self.label(service),
            })
            .inc();
    }

    fn label(&self, service: &str) -> String {
        self.labels
            .lock()
            .expect("attribution lock")
            .label_for_path(service)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use prometheus_client::encoding::text::encode;

    use super::*;
    use crate::{cgroup::CgroupTree, queue::QueueDrops};

    #[test]
    fn actions_and_drift_are_counted_per_service_with_their_labels() {
        let mut registry = Registry::default();
        let labels = Arc::new(Mutex::new(Attribution::new(
            CgroupTree::new(std::env::temp_dir()),
            16,
            Duration::from_secs(600),
        )));
        let (recent, _events, _) = crate::recent::channel(&QueueDrops::new(&mut registry));
        let metrics = PolicyMetrics::new(&mut registry, labels, recent);
        metrics.count("web.service", Action::SetLimits);
        metrics.count("web.service", Action::SetLimits);
        metrics.count("db.service", Action::WouldTerminate);
        metrics.count_each(["web.service", "db.service"], Action::SetLimits);
        metrics.drift("web.service", "memory.max", "max", "67108864");
        let mut body = String::new();
        encode(&mut body, &registry).unwrap();
        let mut samples: Vec<&str> = body
            .lines()
            .filter(|line| {
                line.starts_with("sentinel_actions")
                    || line.starts_with("sentinel_policy_drift_total")
            })
            .collect();
        samples.sort();
        assert_eq!(
            samples,
            [
                "sentinel_actions_total{service=\"db.service\",action=\"set_limits\"} 1",
                "sentinel_actions_total{service=\"db.service\",action=\"would_sigterm\"} 1",
                "sentinel_actions_total{service=\"web.service\",action=\"set_limits\"} 3",
                "sentinel_policy_drift_total{service=\"web.service\"} 1",
            ]
        );
    }
}
