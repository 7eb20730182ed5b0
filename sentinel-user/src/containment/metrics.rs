//! `sentinel_exec_violations_total{service}`, `sentinel_containment_actions_total{service,action}`
//! and `sentinel_contained{service,action}`.

use std::sync::{Arc, Mutex};

use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};

use crate::{cgroup::Attribution, recent::Recorder};

type Labels = Vec<(&'static str, String)>;

#[derive(Clone)]
pub struct ContainmentMetrics {
    violations: Family<Labels, Counter>,
    actions: Family<Labels, Counter>,
    contained: Family<Labels, Gauge>,
    /// Service labels share the attribution's cap (`services.max_labels`, then `other`).
    labels: Arc<Mutex<Attribution>>,
    pub allow_list_updates: Counter,
    /// What `sentinel top` shows among recent events: each audited action.
    pub recent: Recorder,
}

impl ContainmentMetrics {
    pub fn new(registry: &mut Registry, labels: Arc<Mutex<Attribution>>, recent: Recorder) -> Self {
        let metrics = Self {
            violations: Family::default(),
            actions: Family::default(),
            contained: Family::default(),
            labels,
            allow_list_updates: Counter::default(),
            recent,
        };
        registry.register(
            "sentinel_exec_violations",
            "Executions of files the service's exec.allow does not list, per service",
            metrics.violations.clone(),
        );
        registry.register(
            "sentinel_containment_actions",
            "Containment actions taken (kill, freeze, isolate, alert, release, failed), or in \
             observe mode that would be taken, per service",
            metrics.actions.clone(),
        );
        registry.register(
            "sentinel_contained",
            "1 while a service is frozen or isolated by its containment policy, 0 once released",
            metrics.contained.clone(),
        );
        registry.register(
            "sentinel_exec_allow_list_updates",
            "Times the kernel's list of allowed executables changed because an allowed file was \
             replaced, created or removed (a package upgrade) or the policies were reloaded",
            metrics.allow_list_updates.clone(),
        );
        metrics
    }

    fn label(&self, service: &str) -> String {
        self.labels
            .lock()
            .expect("attribution lock")
            .label_for_path(service)
    }

    pub(super) fn violation(&self, service: &str) {
        let labels = vec![("service", self.label(service))];
        self.violations.get_or_create(&labels).inc();
    }

    pub(super) fn action(&self, service: &str, action: &str) {
        let labels = vec![("service", self.label(service)), ("action", action.into())];
        self.actions.get_or_create(&labels).inc();
    }

    pub(super) fn set_contained(&self, service: &str, action: &str, contained: bool) {
        let labels = vec![("service", self.label(service)), ("action", action.into())];
        self.contained
            .get_or_create(&labels)
            .set(i64::from(contained));
    }
}
