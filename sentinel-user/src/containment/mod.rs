//! Containment of a service: a policy's `exec.allow` lists the executables its cgroups may run,
//! and `on_violation` says what happens when one of them runs anything else.
//!
//! The kernel side checks every exec in a contained cgroup against the allow list (by device
//! and inode of the file it runs) and, for `kill` in enforce mode, kills the process before its
//! first instruction. Every violation reaches this thread, which owns the contained cgroups,
//! the allow lists in the kernel, and the services held now (frozen or isolated): it audits,
//! counts, freezes or isolates, and releases on `sentinel release SERVICE`.

mod allow;
mod metrics;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap},
    path::PathBuf,
    sync::mpsc::RecvTimeoutError,
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{HashMap as KernelMap, MapData};
pub use metrics::ContainmentMetrics;
use sentinel_common::{AllowedExecutable, ContainedCgroup};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tracing::{error, info, warn};

use crate::{
    Error,
    cgroup::{cgroupfs::CgroupFs, walk_hierarchy},
    files::{self, DirectoryWatch},
    firewall::Isolation,
    policy::{Mode, OnViolation, Policy, ServicePolicy},
    queue::{Inbox, Queue},
    ssh_guard::audit::{AuditLog, rfc3339},
    systemd::SystemdBus,
};

/// How often the allowed files are looked at even without a change notice.
const TICK: Duration = Duration::from_secs(1);

pub enum Input {
    Violation(Violation),
    /// A cgroup was created (path relative to the cgroup2 root).
    CgroupCreated {
        id: u64,
        path: String,
    },
    CgroupRemoved(u64),
    /// A cgroup's path did not fit in its event: the hierarchy is read again.
    Rescan,
    /// A directory holding an allowed executable changed.
    FilesChanged,
    /// A new, already validated policy replaces the current one.
    Reload(Policy),
    /// `sentinel release SERVICE`: the reply names what was undone.
    Release {
        service: String,
        reply: oneshot::Sender<Result<String, String>>,
    },
    Stop,
}

/// An exec the kernel found outside its policy's allow list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub pid: u32,
    pub cgroup_id: u64,
    /// Index of the policy in the file.
    pub policy: u32,
    /// The kernel sent SIGKILL before the process ran.
    pub killed: bool,
    pub dev: u64,
    pub ino: u64,
    pub comm: String,
    /// The path the exec was given (for a `#!` script, the script's).
    pub executable: String,
}

/// A service held by its containment, as `sentinel status` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainedService {
    /// cgroup path relative to the cgroup2 root.
    pub service: String,
    pub policy: String,
    /// `freeze` or `isolate`.
    pub action: String,
    /// RFC 3339; when the containment was found at start (an isolation kept in nftables, a
    /// frozen cgroup), the daemon's start.
    pub since: String,
    /// What it ran that was not allowed; empty when found at start.
    pub executable: String,
}

/// One JSON line of the audit log per violation and per release.
#[derive(Serialize)]
struct AuditEntry<'a> {
    time: String,
    /// `alert`, `kill`, `freeze`, `isolate`, `would_kill`, `would_freeze`, `would_isolate`,
    /// `release`, or `failed` (with `error`).
    action: &'a str,
    service: &'a str,
    policy: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comm: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    executable: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

impl AuditEntry<'_> {
    /// What the events pane shows after the service: `/bin/sh (pid 42)`, and why it failed.
    fn detail(&self) -> String {
        let mut detail = self.executable.unwrap_or_default().to_owned();
        if let Some(pid) = self.pid {
            detail.push_str(&format!(" (pid {pid})"));
        }
        if let Some(error) = &self.error {
            detail.push_str(&format!(": {error}"));
        }
        detail.trim_start().to_owned()
    }
}

/// The kernel's view of containment, written only by [`Containment`].
pub struct KernelMaps {
    pub cgroups: KernelMap<MapData, u64, ContainedCgroup>,
    pub allowed: KernelMap<MapData, AllowedExecutable, u8>,
}

/// The shape of what a violation leads to, decided from the policy and the mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Response {
    Alert,
    /// The kernel killed it (or, `killed: false`, could not).
    Killed {
        killed: bool,
    },
    Hold(OnViolation),
    /// Observe mode: count and audit what enforce mode would do.
    Would(OnViolation),
}

fn respond(on_violation: OnViolation, mode: Mode, killed: bool) -> Response {
    match (on_violation, mode) {
        (OnViolation::Alert, _) => Response::Alert,
        (action, Mode::Observe) => Response::Would(action),
        (OnViolation::Kill, Mode::Enforce) => Response::Killed { killed },
        (action, Mode::Enforce) => Response::Hold(action),
    }
}

pub struct Containment {
    cgroupfs: CgroupFs,
    kernel: KernelMaps,
    policy: Policy,
    /// What the kernel maps hold now.
    allowed: BTreeSet<AllowedExecutable>,
    cgroups: HashMap<u64, (String, ContainedCgroup)>,
    /// Frozen or isolated services, by service.
    held: BTreeMap<String, ContainedService>,
    /// Sentinel's isolation table, set up when a policy first needs it.
    isolation: Option<Isolation>,
    /// Where the isolation table lives: a network namespace (`ssh_guard.netns`), or the
    /// daemon's own; and the cgroup2 mount, which nft names cgroups under.
    isolation_netns: Option<PathBuf>,
    audit: Option<AuditLog>,
    metrics: ContainmentMetrics,
    /// The directories of the allowed executables, for upgrades.
    files: DirectoryWatch,
    /// On a host booted with systemd: a unit's cgroup is frozen through systemd
    /// (`FreezeUnit`), never behind its back.
    systemd: Option<SystemdBus>,
    /// Allowed paths found missing, reported once until they come back.
    missing: BTreeSet<PathBuf>,
    published: watch::Sender<Vec<ContainedService>>,
}

impl Containment {
    /// Takes over the kernel's maps and contains the cgroups `policy` names. `netns` is where
    /// isolation rules go (the daemon's own namespace when `None`).
    /// `systemd` is the bus to freeze units through, on a host booted with systemd.
    pub fn new(
        cgroupfs: CgroupFs,
        kernel: KernelMaps,
        policy: Policy,
        netns: Option<PathBuf>,
        systemd: Option<SystemdBus>,
        audit: Option<AuditLog>,
        metrics: ContainmentMetrics,
    ) -> Result<Self, Error> {
        let files = DirectoryWatch::new().map_err(|errno| Error::ExecWatch(errno.into()))?;
        let mut containment = Self {
            cgroupfs,
            kernel,
            policy,
            allowed: BTreeSet::new(),
            cgroups: HashMap::new(),
            held: BTreeMap::new(),
            isolation: None,
            isolation_netns: netns,
            audit,
            metrics,
            files,
            systemd,
            missing: BTreeSet::new(),
            published: watch::Sender::new(Vec::new()),
        };
        containment.find_held();
        containment.sync_allowed();
        containment.rescan();
        containment.publish();
        Ok(containment)
    }

    /// The services held now, republished at every change.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ContainedService>> {
        self.published.subscribe()
    }

    /// Blocks until a directory holding an allowed executable changes, then tells `inputs`;
    /// for a thread of its own, for the daemon's whole life.
    pub fn watch_files(&self, inputs: Queue<Input>) -> impl FnOnce() -> Result<(), Error> + use<> {
        let waiter = self.files.waiter();
        move || {
            // Waits for room: a missed change could leave an upgraded binary unlisted.
            waiter
                .notify(|| inputs.send(Input::FilesChanged).is_ok())
                .map_err(|errno| Error::ExecWatch(errno.into()))
        }
    }

    pub fn run(mut self, inputs: Inbox<Input>) {
        let mut next_tick = Instant::now() + TICK;
        loop {
            // With no allow list there are no files to look at: no timer wakes the thread.
            let wait = if self.contains_any() {
                next_tick.saturating_duration_since(Instant::now())
            } else {
                Duration::MAX
            };
            match inputs.recv_timeout(wait) {
                Ok(Input::Violation(violation)) => self.violation(&violation),
                Ok(Input::CgroupCreated { id, path }) => self.cgroup_created(id, &path),
                Ok(Input::CgroupRemoved(id)) => self.cgroup_removed(id),
                Ok(Input::Rescan) => self.rescan(),
                Ok(Input::FilesChanged) => self.sync_allowed(),
                Ok(Input::Reload(policy)) => {
                    self.policy = policy;
                    self.sync_allowed();
                    self.rescan();
                }
                Ok(Input::Release { service, reply }) => {
                    let _ = reply.send(self.release(&service));
                }
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => {
                    self.sync_allowed();
                    next_tick = Instant::now() + TICK;
                }
            }
        }
    }

    /// Whether any policy has an allow list.
    fn contains_any(&self) -> bool {
        self.policy
            .services
            .iter()
            .any(|policy| policy.containment.is_some())
    }

    /// The cgroups a containment policy applies to; none are looked for while no policy has an
    /// allow list.
    fn contained_paths(&self) -> Vec<String> {
        if !self.contains_any() {
            return Vec::new();
        }
        walk_hierarchy(self.cgroupfs.root())
            .into_iter()
            .map(|(_, path)| path)
            .filter(|path| self.policy_of(path).is_some())
            .collect()
    }

    /// The containment policy that applies to `path`: the first matching policy in file order
    /// applies, as for limits, and contains only when it has `exec.allow`.
    fn policy_of(&self, path: &str) -> Option<(u32, &ServicePolicy)> {
        let (index, policy) = self
            .policy
            .services
            .iter()
            .enumerate()
            .find(|(_, policy)| policy.target.matches(path))?;
        policy.containment.as_ref()?;
        Some((index as u32, policy))
    }

    fn contained_cgroup(&self, path: &str) -> Option<ContainedCgroup> {
        let (index, policy) = self.policy_of(path)?;
        let kill = policy.mode == Mode::Enforce
            && policy.containment.as_ref()?.on_violation == OnViolation::Kill;
        Some(ContainedCgroup {
            policy: index,
            kill: u32::from(kill),
        })
    }

    /// Reads the hierarchy and makes the kernel's contained cgroups match the policies.
    fn rescan(&mut self) {
        let found = if self.contains_any() {
            walk_hierarchy(self.cgroupfs.root())
        } else {
            // Nothing to walk for: every contained cgroup is let go below.
            Vec::new()
        };
        let mut wanted = HashMap::new();
        for (id, path) in found {
            if let Some(contained) = self.contained_cgroup(&path) {
                wanted.insert(id, (service_of(&path), contained));
            }
        }
        for (&id, (service, contained)) in &wanted {
            if self.cgroups.get(&id) != Some(&(service.clone(), *contained)) {
                self.insert_cgroup(id, service, *contained);
            }
        }
        let stale: Vec<u64> = self
            .cgroups
            .keys()
            .filter(|id| !wanted.contains_key(id))
            .copied()
            .collect();
        for id in stale {
            self.cgroup_removed(id);
        }
    }

    fn cgroup_created(&mut self, id: u64, path: &str) {
        if let Some(contained) = self.contained_cgroup(path) {
            self.insert_cgroup(id, &service_of(path), contained);
        }
    }

    fn insert_cgroup(&mut self, id: u64, service: &str, contained: ContainedCgroup) {
        match self.kernel.cgroups.insert(id, contained, 0) {
            Ok(()) => {
                info!(
                    service,
                    kill = contained.kill != 0,
                    "exec containment watches the service"
                );
                self.cgroups.insert(id, (service.to_owned(), contained));
            }
            Err(error) => {
                error!(
                    service,
                    "cannot contain the service: the kernel refused its entry: {error}"
                );
                self.metrics.action(service, "failed");
            }
        }
    }

    fn cgroup_removed(&mut self, id: u64) {
        if self.cgroups.remove(&id).is_some() {
            // Already gone when the kernel removed the cgroup first; nothing else to undo.
            let _ = self.kernel.cgroups.remove(&id);
        }
    }

    /// Makes the kernel's allow lists match the files the allowed paths lead to now. New
    /// entries go in before stale ones leave, so an allowed file is never missing in between.
    fn sync_allowed(&mut self) {
        let mut wanted = BTreeSet::new();
        let mut missing = BTreeSet::new();
        let mut directories = BTreeSet::new();
        for (index, policy) in self.policy.services.iter().enumerate() {
            let Some(containment) = &policy.containment else {
                continue;
            };
            missing.extend(allow::resolve(
                index as u32,
                &containment.allow,
                &mut wanted,
            ));
            directories.extend(files::directories(&containment.allow));
        }
        for path in missing.difference(&self.missing) {
            warn!(path = %path.display(), "an allowed executable does not exist (yet); it is listed once it does");
        }
        self.missing = missing;
        self.files.watch(&directories);
        if wanted == self.allowed {
            return;
        }
        for entry in wanted.difference(&self.allowed) {
            if let Err(error) = self.kernel.allowed.insert(entry, 1, 0) {
                error!("cannot list an allowed executable in the kernel: {error}");
            }
        }
        for entry in self.allowed.difference(&wanted) {
            let _ = self.kernel.allowed.remove(entry);
        }
        info!(
            files = wanted.len(),
            "allowed executables listed for the kernel"
        );
        self.allowed = wanted;
        self.metrics.allow_list_updates.inc();
    }

    fn violation(&mut self, violation: &Violation) {
        let Some((service, _)) = self.cgroups.get(&violation.cgroup_id).cloned() else {
            warn!(
                pid = violation.pid,
                executable = violation.executable,
                "an exec violation in a cgroup no longer contained"
            );
            return;
        };
        let Some(policy) = self.policy.services.get(violation.policy as usize).cloned() else {
            return;
        };
        let Some(containment) = &policy.containment else {
            return;
        };
        self.metrics.violation(&service);
        let response = respond(containment.on_violation, policy.mode, violation.killed);
        let (action, outcome) = match response {
            Response::Alert => ("alert".to_owned(), Ok(())),
            Response::Killed { killed: true } => ("kill".to_owned(), Ok(())),
            Response::Killed { killed: false } => (
                "kill".to_owned(),
                Err("the kernel could not send SIGKILL".to_owned()),
            ),
            Response::Would(action) => (format!("would_{}", action.as_str()), Ok(())),
            Response::Hold(action) => (
                action.as_str().to_owned(),
                self.hold(&service, &policy.name, action, &violation.executable),
            ),
        };
        match &outcome {
            Ok(()) => warn!(
                service,
                policy = policy.name,
                pid = violation.pid,
                comm = violation.comm,
                executable = violation.executable,
                action,
                "a contained service executed a file its policy does not allow"
            ),
            Err(reason) => error!(
                service,
                policy = policy.name,
                pid = violation.pid,
                executable = violation.executable,
                action,
                reason,
                "a contained service executed a file its policy does not allow, and the \
                 containment failed"
            ),
        }
        let counted = if outcome.is_ok() {
            action.as_str()
        } else {
            "failed"
        };
        self.metrics.action(&service, counted);
        self.audit(&AuditEntry {
            time: rfc3339(SystemTime::now()),
            action: counted,
            service: &service,
            policy: &policy.name,
            pid: Some(violation.pid),
            comm: Some(&violation.comm),
            executable: Some(&violation.executable),
            error: outcome.err(),
        });
    }

    /// Freezes or isolates `service`, unless it is held already.
    fn hold(
        &mut self,
        service: &str,
        policy: &str,
        action: OnViolation,
        executable: &str,
    ) -> Result<(), String> {
        if self.held.contains_key(service) {
            return Ok(());
        }
        match action {
            OnViolation::Freeze => self.freeze(service, true)?,
            OnViolation::Isolate => self
                .isolation()?
                .isolate(service)
                .map_err(|error| error.to_string())?,
            OnViolation::Alert | OnViolation::Kill => return Ok(()),
        }
        self.metrics.set_contained(service, action.as_str(), true);
        self.held.insert(
            service.to_owned(),
            ContainedService {
                service: service.to_owned(),
                policy: policy.to_owned(),
                action: action.as_str().to_owned(),
                since: rfc3339(SystemTime::now()),
                executable: executable.to_owned(),
            },
        );
        self.publish();
        Ok(())
    }

    /// `sentinel release SERVICE`: thaws or lifts the isolation; a service that is not held is
    /// refused, naming those that are.
    fn release(&mut self, service: &str) -> Result<String, String> {
        let service = service.trim_matches('/');
        let Some(held) = self.held.get(service).cloned() else {
            let held: Vec<&str> = self.held.keys().map(String::as_str).collect();
            return Err(if held.is_empty() {
                format!("{service:?} is not contained; no service is")
            } else {
                format!(
                    "{service:?} is not contained; contained: {}",
                    held.join(", ")
                )
            });
        };
        let undone = match held.action.as_str() {
            "freeze" => self.freeze(service, false),
            _ => self.isolation().and_then(|isolation| {
                isolation
                    .release(service)
                    .map_err(|error| error.to_string())
            }),
        };
        if let Err(reason) = undone {
            error!(service, reason, "cannot release the service");
            self.metrics.action(service, "failed");
            return Err(format!("cannot release {service}: {reason}"));
        }
        self.held.remove(service);
        self.metrics.set_contained(service, &held.action, false);
        self.metrics.action(service, "release");
        self.audit(&AuditEntry {
            time: rfc3339(SystemTime::now()),
            action: "release",
            service,
            policy: &held.policy,
            pid: None,
            comm: None,
            executable: None,
            error: None,
        });
        info!(service, action = held.action, "service released");
        self.publish();
        Ok(match held.action.as_str() {
            "freeze" => format!("thawed {service}"),
            _ => format!("lifted the isolation of {service}"),
        })
    }

    /// Services held before this start: isolations kept in nftables, and frozen cgroups of
    /// contained services (a freeze survives the daemon; so does the way to undo it).
    fn find_held(&mut self) {
        let since = rfc3339(SystemTime::now());
        let mut found: Vec<(String, OnViolation)> = Vec::new();
        let isolating = self.policy.services.iter().any(|policy| {
            policy
                .containment
                .as_ref()
                .is_some_and(|c| c.on_violation == OnViolation::Isolate)
        });
        if isolating {
            match self
                .isolation()
                .and_then(|isolation| isolation.isolated().map_err(|error| error.to_string()))
            {
                Ok(isolated) => {
                    found.extend(isolated.into_iter().map(|s| (s, OnViolation::Isolate)));
                }
                Err(reason) => warn!(reason, "cannot read the isolations in force"),
            }
        }
        for path in self.contained_paths() {
            let frozen = self
                .cgroupfs
                .read(&path, "cgroup.freeze")
                .is_ok_and(|v| v == "1");
            if frozen {
                found.push((service_of(&path), OnViolation::Freeze));
            }
        }
        for (service, action) in found {
            let policy = self
                .policy_of(&service)
                .map_or_else(String::new, |(_, policy)| policy.name.clone());
            warn!(
                service,
                action = action.as_str(),
                "a service is still contained; `sentinel release` lifts it"
            );
            self.metrics.set_contained(&service, action.as_str(), true);
            self.held.insert(
                service.clone(),
                ContainedService {
                    service,
                    policy,
                    action: action.as_str().to_owned(),
                    since: since.clone(),
                    executable: String::new(),
                },
            );
        }
    }

    /// Freezes (or thaws) `service`: through systemd when a unit owns its cgroup, so that
    /// systemd knows the unit is frozen and `systemctl thaw` works too; directly otherwise.
    fn freeze(&mut self, service: &str, frozen: bool) -> Result<(), String> {
        if let Some(systemd) = &mut self.systemd {
            let unit = systemd
                .unit_of_cgroup(service)
                .map_err(|error| error.to_string())?;
            if let Some(unit) = unit {
                let done = if frozen {
                    systemd.freeze_unit(&unit)
                } else {
                    systemd.thaw_unit(&unit)
                };
                return done.map_err(|error| error.to_string());
            }
        }
        let value = if frozen { "1" } else { "0" };
        self.cgroupfs
            .write(service, "cgroup.freeze", value)
            .map_err(|error| error.to_string())
    }

    /// The isolation table, set up on first use.
    fn isolation(&mut self) -> Result<&Isolation, String> {
        if self.isolation.is_none() {
            let opened = Isolation::open(self.isolation_netns.as_deref(), self.cgroupfs.root())
                .map_err(|error| error.to_string())?;
            self.isolation = Some(opened);
        }
        Ok(self.isolation.as_ref().expect("set up above"))
    }

    /// Appends `entry` to the audit log and to the recent events.
    fn audit(&mut self, entry: &AuditEntry<'_>) {
        if let Some(log) = &mut self.audit
            && let Err(error) = log.append(entry)
        {
            error!("cannot write the audit log: {error}");
        }
        self.metrics.recent.record_at(
            entry.time.clone(),
            entry.action,
            entry.service,
            entry.detail(),
        );
    }

    fn publish(&self) {
        self.published
            .send_replace(self.held.values().cloned().collect());
    }
}

/// A cgroup path as the services of metrics and status name it: no leading `/`.
fn service_of(path: &str) -> String {
    path.trim_start_matches('/').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observe_mode_only_would_act_and_alert_never_holds() {
        use OnViolation::*;
        assert_eq!(respond(Alert, Mode::Enforce, false), Response::Alert);
        assert_eq!(respond(Alert, Mode::Observe, false), Response::Alert);
        assert_eq!(respond(Kill, Mode::Observe, false), Response::Would(Kill));
        assert_eq!(
            respond(Freeze, Mode::Observe, false),
            Response::Would(Freeze)
        );
        assert_eq!(
            respond(Isolate, Mode::Observe, false),
            Response::Would(Isolate)
        );
        assert_eq!(
            respond(Kill, Mode::Enforce, true),
            Response::Killed { killed: true }
        );
        assert_eq!(
            respond(Freeze, Mode::Enforce, false),
            Response::Hold(Freeze)
        );
        assert_eq!(
            respond(Isolate, Mode::Enforce, false),
            Response::Hold(Isolate)
        );
    }
}
