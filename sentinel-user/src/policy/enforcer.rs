//! Enforcement: writes each matching cgroup's limits, keeps them there, restores what was
//! there before when a policy lets go of a cgroup, and stops runaway processes before the
//! kernel's OOM killer does.
//!
//! The enforcer runs on its own thread and owns all cgroup writes; everything else talks to it
//! through [`Input`]. What it applied is published in an [`AppliedView`] for `/metrics` and
//! for OOM log lines, and how each policy stands on each cgroup (applied, refused, failed) as
//! a [`PolicyState`] snapshot for `sentinel status`.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc, Mutex,
        mpsc::{Receiver, RecvTimeoutError},
    },
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{error, info, warn};

use super::{
    Mode, Policy, ServicePolicy,
    metrics::{Action, PolicyMetrics},
};
use crate::{
    cgroup::{
        cgroupfs::{CONTROLLERS, CgroupFs},
        guardian::{GuardAction, GuardLimits, MemoryGuard, ProcessHandle, largest_process},
        service_name, walk_hierarchy,
    },
    state::StateFile,
};

/// How often limits are checked for drift and memory guards are evaluated.
const TICK: Duration = Duration::from_millis(500);

pub enum Input {
    /// A cgroup was created (path relative to the cgroup2 root).
    CgroupCreated(String),
    /// A new, already validated policy replaces the current one.
    Reload(Policy),
    Stop,
}

/// How cgroups of systemd units may be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// Refuse cgroups that systemd manages (on a host booted with systemd).
    Auto,
    /// Write every matched cgroup directly (the operator takes responsibility for systemd).
    Cgroupfs,
}

/// What is applied where, shared with the metrics collector and the event handler.
#[derive(Debug, Default)]
pub struct AppliedView {
    /// By cgroup path: the policy in force there.
    pub cgroups: HashMap<String, AppliedSummary>,
}

impl AppliedView {
    /// (cgroup path, policy name) of every policed cgroup, sorted by path.
    pub fn policies(&self) -> Vec<(String, String)> {
        let mut policies: Vec<(String, String)> = self
            .cgroups
            .iter()
            .map(|(path, applied)| (path.clone(), applied.policy.clone()))
            .collect();
        policies.sort();
        policies
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSummary {
    pub policy: String,
    pub mode: Mode,
    /// `memory.max` as written (`max` or bytes), for OOM reports.
    pub memory_max: Option<String>,
}

/// A policy, in file order, and how it stands on each cgroup it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub name: String,
    pub mode: Mode,
    pub services: Vec<ServiceState>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceState {
    pub service: String,
    #[serde(flatten)]
    pub outcome: ServiceOutcome,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum ServiceOutcome {
    Enforcing,
    Observing,
    /// Sentinel chose not to write it (a systemd unit's cgroup).
    Refused {
        reason: String,
    },
    /// Writing the limits failed.
    Failed {
        reason: String,
    },
}

/// Interface files and their values, e.g. `("memory.max", "67108864")`.
type Files = Vec<(&'static str, String)>;

/// By cgroup path, the values found there before Sentinel first wrote it: kept on disk so that
/// after a crash or reboot Sentinel's own values are never taken for the originals.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedOriginals {
    cgroups: BTreeMap<String, BTreeMap<String, String>>,
}

struct Applied {
    policy: ServicePolicy,
    /// The values Sentinel keeps in place, as the kernel reads them back.
    expected: Files,
    /// The values before Sentinel changed them, restored when the policy lets go.
    originals: Files,
    guard: Option<MemoryGuard>,
    terminated: Option<ProcessHandle>,
}

pub struct Enforcer {
    fs: CgroupFs,
    policy: Policy,
    backend: Backend,
    systemd_booted: bool,
    applied: HashMap<String, Applied>,
    /// The true originals of every cgroup Sentinel has written and not yet given back.
    saved: SavedOriginals,
    saved_file: StateFile<SavedOriginals>,
    view: Arc<Mutex<AppliedView>>,
    /// By cgroup path: the policy that matches it and why it is not applied.
    unapplied: HashMap<String, (String, ServiceOutcome)>,
    states: watch::Sender<Vec<PolicyState>>,
    metrics: PolicyMetrics,
}

impl Enforcer {
    pub fn new(
        fs: CgroupFs,
        policy: Policy,
        backend: Backend,
        view: Arc<Mutex<AppliedView>>,
        metrics: PolicyMetrics,
        state_dir: &Path,
    ) -> Self {
        let saved_file = StateFile::new(state_dir.join("cgroup-originals.json"));
        let saved = saved_file.load().unwrap_or_else(|error| {
            error!("{error}; limits written before this start cannot be given back exactly");
            None
        });
        Self {
            fs,
            policy,
            backend,
            systemd_booted: Path::new("/run/systemd/system").is_dir(),
            applied: HashMap::new(),
            saved: saved.unwrap_or_default(),
            saved_file,
            view,
            unapplied: HashMap::new(),
            states: watch::Sender::new(Vec::new()),
            metrics,
        }
    }

    /// Each policy's state, republished whenever it changes.
    pub fn subscribe(&self) -> watch::Receiver<Vec<PolicyState>> {
        self.states.subscribe()
    }

    /// Applies the policy to every existing cgroup.
    pub fn apply_all(&mut self) {
        let started = Instant::now();
        self.unapplied.clear();
        for (_, path) in walk_hierarchy(self.fs.root()) {
            self.reconcile(&path);
        }
        self.publish();
        info!(
            cgroups = self.applied.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "policies applied"
        );
    }

    /// Handles inputs until `Stop`; limits stay in place when the daemon stops.
    pub fn run(mut self, inputs: Receiver<Input>) {
        self.give_back_unclaimed();
        self.apply_all();
        let mut next_tick = Instant::now() + TICK;
        loop {
            self.save_originals();
            match inputs.recv_timeout(next_tick.saturating_duration_since(Instant::now())) {
                Ok(Input::CgroupCreated(path)) => {
                    self.reconcile(&path);
                    self.publish();
                }
                Ok(Input::Reload(policy)) => self.reload(policy),
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    next_tick = Instant::now() + TICK;
                }
            }
        }
    }

    /// Cgroups written before a restart that no policy wants any more (the policy was removed
    /// while the daemon was down) get their true originals back.
    fn give_back_unclaimed(&mut self) {
        let unclaimed: Vec<String> = self
            .saved
            .cgroups
            .keys()
            .filter(|path| self.policy_for(path).is_none())
            .cloned()
            .collect();
        for path in unclaimed {
            let originals = self.saved_files(&path);
            if self.fs.exists(&path) {
                self.restore(&path, &originals);
                info!(
                    service = service_name(&path),
                    "no policy wants this cgroup since the restart; previous limits restored"
                );
            }
            self.forget_originals(&path);
        }
    }

    /// The saved originals of `path`, as interface files this version knows.
    fn saved_files(&self, path: &str) -> Files {
        let Some(saved) = self.saved.cgroups.get(path) else {
            return Vec::new();
        };
        super::model::INTERFACE_FILES
            .iter()
            .filter_map(|file| Some((*file, saved.get(*file)?.clone())))
            .collect()
    }

    fn forget_originals(&mut self, path: &str) {
        if self.saved.cgroups.remove(path).is_some() {
            self.saved_file.mark_changed();
        }
    }

    /// Writes the saved originals when they changed.
    fn save_originals(&mut self) {
        let now = Instant::now();
        if !self.saved_file.due(now, Duration::ZERO) {
            return;
        }
        if let Err(error) = self.saved_file.write(&self.saved, now) {
            error!("{error}; after a restart the limits could not be given back exactly");
        }
    }

    fn reload(&mut self, policy: Policy) {
        let started = Instant::now();
        self.policy = policy;
        let paths: Vec<String> = self.applied.keys().cloned().collect();
        for path in paths {
            let wanted = self.policy_for(&path).cloned();
            if wanted.as_ref() != self.applied.get(&path).map(|a| &a.policy) {
                self.release(&path);
            }
        }
        self.apply_all();
        info!(
            took_ms = started.elapsed().as_millis() as u64,
            "policy reloaded"
        );
    }

    /// The first policy, in file order, that matches `path`.
    fn policy_for(&self, path: &str) -> Option<&ServicePolicy> {
        self.policy
            .services
            .iter()
            .find(|service| service.target.matches(path))
    }

    /// Brings one cgroup in line with the policy.
    fn reconcile(&mut self, path: &str) {
        if self.applied.contains_key(path) || !self.fs.exists(path) {
            return;
        }
        let Some(policy) = self.policy_for(path).cloned() else {
            return;
        };
        let service = service_name(path).to_string();
        if self.backend == Backend::Auto && self.systemd_booted && is_systemd_unit_path(path) {
            error!(
                service,
                policy = policy.name,
                "refusing to write the cgroup of a systemd unit: systemd owns it and would undo \
                 the limits; set `services.cgroup_backend: cgroupfs` to write it anyway"
            );
            self.metrics.action(&service, Action::RefusedSystemdUnit);
            self.unapplied.insert(
                path.to_string(),
                (
                    policy.name,
                    ServiceOutcome::Refused {
                        reason:
                            "a systemd unit's cgroup: systemd owns it (services.cgroup_backend: \
                                 cgroupfs writes it anyway)"
                                .into(),
                    },
                ),
            );
            return;
        }
        let desired = policy.limits.to_cgroup_files();
        if policy.mode == Mode::Observe {
            for (file, value) in &desired {
                let current = self.fs.read(path, file).unwrap_or_else(|_| "?".into());
                if current != *value {
                    info!(
                        service,
                        policy = policy.name,
                        file,
                        current,
                        would_set = value,
                        "observe: would set limit"
                    );
                }
            }
            self.metrics.action(&service, Action::WouldSetLimits);
            self.applied.insert(
                path.to_string(),
                self.tracked(policy, Vec::new(), Vec::new()),
            );
            return;
        }
        match self.write_limits(path, &desired) {
            Ok((expected, originals)) => {
                let saved = originals
                    .iter()
                    .map(|(file, value)| (file.to_string(), value.clone()))
                    .collect();
                self.saved.cgroups.insert(path.to_string(), saved);
                self.saved_file.mark_changed();
                info!(service, policy = policy.name, limits = ?desired, "limits applied");
                self.metrics.action(&service, Action::SetLimits);
                self.applied
                    .insert(path.to_string(), self.tracked(policy, expected, originals));
            }
            Err(reason) => {
                error!(
                    service,
                    policy = policy.name,
                    "cannot apply limits: {reason}"
                );
                self.metrics.action(&service, Action::Failed);
                self.unapplied.insert(
                    path.to_string(),
                    (
                        policy.name,
                        ServiceOutcome::Failed {
                            reason: reason.to_string(),
                        },
                    ),
                );
            }
        }
    }

    fn tracked(&self, policy: ServicePolicy, expected: Files, originals: Files) -> Applied {
        let guard = policy.graceful_stop.map(|stop| {
            MemoryGuard::new(GuardLimits {
                threshold_bytes: stop.terminate_above,
                sustain: stop.sustained_for,
                grace: stop.grace,
            })
        });
        Applied {
            policy,
            expected,
            originals,
            guard,
            terminated: None,
        }
    }

    /// Writes `desired`; returns what the kernel reads back and what was there before.
    fn write_limits(&self, path: &str, desired: &Files) -> Result<(Files, Files), crate::Error> {
        let needed: Vec<&str> = CONTROLLERS
            .iter()
            .copied()
            .filter(|controller| desired.iter().any(|(file, _)| file.starts_with(controller)))
            .collect();
        self.fs.enable_controllers(path, &needed)?;
        // Written before a restart: what is there now is Sentinel's own value.
        let saved = self.saved_files(path);
        let mut originals = Vec::new();
        let mut expected = Vec::new();
        for (file, value) in desired {
            let original = match saved.iter().find(|(saved, _)| saved == file) {
                Some((_, original)) => original.clone(),
                None => self.fs.read(path, file)?,
            };
            originals.push((*file, original));
            self.fs.write(path, file, value)?;
            // The kernel may normalise a value (page-aligned sizes); keep what it reads back.
            expected.push((*file, self.fs.read(path, file)?));
        }
        Ok((expected, originals))
    }

    /// Stops enforcing on `path`, restoring its previous limits if it still exists.
    fn release(&mut self, path: &str) {
        let Some(applied) = self.applied.remove(path) else {
            return;
        };
        self.forget_originals(path);
        if !self.fs.exists(path) {
            return;
        }
        self.restore(path, &applied.originals);
        info!(
            service = service_name(path),
            policy = applied.policy.name,
            "policy released; previous limits restored"
        );
        self.metrics
            .action(service_name(path), Action::RestoredLimits);
        self.publish();
    }

    /// Writes `originals` back to `path`.
    fn restore(&self, path: &str, originals: &Files) {
        // Reverse order: memory.high before memory.max, so the pair stays consistent.
        for (file, value) in originals.iter().rev() {
            if let Err(error) = self.fs.write(path, file, value) {
                warn!(
                    service = service_name(path),
                    file, "cannot restore the previous limit: {error}"
                );
            }
        }
    }

    fn tick(&mut self) {
        let gone: Vec<String> = self
            .applied
            .keys()
            .filter(|path| !self.fs.exists(path))
            .cloned()
            .collect();
        for path in &gone {
            self.applied.remove(path);
            self.forget_originals(path);
        }
        let unapplied_before = self.unapplied.len();
        self.unapplied.retain(|path, _| self.fs.exists(path));
        let now = Instant::now();
        let paths: Vec<String> = self.applied.keys().cloned().collect();
        for path in paths {
            self.restore_drift(&path);
            self.guard_memory(&path, now);
        }
        if !gone.is_empty() || self.unapplied.len() != unapplied_before {
            self.publish();
        }
    }

    /// Puts back limits someone changed behind Sentinel's back.
    fn restore_drift(&mut self, path: &str) {
        let Some(applied) = self.applied.get(path) else {
            return;
        };
        let service = service_name(path).to_string();
        for (file, expected) in &applied.expected {
            let Ok(current) = self.fs.read(path, file) else {
                continue;
            };
            if current == *expected {
                continue;
            }
            warn!(
                service,
                file, current, expected, "limit changed behind Sentinel's back; restoring it"
            );
            self.metrics.drift(&service);
            if let Err(error) = self.fs.write(path, file, expected) {
                error!(service, file, "cannot restore the limit: {error}");
            }
        }
    }

    fn guard_memory(&mut self, path: &str, now: Instant) {
        let service = service_name(path).to_string();
        let memory = self
            .fs
            .read(path, "memory.current")
            .ok()
            .and_then(|value| value.parse().ok());
        let Some(applied) = self.applied.get_mut(path) else {
            return;
        };
        let (Some(guard), Some(memory)) = (applied.guard.as_mut(), memory) else {
            return;
        };
        let observe = applied.policy.mode == Mode::Observe;
        match guard.tick(now, memory) {
            None => {}
            Some(GuardAction::Terminate) => {
                let threshold = guard.limits().threshold_bytes;
                let Some(pid) = largest_process(&self.fs.processes(path)) else {
                    return;
                };
                if observe {
                    info!(
                        service,
                        pid, memory, threshold, "observe: would send SIGTERM"
                    );
                    self.metrics.action(&service, Action::WouldTerminate);
                    return;
                }
                match ProcessHandle::open_in_cgroup(pid, path) {
                    Ok(None) => info!(
                        service,
                        pid, "the largest process left the cgroup before it could be signalled"
                    ),
                    Ok(Some(process)) => {
                        warn!(
                            service,
                            pid,
                            memory,
                            threshold,
                            "memory above terminate_above: sending SIGTERM to the largest process"
                        );
                        if process.signal(libc::SIGTERM).unwrap_or(false) {
                            self.metrics.action(&service, Action::Terminate);
                        }
                        applied.terminated = Some(process);
                    }
                    Err(error) => warn!(service, pid, "cannot open the process: {error}"),
                }
            }
            Some(GuardAction::Kill) => {
                let Some(process) = applied.terminated.take() else {
                    return;
                };
                if observe {
                    return;
                }
                match process.signal(libc::SIGKILL) {
                    Ok(true) => {
                        warn!(
                            service,
                            pid = process.pid,
                            "still running after the grace period: sent SIGKILL"
                        );
                        self.metrics.action(&service, Action::Kill);
                    }
                    Ok(false) => info!(service, pid = process.pid, "stopped after SIGTERM"),
                    Err(error) => error!(service, pid = process.pid, "SIGKILL failed: {error}"),
                }
            }
        }
    }

    fn publish(&self) {
        let cgroups = self
            .applied
            .iter()
            .map(|(path, applied)| {
                let memory_max = applied
                    .expected
                    .iter()
                    .chain(applied.policy.limits.to_cgroup_files().iter())
                    .find(|(file, _)| *file == "memory.max")
                    .map(|(_, value)| value.clone());
                (
                    path.clone(),
                    AppliedSummary {
                        policy: applied.policy.name.clone(),
                        mode: applied.policy.mode,
                        memory_max,
                    },
                )
            })
            .collect();
        self.view.lock().expect("applied view lock").cgroups = cgroups;
        self.states.send_replace(self.policy_states());
    }

    fn policy_states(&self) -> Vec<PolicyState> {
        let applied = self.applied.iter().map(|(path, applied)| {
            let outcome = match applied.policy.mode {
                Mode::Enforce => ServiceOutcome::Enforcing,
                Mode::Observe => ServiceOutcome::Observing,
            };
            (path, &applied.policy.name, outcome)
        });
        let unapplied = self
            .unapplied
            .iter()
            .map(|(path, (policy, outcome))| (path, policy, outcome.clone()));
        let mut states: Vec<PolicyState> = self
            .policy
            .services
            .iter()
            .map(|policy| PolicyState {
                name: policy.name.clone(),
                mode: policy.mode,
                services: Vec::new(),
            })
            .collect();
        for (path, policy, outcome) in applied.chain(unapplied) {
            if let Some(state) = states.iter_mut().find(|state| state.name == *policy) {
                state.services.push(ServiceState {
                    service: service_name(path).to_string(),
                    outcome,
                });
            }
        }
        for state in &mut states {
            state.services.sort_by(|a, b| a.service.cmp(&b.service));
        }
        states
    }
}

/// A cgroup systemd manages: one whose path names a unit (`.service`, `.scope`, `.slice`).
fn is_systemd_unit_path(path: &str) -> bool {
    path.split('/').any(|segment| {
        [".service", ".scope", ".slice"]
            .iter()
            .any(|s| segment.ends_with(s))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_systemd_unit_cgroups() {
        assert!(is_systemd_unit_path("/system.slice/nginx.service"));
        assert!(is_systemd_unit_path(
            "/user.slice/user-1000.slice/session-2.scope"
        ));
        assert!(!is_systemd_unit_path("/workers/job-1"));
    }
}
