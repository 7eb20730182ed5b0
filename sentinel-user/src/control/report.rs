//! What `sentinel status`, `sentinel top` and `sentinel reload` receive from the daemon. These
//! are also the JSON documents `--output json` prints: fields are only ever added, never renamed
//! or removed.

use serde::{Deserialize, Serialize};

use crate::{
    containment::ContainedService,
    policy::enforcer::{PolicyState, ServiceOutcome},
    probes::ProbeStatus,
    recent::RecentEvent,
    ssh_guard::GuardStatus,
    yaml::Diagnostic,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub version: String,
    pub uptime_seconds: u64,
    pub probes: Vec<ProbeStatus>,
    pub policies: Vec<PolicyState>,
    pub ssh_guard: GuardReport,
    /// `None` until the first reload.
    pub last_reload: Option<ReloadReport>,
    /// Services frozen or isolated by their containment policy, until `sentinel release`.
    #[serde(default)]
    pub containment: Vec<ContainedService>,
}

/// The SSH guard as the configuration wants it and as it answers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum GuardReport {
    Disabled,
    Running(GuardStatus),
    /// Enabled, but it did not answer (the reason).
    NotAnswering {
        reason: String,
    },
}

/// The outcome of one reload, from a signal, a file change or `sentinel reload`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReloadReport {
    pub at_unix_seconds: u64,
    /// What started it: `SIGHUP`, `the configuration file changed`, `sentinel reload`.
    pub trigger: String,
    pub ok: bool,
    /// Policies in force after a reload that took effect.
    pub policies: Option<usize>,
    /// Changed settings that are read only at start.
    pub restart_required: Vec<String>,
    /// Why the file was refused, each at its place.
    pub problems: Vec<Diagnostic>,
    /// Why the reload failed when no place in the file is to blame.
    pub error: Option<String>,
}

impl StatusReport {
    /// What is wanted and not working; empty when everything works.
    pub fn problems(&self) -> Vec<String> {
        let mut problems: Vec<String> = self
            .probes
            .iter()
            .filter(|probe| !probe.attached)
            .map(|probe| format!("probe {} is not attached", probe.name))
            .collect();
        for policy in &self.policies {
            for service in &policy.services {
                if matches!(
                    service.outcome,
                    ServiceOutcome::Refused { .. } | ServiceOutcome::Failed { .. }
                ) {
                    problems.push(format!(
                        "policy {} is not applied to {}",
                        policy.name, service.service
                    ));
                }
            }
        }
        if let GuardReport::NotAnswering { reason } = &self.ssh_guard {
            problems.push(format!("the SSH guard does not answer: {reason}"));
        }
        if self.last_reload.as_ref().is_some_and(|reload| !reload.ok) {
            problems.push("the last reload was refused".into());
        }
        problems
    }
}

/// Figures for `sentinel top`, from what the daemon holds in memory. Counters are totals since
/// the daemon started; the client turns two samples into rates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatsReport {
    /// When the event counts (execs, connects, OOM kills) were read, in milliseconds since the
    /// daemon started.
    pub sampled_at_ms: u64,
    /// When the resource figures (memory, CPU, pids, pressure) were read, in milliseconds since
    /// the daemon started: they come from the background read every `metrics.resource_refresh`,
    /// the one `/metrics` exports. `None` before the first read.
    #[serde(default)]
    pub resources_read_at_ms: Option<u64>,
    pub services: Vec<ServiceStats>,
    /// The daemon's recent events, oldest first (at most the last 256).
    #[serde(default)]
    pub events: Vec<RecentEvent>,
}

/// One service. Resource figures exist only for services a policy applies to, once the
/// background read has seen them; the event counts exist for every service the probes saw.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceStats {
    pub service: String,
    pub policy: Option<String>,
    pub memory_bytes: Option<u64>,
    pub memory_max_bytes: Option<u64>,
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub pids: Option<u64>,
    pub pids_max: Option<u64>,
    /// PSI `some` totals: the time at least one task stalled on memory, on CPU.
    pub memory_pressure_seconds: Option<f64>,
    pub cpu_pressure_seconds: Option<f64>,
    pub execs: u64,
    pub tcp_connects: u64,
    pub oom_kills: u64,
}
