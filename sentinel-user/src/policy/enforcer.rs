//! Enforcement: sets each matching cgroup's limits, keeps them there, restores what was there
//! before when a policy lets go of a cgroup, and stops runaway processes before the kernel's
//! OOM killer does.
//!
//! A systemd unit's cgroup gets its limits through systemd (the `systemd` module), any other
//! cgroup directly in cgroupfs. The enforcer runs on its own thread and owns every limit it
//! sets and what it must put back; everything else talks to it through [`Input`]. What it
//! applied is published in an [`AppliedView`] for `/metrics` and for OOM log lines, and how
//! each policy stands on each cgroup (applied, refused, failed) in [`PolicyStates`], listed
//! for `sentinel status`.

use std::{
    borrow::Cow,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex, mpsc::RecvTimeoutError},
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tracing::{debug, error, info, warn};

use super::{
    Mode, Policy, ServicePolicy,
    drift::{Changed, DriftWatch, Sweep},
    metrics::{Action, PolicyMetrics},
};
use crate::{
    Error,
    cgroup::{
        CgroupBackend, CgroupPath,
        cgroupfs::{CONTROLLERS, CgroupFs, SubtreeControls},
        find_cgroup2_mount,
        guardian::{GuardAction, GuardLimits, MemoryGuard, ProcessHandle, largest_process},
        service_name, walk_hierarchy,
    },
    queue::{Inbox, Queue},
    state::StateFile,
    systemd::{
        self, RUNTIME_CONTROL_DIR, RuntimeDropIns, SystemdBus, UnitProperty, UnitRecord,
        cgroup_files, unit_properties,
    },
};

/// In `--state-dir`: what Sentinel must put back.
const ORIGINALS_FILE: &str = "cgroup-originals.json";
/// How often the cgroups written since the last tick are checked for drift, and memory guards
/// are evaluated.
const TICK: Duration = Duration::from_millis(500);
/// How long systemd gets to write a unit's cgroup after accepting its properties (it writes
/// them from its event loop, just after answering).
const SYSTEMD_APPLY_WAIT: Duration = Duration::from_secs(5);
const SYSTEMD_APPLY_POLL: Duration = Duration::from_millis(20);
/// How often cgroups whose limits systemd did not take, and units systemd did not give their
/// previous limits back, are tried again.
const SYSTEMD_RETRY: Duration = Duration::from_secs(10);
/// Services of one policy a pass names one by one in the recent events; past this, the policy
/// is named once with their count.
const PASS_EVENTS_PER_POLICY: usize = 8;
/// Cgroups a pass writes between two reads of the kernel's notices.
const OWN_NOTICES_BATCH: usize = 64;
/// How often the hierarchy is walked for cgroups whose creation the enforcer was not told of
/// (its queue was full, the path did not fit in the kernel's record, or the record was lost):
/// such a cgroup gets its policy at most this late. A walk reads one directory entry and one
/// `stat` per cgroup.
const CATCH_UP: Duration = Duration::from_secs(300);
/// The soonest a walk follows the last when cgroups with paths too long for the kernel's record
/// ask for one: a user making such cgroups in a subtree delegated to them cannot keep the
/// enforcer walking.
const RESCAN_SPACING: Duration = Duration::from_secs(1);

pub enum Input {
    /// A cgroup was created (path relative to the cgroup2 root).
    CgroupCreated(String),
    /// A cgroup was created whose path the kernel's record could not hold: the hierarchy is
    /// walked as soon as [`RESCAN_SPACING`] allows.
    Rescan,
    /// A new, already validated policy replaces the current one.
    Reload(Policy),
    /// The kernel has notices of writes to kept cgroups (see [`DriftWatch::wake_with`]).
    Noticed,
    Stop,
}

/// What is applied where, shared with the metrics collector and the event handler.
#[derive(Debug, Default)]
pub struct AppliedView {
    /// By cgroup path: the policy in force there. Replaced whole at each change, so that a
    /// scrape or a stats pass takes it without copying thousands of entries under the lock.
    pub cgroups: Arc<BTreeMap<CgroupPath, AppliedSummary>>,
}

/// The policy in force on a cgroup; all but the id shared by the cgroups of one policy that
/// keep the same `memory.max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppliedSummary {
    pub policy: Arc<str>,
    pub mode: Mode,
    /// `memory.max` as written (`max` or bytes), for OOM reports.
    pub memory_max: Option<Arc<str>>,
    /// The cgroup's id when the policy was applied (a restarted service's is new): what the
    /// kernel's records of resource figures are found by.
    pub id: u64,
}

/// A policy, in file order, and how it stands on each cgroup it matches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyState {
    pub name: String,
    pub mode: Mode,
    pub services: Vec<ServiceState>,
}

/// How each policy stands on each cgroup it matches, as of the last change. Listed as
/// [`PolicyState`]s only when asked (`sentinel status`): listing thousands of services anew at
/// every pass would cost more than the pass.
#[derive(Debug, Clone, Default)]
pub struct PolicyStates {
    /// In file order.
    policies: Vec<Arc<ServicePolicy>>,
    applied: Arc<BTreeMap<CgroupPath, AppliedSummary>>,
    /// Cgroup path, policy name and why it is not applied.
    unapplied: Vec<(String, String, ServiceOutcome)>,
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

/// What Sentinel must put back, kept on disk so that after a crash or reboot Sentinel's own
/// values are never taken for the originals.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct SavedOriginals {
    /// By cgroup path, the values found there before Sentinel first wrote it.
    cgroups: BTreeMap<String, SavedFiles>,
    /// By systemd unit, the runtime drop-ins its properties replaced.
    #[serde(default)]
    units: BTreeMap<String, UnitRecord>,
}

impl SavedOriginals {
    /// The saved originals of `path`, as interface files this version knows.
    fn files(&self, path: &str) -> Files {
        let Some(SavedFiles(saved)) = self.cgroups.get(path) else {
            return Vec::new();
        };
        super::model::INTERFACE_FILES
            .iter()
            .filter_map(|file| {
                let (_, value) = saved.iter().find(|(name, _)| name == file)?;
                Some((*file, value.clone()))
            })
            .collect()
    }
}

/// One cgroup's saved originals by interface file, written as a JSON object. The list is
/// shared by the cgroups that had the same values (see [`Shared`]); a file this version does
/// not know (written by a later one) is kept under its own name.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct SavedFiles(Arc<SavedList>);

type SavedList = Vec<(Cow<'static, str>, String)>;

impl serde::Serialize for SavedFiles {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(file, value)| (file, value)))
    }
}

impl<'de> serde::Deserialize<'de> for SavedFiles {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let files = BTreeMap::<String, String>::deserialize(deserializer)?;
        let named = |file: String| match super::model::INTERFACE_FILES
            .iter()
            .find(|known| **known == file)
        {
            Some(known) => Cow::Borrowed(*known),
            None => Cow::Owned(file),
        };
        Ok(Self(Arc::new(
            files
                .into_iter()
                .map(|(file, value)| (named(file), value))
                .collect(),
        )))
    }
}

/// Values shared by every cgroup that holds the same: the thousands of cgroups of one policy
/// keep, and mostly had before, the same few.
struct Shared<T> {
    values: HashSet<Arc<T>>,
    /// The value shared last, compared before any hash: cgroups met one after the other, in a
    /// pass, nearly always hold the same.
    last: Option<Arc<T>>,
}

impl<T: std::hash::Hash + Eq> Shared<T> {
    fn new() -> Self {
        Self {
            values: HashSet::new(),
            last: None,
        }
    }

    fn share(&mut self, value: T) -> Arc<T> {
        if let Some(last) = &self.last
            && **last == value
        {
            return Arc::clone(last);
        }
        let shared = match self.values.get(&value) {
            Some(shared) => Arc::clone(shared),
            None => {
                let shared = Arc::new(value);
                self.values.insert(Arc::clone(&shared));
                shared
            }
        };
        self.last = Some(Arc::clone(&shared));
        shared
    }

    /// Forgets the values no cgroup holds any more.
    fn prune(&mut self) {
        self.last = None;
        self.values.retain(|value| Arc::strong_count(value) > 1);
    }
}

/// What a policy writes directly, worked out once for the thousands of cgroups that share it.
struct Plan {
    /// Held, so that the plan is found by this policy's pointer and no other's.
    policy: Arc<ServicePolicy>,
    /// Interface files and values, in the order they are written.
    desired: Files,
    /// `desired` as the kernel reads it back (see [`Shared`]).
    expected: Arc<Files>,
    /// The controllers `desired` needs.
    controllers: Vec<&'static str>,
}

struct Applied {
    /// The cgroup's id (its directory's inode number) when the policy was applied: a cgroup
    /// made again at the same path (a restarted service) has a new one.
    id: u64,
    /// Shared with the policy file's entry: thousands of cgroups may hold one policy.
    policy: Arc<ServicePolicy>,
    writer: Writer,
    /// The values Sentinel keeps in place, as the kernel reads them back (see [`Shared`]).
    expected: Arc<Files>,
    guard: Option<MemoryGuard>,
    terminated: Option<ProcessHandle>,
    fix: FixRetry,
}

/// When to try again to put back drift whose fix failed: once per [`SYSTEMD_RETRY`], with its
/// failure logged and counted each time, not at every check. A bus that is down would
/// otherwise fill the journal twice a second.
#[derive(Debug, Default)]
struct FixRetry {
    retry_at: Option<Instant>,
}

impl FixRetry {
    /// Whether a fix may be tried at `now`: none failed, or the retry time has come.
    fn due(&self, now: Instant) -> bool {
        self.retry_at.is_none_or(|at| now >= at)
    }

    /// Whether a fix failed before, so the drift is already reported.
    fn is_retry(&self) -> bool {
        self.retry_at.is_some()
    }

    fn failed(&mut self, now: Instant) {
        self.retry_at = Some(now + SYSTEMD_RETRY);
    }
}

/// A pass over every cgroup (start, reload).
/// Paces the checks that drift notices ask for. A notice after a quiet spell is checked at
/// once; one within a `TICK` of the last check is held until a `TICK` has passed, and the
/// kernel is not asked for more notices meanwhile. So a user who can write a delegated policed
/// cgroup's files gets at most one check per `TICK`, however fast they write.
struct NoticePace {
    next_tick: Instant,
    held: bool,
}

impl NoticePace {
    fn new(now: Instant) -> Self {
        Self {
            next_tick: now + TICK,
            held: false,
        }
    }

    /// Whether a notice at `now` is checked at once; if not, it is held until `next_tick`.
    fn noticed(&mut self, now: Instant) -> bool {
        self.held = now < self.next_tick;
        !self.held
    }

    /// When the held notice is checked; `None` when none is held.
    fn held(&self) -> Option<Instant> {
        self.held.then_some(self.next_tick)
    }

    fn ticked(&mut self, now: Instant) {
        *self = Self::new(now);
    }
}

#[derive(Default)]
struct Pass {
    /// The cgroups each policy's limits were written to: logged and put in the recent events
    /// once per policy when the pass ends, rather than once per cgroup.
    by_policy: BTreeMap<String, Vec<CgroupPath>>,
    /// The cgroups it wrote since the kernel's notices were last read: notices of these are
    /// taken for Sentinel's own writes. Read every [`OWN_NOTICES_BATCH`] cgroups, so that a
    /// write by someone else to a cgroup written earlier in the pass is seen as drift.
    unread: Vec<CgroupPath>,
}

impl Pass {
    /// Reads the kernel's notices. Those of the cgroups the pass wrote since the last read are
    /// its own writes and dropped (checking them would read back every cgroup it just wrote);
    /// any other is drift, checked at the next tick.
    fn read_notices(
        &mut self,
        drift: &mut DriftWatch,
        drifting: &mut BTreeSet<CgroupPath>,
        check_everything: &mut bool,
    ) {
        let own = std::mem::take(&mut self.unread);
        match drift.changed_except(&own) {
            Changed::Cgroups(noticed) => drifting.extend(noticed),
            Changed::Everything => *check_everything = true,
        }
    }
}

/// The new policy, the previous one and the values kept: the cgroups a reload moves alike.
type MoveKey = (*const ServicePolicy, *const ServicePolicy, *const Files);

/// What a reload does with the cgroups of one [`MoveKey`].
enum Move {
    /// The same policy: the cgroups take its new entry, nothing is written.
    Keep,
    /// Written directly before and after, to the same files: only the values that change are
    /// written, in place. The saved originals (of exactly these files) and the drift watch
    /// stay as they are.
    Rewrite(Rewrite),
    /// Anything else: each cgroup is retargeted or let go on its own.
    Retarget,
}

struct Rewrite {
    plan: Arc<Plan>,
    /// The places in `plan` whose values differ from those kept now.
    changes: Vec<usize>,
    /// The cgroups rewritten, for the pass's records.
    cgroups: Vec<CgroupPath>,
}

impl Move {
    /// How the cgroups that keep `kept.expected` under `kept.policy` move to `wanted`; `plans`
    /// holds a plan for every enforced policy.
    fn new(wanted: &Arc<ServicePolicy>, kept: &Applied, plans: &[Arc<Plan>]) -> Self {
        if *wanted == kept.policy {
            return Self::Keep;
        }
        let enforced = kept.policy.mode == Mode::Enforce && wanted.mode == Mode::Enforce;
        let plan = plans.iter().find(|plan| Arc::ptr_eq(&plan.policy, wanted));
        match plan {
            Some(plan)
                if enforced
                    && plan.expected.len() == kept.expected.len()
                    && plan
                        .expected
                        .iter()
                        .zip(kept.expected.iter())
                        .all(|((file, _), (kept, _))| file == kept) =>
            {
                let changes = (plan.expected.iter().zip(kept.expected.iter()))
                    .enumerate()
                    .filter(|(_, ((_, value), (_, kept)))| value != kept)
                    .map(|(place, _)| place)
                    .collect();
                Self::Rewrite(Rewrite {
                    plan: Arc::clone(plan),
                    changes,
                    cgroups: Vec::new(),
                })
            }
            _ => Self::Retarget,
        }
    }
}

impl Rewrite {
    fn write(&self, fs: &CgroupFs, path: &str) -> Result<(), crate::Error> {
        self.changes.iter().try_for_each(|&place| {
            let (file, value) = &self.plan.desired[place];
            fs.write(path, file, value)
        })
    }
}

/// Who writes a cgroup's interface files.
enum Writer {
    /// Sentinel, directly; the saved originals are written back when the policy lets go.
    Cgroupfs,
    /// systemd, from the runtime properties Sentinel sets on the unit.
    Systemd { unit: String },
}

pub struct Enforcer {
    fs: CgroupFs,
    policy: Policy,
    backend: CgroupBackend,
    /// systemd's manager, on a host booted with systemd.
    systemd: Option<SystemdBus>,
    drop_ins: RuntimeDropIns,
    page_size: u64,
    /// The parents' enabled controllers, as seen during the current pass.
    subtree_controls: SubtreeControls,
    /// In path order, as the view publishes them: made from it without a sort or a lookup.
    applied: BTreeMap<CgroupPath, Applied>,
    /// The values kept in place and the saved originals, each list held once.
    kept_values: Shared<Files>,
    original_values: Shared<SavedList>,
    /// The policies written directly since the last reload.
    plans: Vec<Arc<Plan>>,
    /// Which applied cgroups were written since the last tick.
    drift: DriftWatch,
    /// When the hierarchy was walked last, and is walked next, for cgroups the enforcer was
    /// not told of.
    last_catch_up: Instant,
    next_catch_up: Instant,
    /// Applied cgroups found drifted and not yet put back (a fix failing, or waiting).
    drifting: BTreeSet<CgroupPath>,
    /// The safety net: every applied cgroup read once a round, notices or not.
    sweep: Sweep,
    /// Notices were lost during a pass: every applied cgroup is read at the next tick.
    check_everything: bool,
    /// Cgroups whose limits systemd did not take (unreachable or refusing), tried again at
    /// `next_retry`, every [`SYSTEMD_RETRY`].
    retry: BTreeSet<String>,
    next_retry: Instant,
    /// The true originals of every cgroup and unit Sentinel has changed and not yet given back.
    saved: SavedOriginals,
    saved_file: StateFile<SavedOriginals>,
    view: Arc<Mutex<AppliedView>>,
    /// By cgroup path: the policy that matches it and why it is not applied.
    unapplied: HashMap<String, (String, ServiceOutcome)>,
    /// The pass over every cgroup (start, reload) under way.
    pass: Option<Pass>,
    states: watch::Sender<PolicyStates>,
    metrics: PolicyMetrics,
}

impl Enforcer {
    /// `runtime` carries the D-Bus calls to systemd, which the enforcer's thread waits for.
    pub fn new(
        fs: CgroupFs,
        policy: Policy,
        backend: CgroupBackend,
        view: Arc<Mutex<AppliedView>>,
        metrics: PolicyMetrics,
        state_dir: &Path,
        runtime: tokio::runtime::Handle,
    ) -> Result<Self, Error> {
        let booted = systemd::booted();
        if backend == CgroupBackend::Systemd && !booted {
            return Err(Error::SystemdRequired);
        }
        let saved_file = StateFile::new(state_dir.join(ORIGINALS_FILE));
        let saved = saved_file.load().unwrap_or_else(|error| {
            error!("{error}; limits written before this start cannot be given back exactly");
            None
        });
        Ok(Self {
            fs,
            policy,
            backend,
            // Also with `cgroupfs`: units changed under another backend are given back.
            systemd: booted.then(|| SystemdBus::new(runtime)),
            drop_ins: RuntimeDropIns::new(RUNTIME_CONTROL_DIR.into()),
            page_size: page_size(),
            subtree_controls: SubtreeControls::default(),
            applied: BTreeMap::new(),
            kept_values: Shared::new(),
            original_values: Shared::new(),
            plans: Vec::new(),
            drift: DriftWatch::new(),
            last_catch_up: Instant::now(),
            next_catch_up: Instant::now() + CATCH_UP,
            drifting: BTreeSet::new(),
            sweep: Sweep::new(Instant::now()),
            check_everything: false,
            retry: BTreeSet::new(),
            next_retry: Instant::now(),
            saved: saved.unwrap_or_default(),
            saved_file,
            view,
            unapplied: HashMap::new(),
            pass: None,
            states: watch::Sender::new(PolicyStates::default()),
            metrics,
        })
    }

    /// Each policy's state, republished whenever it changes.
    pub fn subscribe(&self) -> watch::Receiver<PolicyStates> {
        self.states.subscribe()
    }

    /// Applies the policy to every existing cgroup.
    pub fn apply_all(&mut self) {
        let started = Instant::now();
        let own_pass = self.pass.is_none();
        if own_pass {
            self.pass = Some(Pass::default());
        }
        self.unapplied.clear();
        self.subtree_controls = SubtreeControls::default();
        for (id, path) in walk_hierarchy(self.fs.root()) {
            self.reconcile_listed(&path, id);
        }
        self.publish();
        if own_pass {
            self.end_pass();
        }
        info!(
            cgroups = self.applied.len(),
            took_ms = started.elapsed().as_millis() as u64,
            "policies applied"
        );
    }

    /// Handles inputs until `Stop`; limits stay in place when the daemon stops. `notices` is
    /// the queue of `inputs`: the kernel's notices of writes to kept cgroups come through it.
    pub fn run(mut self, inputs: Inbox<Input>, notices: Queue<Input>) {
        self.drift
            .wake_with(move || notices.send(Input::Noticed).is_ok());
        self.give_back_unclaimed();
        self.apply_all();
        let mut checks = NoticePace::new(Instant::now());
        loop {
            self.save_originals();
            let mut wake = self.next_wake(checks.next_tick);
            if let Some(at) = checks.held() {
                wake = Some(wake.map_or(at, |wake| wake.min(at)));
            } else {
                self.drift.rearm();
            }
            let wait = wake.map_or(Duration::MAX, |at| {
                at.saturating_duration_since(Instant::now())
            });
            match inputs.recv_timeout(wait) {
                Ok(Input::CgroupCreated(path)) => {
                    self.subtree_controls = SubtreeControls::default();
                    self.reconcile(&path);
                    self.publish();
                }
                Ok(Input::Reload(policy)) => self.reload(policy),
                Ok(Input::Rescan) => self.rescan(),
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                Ok(Input::Noticed) if !checks.noticed(Instant::now()) => {}
                Ok(Input::Noticed) | Err(RecvTimeoutError::Timeout) => {
                    self.tick();
                    checks.ticked(Instant::now());
                }
            }
        }
    }

    /// When the thread must wake with no input: at the next tick while anything needs ticks,
    /// else when the next walk, retry or sweep round is due; `None`: only an input wakes it.
    /// A kept cgroup's drift wakes it through `Input::Noticed`.
    fn next_wake(&self, next_tick: Instant) -> Option<Instant> {
        if self.needs_every_tick() {
            return Some(next_tick);
        }
        [
            (!self.policy.services.is_empty()).then_some(self.next_catch_up),
            (!(self.retry.is_empty() && self.saved.units.is_empty())).then_some(self.next_retry),
            (!self.applied.is_empty()).then(|| self.sweep.next_round()),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Whether something is looked at every tick: drift without notices (none at all, or
    /// cgroups without a watch), drift not yet put back, memory guards, cgroups not applied
    /// that may go away, a sweep round, everything after lost notices.
    fn needs_every_tick(&self) -> bool {
        let guards = || {
            self.policy
                .services
                .iter()
                .any(|policy| policy.graceful_stop.is_some())
        };
        let kept = !self.applied.is_empty();
        (kept
            && (!self.drift.wakes()
                || self.drift.polled() > 0
                || self.sweep.in_round()
                || guards()))
            || !self.drifting.is_empty()
            || !self.unapplied.is_empty()
            || self.check_everything
    }

    /// Cgroups and units changed before a restart that no policy wants any more (the policy was
    /// removed or changed while the daemon was down) get their true originals back.
    fn give_back_unclaimed(&mut self) {
        let units = self.stale_units();
        self.give_back_units(&units);
        let unclaimed: Vec<String> = self
            .saved
            .cgroups
            .keys()
            .filter(|path| self.policy_for(path).is_none())
            .cloned()
            .collect();
        for path in unclaimed {
            let originals = self.saved.files(&path);
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

    fn forget_originals(&mut self, path: &str) {
        if self.saved.cgroups.remove(path).is_some() {
            self.saved_file.mark_changed();
        }
    }

    /// Writes the saved originals when they changed.
    fn save_originals(&mut self) {
        if let Err(error) = self.write_saved() {
            error!("{error}; after a restart the limits could not be given back exactly");
        }
    }

    fn write_saved(&mut self) -> Result<(), Error> {
        let now = Instant::now();
        if !self.saved_file.due(now, Duration::ZERO) {
            return Ok(());
        }
        self.saved_file.write(&self.saved, now)
    }

    fn reload(&mut self, policy: Policy) {
        let started = Instant::now();
        self.plans.clear();
        let previous = std::mem::replace(&mut self.policy, policy);
        // The same targets in the same order: no cgroup matches a policy it did not match
        // before, so no walk is needed to find them.
        let same_targets = previous
            .services
            .iter()
            .map(|policy| &policy.target)
            .eq(self.policy.services.iter().map(|policy| &policy.target));
        self.subtree_controls = SubtreeControls::default();
        // With the same targets, a cgroup's policy is the one at the place of its previous one
        // (no pattern is matched again).
        let mut places: Vec<(*const ServicePolicy, usize)> = if same_targets {
            previous
                .services
                .iter()
                .enumerate()
                .map(|(place, policy)| (Arc::as_ptr(policy), place))
                .collect()
        } else {
            Vec::new()
        };
        places.sort_unstable();
        for place in 0..self.policy.services.len() {
            let policy = Arc::clone(&self.policy.services[place]);
            if policy.mode == Mode::Enforce {
                self.plan(&policy);
            }
        }
        // Thousands of cgroups share a few policies and kept values: what becomes of them is
        // worked out once per (new policy, previous policy, kept values).
        let mut moves: Vec<(MoveKey, Move)> = Vec::new();
        let mut changed: Vec<(CgroupPath, Option<Arc<ServicePolicy>>)> = Vec::new();
        let mut pass = Pass::default();
        let Self {
            applied,
            policy,
            plans,
            fs,
            drift,
            drifting,
            check_everything,
            ..
        } = self;
        for (path, applied) in applied.iter_mut() {
            let wanted = match places
                .binary_search_by_key(&Arc::as_ptr(&applied.policy), |(policy, _)| *policy)
            {
                Ok(at) => policy.services.get(places[at].1),
                Err(_) => first_match(&policy.services, path),
            };
            let Some(wanted) = wanted else {
                changed.push((CgroupPath::clone(path), None));
                continue;
            };
            let key = (
                Arc::as_ptr(wanted),
                Arc::as_ptr(&applied.policy),
                Arc::as_ptr(&applied.expected),
            );
            let at = match moves.binary_search_by_key(&key, |(key, _)| *key) {
                Ok(at) => at,
                Err(at) => {
                    moves.insert(at, (key, Move::new(wanted, applied, plans)));
                    at
                }
            };
            match &mut moves[at].1 {
                // A cgroup whose policy is unchanged takes the new entry, so that the next
                // reload finds it there too.
                Move::Keep => applied.policy = Arc::clone(wanted),
                Move::Rewrite(rewrite) if matches!(applied.writer, Writer::Cgroupfs) => {
                    // A write that fails is done again, and reported, by the retarget below.
                    if rewrite.write(fs, path).is_err() {
                        changed.push((CgroupPath::clone(path), Some(Arc::clone(wanted))));
                        continue;
                    }
                    debug!(
                        service = service_name(path),
                        policy = wanted.name,
                        limits = ?rewrite.plan.desired,
                        "limits applied"
                    );
                    applied.expected = Arc::clone(&rewrite.plan.expected);
                    if applied.policy.graceful_stop != wanted.graceful_stop {
                        applied.guard = memory_guard(wanted);
                        applied.terminated = None;
                    }
                    applied.policy = Arc::clone(wanted);
                    rewrite.cgroups.push(CgroupPath::clone(path));
                    pass.unread.push(CgroupPath::clone(path));
                    if pass.unread.len() >= OWN_NOTICES_BATCH {
                        pass.read_notices(drift, drifting, check_everything);
                    }
                }
                _ => changed.push((CgroupPath::clone(path), Some(Arc::clone(wanted)))),
            }
        }
        for (_, step) in moves {
            if let Move::Rewrite(Rewrite { plan, cgroups, .. }) = step
                && !cgroups.is_empty()
            {
                self.metrics.count_each(
                    cgroups.iter().map(|path| service_name(path)),
                    Action::SetLimits,
                );
                pass.by_policy
                    .entry(plan.policy.name.clone())
                    .or_default()
                    .extend(cgroups);
            }
        }
        self.pass = Some(pass);
        let mut released = Vec::new();
        for (path, wanted) in changed {
            let Some(applied) = self.applied.get(&path) else {
                continue;
            };
            let enforced_directly =
                applied.policy.mode == Mode::Enforce && matches!(applied.writer, Writer::Cgroupfs);
            match wanted {
                Some(policy) if enforced_directly && policy.mode == Mode::Enforce => {
                    self.retarget(&path, policy);
                }
                _ => {
                    self.release(&path);
                    released.push(path);
                }
            }
        }
        let units = self.stale_units();
        self.give_back_units(&units);
        if same_targets {
            // What was let go (its mode or writer changed) and what failed is applied again;
            // a cgroup whose creation was missed waits for the periodic walk, as without a
            // reload.
            let failed = std::mem::take(&mut self.unapplied);
            for path in &released {
                self.reconcile(path);
            }
            for path in failed.keys() {
                self.reconcile(path);
            }
            self.publish();
        } else {
            self.apply_all();
        }
        self.end_pass();
        info!(
            took_ms = started.elapsed().as_millis() as u64,
            "policy reloaded"
        );
    }

    /// Reads the kernel's notices during a pass (see [`Pass::read_notices`]).
    fn read_notices(&mut self) {
        if let Some(pass) = self.pass.as_mut() {
            pass.read_notices(
                &mut self.drift,
                &mut self.drifting,
                &mut self.check_everything,
            );
        }
    }

    /// Ends a pass: what is left of the kernel's notices is read (see [`Self::read_notices`]),
    /// and one line per policy says how many cgroups got its limits. The recent events name
    /// each service when a policy got a few, and the policy with a count otherwise, so that a
    /// reload over thousands of services does not push every other event out.
    fn end_pass(&mut self) {
        self.read_notices();
        self.kept_values.prune();
        self.original_values.prune();
        let Some(pass) = self.pass.take() else {
            return;
        };
        for (name, mut services) in pass.by_policy {
            let limits = self
                .policy
                .services
                .iter()
                .find(|service| service.name == name)
                .map(|service| service.limits.to_cgroup_files());
            let cgroups = services.len();
            info!(policy = name, cgroups, limits = ?limits.unwrap_or_default(), "limits applied");
            let kind = Action::SetLimits.label();
            if cgroups <= PASS_EVENTS_PER_POLICY {
                services.sort_unstable_by(|a, b| service_name(a).cmp(service_name(b)));
                for path in &services {
                    self.metrics.recent.record(kind, service_name(path), "");
                }
            } else {
                let detail = format!("{cgroups} services");
                self.metrics
                    .recent
                    .record(kind, &format!("policy {name}"), detail);
            }
        }
    }

    /// The first policy, in file order, that matches `path`.
    fn policy_for(&self, path: &str) -> Option<&Arc<ServicePolicy>> {
        first_match(&self.policy.services, path)
    }

    /// Brings one cgroup in line with the policy.
    fn reconcile(&mut self, path: &str) {
        if let Some(id) = self.fs.id(path) {
            self.reconcile_listed(path, id);
        }
    }

    /// Brings one cgroup that the hierarchy's walk just listed (its id `id`) in line with the
    /// policy.
    fn reconcile_listed(&mut self, path: &str, id: u64) {
        match self.applied.get(path) {
            Some(applied) if applied.id == id => return,
            // Made again at the same path (a restarted service): a new cgroup, which gets its
            // policy as any new one does. Its default limits, which its maker may not have
            // replaced yet, are not drift.
            Some(_) => self.forget_cgroup(path),
            None => {}
        }
        let Some(policy) = self.policy_for(path).cloned() else {
            return;
        };
        match self.unit_of(path) {
            Ok(Some(unit)) => self.apply_through_systemd(path, id, unit, policy),
            Ok(None) => self.apply_to_cgroupfs(path, id, policy, &Vec::new()),
            Err(error) => {
                let service = service_name(path);
                error!(
                    service,
                    policy = policy.name,
                    "cannot ask systemd whether a unit owns this cgroup, so its limits stay as \
                     they are: {error}"
                );
                self.metrics.action(service, Action::Failed);
                self.unapplied.insert(
                    path.to_string(),
                    (
                        policy.name.clone(),
                        ServiceOutcome::Failed {
                            reason: format!(
                                "systemd cannot be asked whether a unit owns it: {error}"
                            ),
                        },
                    ),
                );
                self.retry_later(path);
            }
        }
    }

    /// Tries `path` again in [`SYSTEMD_RETRY`], or with the others already waiting.
    fn retry_later(&mut self, path: &str) {
        if self.retry.is_empty() {
            self.next_retry = Instant::now() + SYSTEMD_RETRY;
        }
        self.retry.insert(path.to_string());
    }

    /// The systemd unit whose cgroup `path` is, when systemd is to set its limits.
    fn unit_of(&mut self, path: &str) -> Result<Option<String>, Error> {
        match (&mut self.systemd, self.backend) {
            (Some(systemd), CgroupBackend::Auto | CgroupBackend::Systemd) => {
                systemd.unit_of_cgroup(path)
            }
            _ => Ok(None),
        }
    }

    /// Moves a cgroup Sentinel writes directly from its policy to `policy`: only the values
    /// that change are written, and a limit the new policy no longer sets gets its original
    /// back.
    fn retarget(&mut self, path: &str, policy: Arc<ServicePolicy>) {
        // The drift watch stays: the cgroup is still Sentinel's to keep.
        self.drifting.remove(path);
        let Some(Applied {
            id,
            writer: Writer::Cgroupfs,
            expected,
            ..
        }) = self.applied.remove(path)
        else {
            return;
        };
        let plan = self.plan(&policy);
        let wanted = |file: &str| plan.desired.iter().any(|(wanted, _)| *wanted == file);
        let drops = self
            .saved
            .cgroups
            .get(path)
            .is_some_and(|saved| saved.0.iter().any(|(file, _)| !wanted(file)));
        if drops {
            let dropped: Files = self
                .saved
                .files(path)
                .into_iter()
                .filter(|(file, _)| !wanted(file))
                .collect();
            self.restore(path, &dropped);
        }
        self.apply_to_cgroupfs(path, id, policy, &expected);
    }

    /// Applies `policy` to `path`, written directly; `in_place` are the values Sentinel keeps
    /// there already (none for a cgroup it did not police), which are not written again.
    fn apply_to_cgroupfs(
        &mut self,
        path: &str,
        id: u64,
        policy: Arc<ServicePolicy>,
        in_place: &Files,
    ) {
        let service = service_name(path).to_string();
        if policy.mode == Mode::Observe {
            for (file, value) in &policy.limits.to_cgroup_files() {
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
            let nothing = self.kept_values.share(Vec::new());
            let tracked = self.tracked(id, policy, Writer::Cgroupfs, nothing);
            self.keep(self.path_of(path), tracked);
            return;
        }
        let plan = self.plan(&policy);
        match self.write_limits(path, &plan, in_place) {
            Ok(saved) => {
                let shared = self.path_of(path);
                match self.saved.cgroups.get_mut(path) {
                    Some(kept) => *kept = saved,
                    None => {
                        self.saved.cgroups.insert(path.to_string(), saved);
                    }
                }
                self.saved_file.mark_changed();
                match self.pass.as_mut() {
                    Some(pass) => {
                        debug!(service, policy = policy.name, limits = ?plan.desired, "limits applied");
                        match pass.by_policy.get_mut(&policy.name) {
                            Some(cgroups) => cgroups.push(shared.clone()),
                            None => {
                                pass.by_policy
                                    .insert(policy.name.clone(), vec![shared.clone()]);
                            }
                        }
                        pass.unread.push(shared.clone());
                        if pass.unread.len() >= OWN_NOTICES_BATCH {
                            self.read_notices();
                        }
                    }
                    None => {
                        info!(service, policy = policy.name, limits = ?plan.desired, "limits applied");
                        self.metrics
                            .recent
                            .record(Action::SetLimits.label(), &service, "");
                    }
                }
                self.metrics.count(&service, Action::SetLimits);
                let expected = Arc::clone(&plan.expected);
                let tracked = self.tracked(id, policy, Writer::Cgroupfs, expected);
                self.keep(shared, tracked);
            }
            Err(reason) => {
                // Watched still if a retarget failed.
                self.drift.forget(path);
                error!(
                    service,
                    policy = policy.name,
                    "cannot apply limits: {reason}"
                );
                self.metrics.action(&service, Action::Failed);
                self.unapplied.insert(
                    path.to_string(),
                    (
                        policy.name.clone(),
                        ServiceOutcome::Failed {
                            reason: reason.to_string(),
                        },
                    ),
                );
            }
        }
    }

    fn apply_through_systemd(
        &mut self,
        path: &str,
        id: u64,
        unit: String,
        policy: Arc<ServicePolicy>,
    ) {
        let service = service_name(path).to_string();
        let properties = unit_properties(&policy.limits);
        let expected = cgroup_files(&properties, self.page_size);
        if policy.mode == Mode::Observe {
            for ((property, value), (file, wanted)) in properties.iter().zip(&expected) {
                let current = self.fs.read(path, file).unwrap_or_else(|_| "?".into());
                if current != *wanted {
                    info!(
                        service,
                        unit,
                        policy = policy.name,
                        property = property.bus_name(),
                        value,
                        file,
                        current,
                        would_set = wanted,
                        "observe: would set unit property"
                    );
                }
            }
            self.metrics.action(&service, Action::WouldSetLimits);
            let nothing = self.kept_values.share(Vec::new());
            let tracked = self.tracked(id, policy, Writer::Systemd { unit }, nothing);
            self.keep(self.path_of(path), tracked);
            return;
        }
        match self.set_unit_properties(path, &unit, &properties, &expected) {
            Ok(()) => {
                let set: Vec<String> = properties
                    .iter()
                    .map(|(property, value)| format!("{}={value}", property.bus_name()))
                    .collect();
                info!(
                    service,
                    unit,
                    policy = policy.name,
                    properties = set.join(" "),
                    "limits applied through systemd"
                );
                self.metrics.action(&service, Action::SetLimits);
                let expected = self.kept_values.share(expected);
                let tracked = self.tracked(id, policy, Writer::Systemd { unit }, expected);
                self.keep(self.path_of(path), tracked);
            }
            Err(reason) => {
                error!(
                    service,
                    unit,
                    policy = policy.name,
                    "cannot apply limits through systemd: {reason}"
                );
                self.metrics.action(&service, Action::Failed);
                self.unapplied.insert(
                    path.to_string(),
                    (
                        policy.name.clone(),
                        ServiceOutcome::Failed {
                            reason: format!("through systemd ({unit}): {reason}"),
                        },
                    ),
                );
                self.retry_later(path);
            }
        }
    }

    /// Sets `properties` on `unit` at runtime and waits until its cgroup (`path`) shows
    /// `expected`. What the unit's drop-ins held before is saved on disk first, so that a
    /// crash right after systemd wrote them never makes Sentinel's values the originals.
    fn set_unit_properties(
        &mut self,
        path: &str,
        unit: &str,
        properties: &[(UnitProperty, u64)],
        expected: &Files,
    ) -> Result<(), Error> {
        let Some(systemd) = self.systemd.as_mut() else {
            return Err(Error::SystemdRequired);
        };
        // The drop-ins of other properties must be given back first, or they would stay.
        if let Some(record) = self.saved.units.get(unit)
            && record.properties != properties
        {
            return Err(Error::SystemdNotGivenBack {
                unit: unit.to_string(),
            });
        }
        if !self.saved.units.contains_key(unit) {
            let (drop_ins, directory_existed) = self.drop_ins.snapshot(unit, properties)?;
            let originals =
                systemd.properties(unit, properties.iter().map(|(property, _)| *property))?;
            let record = UnitRecord {
                cgroup: path.to_string(),
                properties: properties.to_vec(),
                drop_ins,
                directory_existed,
                originals,
            };
            self.saved.units.insert(unit.to_string(), record);
            self.saved_file.mark_changed();
            if let Err(error) = self.write_saved() {
                self.saved.units.remove(unit);
                return Err(error);
            }
        }
        let systemd = self.systemd.as_mut().ok_or(Error::SystemdRequired)?;
        systemd.set_properties(unit, properties)?;
        let deadline = Instant::now() + SYSTEMD_APPLY_WAIT;
        loop {
            let differing = expected.iter().find_map(|(file, wanted)| {
                let found = self
                    .fs
                    .read(path, file)
                    .unwrap_or_else(|error| error.to_string());
                (found != *wanted).then(|| (*file, wanted.clone(), found))
            });
            let Some((file, expected, found)) = differing else {
                return Ok(());
            };
            if Instant::now() >= deadline {
                return Err(Error::SystemdNotApplied {
                    unit: unit.to_string(),
                    file,
                    expected,
                    found,
                });
            }
            std::thread::sleep(SYSTEMD_APPLY_POLL);
        }
    }

    /// Units with saved drop-ins whose policy went away or now sets other properties, and
    /// that no cgroup in force belongs to.
    fn stale_units(&self) -> Vec<String> {
        if self.saved.units.is_empty() {
            return Vec::new();
        }
        let in_force: HashSet<&str> = self
            .applied
            .values()
            .filter_map(|applied| match &applied.writer {
                Writer::Systemd { unit } => Some(unit.as_str()),
                Writer::Cgroupfs => None,
            })
            .collect();
        self.saved
            .units
            .iter()
            .filter(|(unit, record)| {
                let in_force = in_force.contains(unit.as_str());
                let wanted = self
                    .policy_for(&record.cgroup)
                    .filter(|policy| policy.mode == Mode::Enforce)
                    .map(|policy| unit_properties(&policy.limits));
                !in_force && wanted.as_ref() != Some(&record.properties)
            })
            .map(|(unit, _)| unit.clone())
            .collect()
    }

    /// Puts back the runtime drop-ins of `units` as they were before Sentinel, then has
    /// systemd read them again: one daemon-reload for all of them.
    fn give_back_units(&mut self, units: &[String]) {
        let given = systemd::give_back(
            self.systemd.as_mut(),
            &self.drop_ins,
            &self.saved.units,
            units,
        );
        for (unit, reason) in given.failed {
            // The record stays: the next reload, start or retry puts the same files back.
            let service = service_name(&self.saved.units[&unit].cgroup).to_string();
            error!(
                service,
                unit, "cannot give the unit its previous limits back: {reason}"
            );
            self.metrics.action(&service, Action::Failed);
        }
        for (unit, now) in given.restored {
            let Some(record) = self.saved.units.remove(&unit) else {
                continue;
            };
            self.saved_file.mark_changed();
            let service = service_name(&record.cgroup);
            match now {
                Ok(now) if now == record.originals => info!(
                    service,
                    unit, "policy released; systemd has the unit's previous limits back"
                ),
                Ok(now) => warn!(
                    service,
                    unit,
                    now = ?now,
                    before = ?record.originals,
                    "policy released and Sentinel's drop-ins removed, but the unit's limits \
                     differ from those before Sentinel (changed in its unit files meanwhile?)"
                ),
                Err(error) => warn!(
                    service,
                    unit, "policy released; cannot read the unit's limits back: {error}"
                ),
            }
            self.metrics.action(service, Action::RestoredLimits);
        }
    }

    fn tracked(
        &self,
        id: u64,
        policy: Arc<ServicePolicy>,
        writer: Writer,
        expected: Arc<Files>,
    ) -> Applied {
        Applied {
            id,
            guard: memory_guard(&policy),
            policy,
            writer,
            expected,
            terminated: None,
            fix: FixRetry::default(),
        }
    }

    /// The shared name of `path`: the one the enforcer's tables hold already, or a new one.
    fn path_of(&self, path: &str) -> CgroupPath {
        self.applied
            .get_key_value(path)
            .map(|(shared, _)| shared)
            .or_else(|| self.drift.watched(path))
            .map_or_else(|| path.into(), CgroupPath::clone)
    }

    /// Keeps `applied` on `path`, and asks to hear of every write to its files.
    fn keep(&mut self, path: CgroupPath, applied: Applied) {
        self.drift.watch(&self.fs, &path);
        self.applied.insert(path, applied);
    }

    /// Forgets a cgroup that is gone or made again. A unit's drop-ins stay with the unit:
    /// systemd applies them when it starts again.
    fn forget_cgroup(&mut self, path: &str) {
        if let Some(Applied {
            writer: Writer::Cgroupfs,
            ..
        }) = self.let_go(path)
        {
            self.forget_originals(path);
        }
    }

    /// Forgets what is kept on `path`.
    fn let_go(&mut self, path: &str) -> Option<Applied> {
        self.drift.forget(path);
        self.drifting.remove(path);
        self.applied.remove(path)
    }

    /// How `policy` is written directly, worked out once for every cgroup it applies to.
    fn plan(&mut self, policy: &Arc<ServicePolicy>) -> Arc<Plan> {
        if let Some(plan) = self
            .plans
            .iter()
            .find(|plan| Arc::ptr_eq(&plan.policy, policy))
        {
            return Arc::clone(plan);
        }
        let desired = policy.limits.to_cgroup_files();
        let read_back = desired
            .iter()
            .map(|(file, value)| (*file, as_read_back(file, value, self.page_size)))
            .collect();
        let plan = Arc::new(Plan {
            policy: Arc::clone(policy),
            expected: self.kept_values.share(read_back),
            controllers: CONTROLLERS
                .iter()
                .copied()
                .filter(|controller| desired.iter().any(|(file, _)| file.starts_with(controller)))
                .collect(),
            desired,
        });
        self.plans.push(Arc::clone(&plan));
        plan
    }

    /// Writes the values of `plan` that `in_place` does not hold already, each file opened
    /// once; returns what each file held before Sentinel first wrote it. A cgroup whose
    /// originals are saved for exactly these files, as each of thousands retargeted by a
    /// reload is, keeps the list it has.
    fn write_limits(
        &mut self,
        path: &str,
        plan: &Plan,
        in_place: &Files,
    ) -> Result<SavedFiles, crate::Error> {
        self.fs
            .enable_controllers(path, &plan.controllers, &mut self.subtree_controls)?;
        // Written before a restart, or kept now: what is there now is Sentinel's own value.
        let saved = self
            .saved
            .cgroups
            .get(path)
            .map(|saved| Arc::clone(&saved.0));
        let saved_for = |file: &str| {
            saved
                .as_deref()
                .and_then(|saved| saved.iter().find(|(name, _)| name == file))
                .map(|(_, original)| original)
        };
        // Saved for exactly these files: the list stays as it is.
        let keeps_saved = saved.as_deref().is_some_and(|saved| {
            saved.len() == plan.desired.len()
                && saved
                    .iter()
                    .zip(&plan.desired)
                    .all(|((name, _), (file, _))| name == file)
        });
        let mut originals = Vec::new();
        for ((file, value), (_, read_back)) in plan.desired.iter().zip(plan.expected.iter()) {
            let original = match saved_for(file) {
                Some(original) => {
                    if !in_place
                        .iter()
                        .any(|(kept, value)| kept == file && value == read_back)
                    {
                        self.fs.write(path, file, value)?;
                    }
                    (!keeps_saved).then(|| original.clone())
                }
                None => Some(self.fs.swap(path, file, value)?),
            };
            originals.extend(original.map(|original| (Cow::Borrowed(*file), original)));
        }
        Ok(SavedFiles(match saved {
            Some(saved) if keeps_saved => saved,
            _ => self.original_values.share(originals),
        }))
    }

    /// Stops enforcing on `path`, restoring its previous limits if it still exists. A unit's
    /// drop-ins are given back afterwards, together, by [`Self::give_back_units`].
    fn release(&mut self, path: &str) {
        let Some(applied) = self.let_go(path) else {
            return;
        };
        let Writer::Cgroupfs = applied.writer else {
            return;
        };
        let originals = self.saved.files(path);
        self.forget_originals(path);
        if !self.fs.exists(path) {
            return;
        }
        self.restore(path, &originals);
        info!(
            service = service_name(path),
            policy = applied.policy.name,
            "policy released; previous limits restored"
        );
        self.metrics
            .action(service_name(path), Action::RestoredLimits);
    }

    /// Writes `originals` back to `path`.
    fn restore(&self, path: &str, originals: &Files) {
        if let Err(error) = write_back(&self.fs, path, originals) {
            warn!(
                service = service_name(path),
                "cannot restore the previous limits: {error}"
            );
        }
    }

    fn tick(&mut self) {
        let now = Instant::now();
        if now >= self.next_catch_up {
            self.catch_up(now);
        }
        if now >= self.next_retry {
            self.next_retry = now + SYSTEMD_RETRY;
            let units = self.stale_units();
            let retried = std::mem::take(&mut self.retry);
            if !(units.is_empty() && retried.is_empty()) {
                self.give_back_units(&units);
                for path in retried {
                    self.reconcile(&path);
                }
                self.publish();
            }
        }
        // The cgroups written or removed since the last tick, those still drifted, and this
        // tick's share of the sweep; every one when notices were lost.
        self.metrics.drift_polled.set(self.drift.polled() as i64);
        let candidates: Vec<CgroupPath> = match self.drift.changed() {
            Changed::Everything => self.applied.keys().cloned().collect(),
            _ if std::mem::take(&mut self.check_everything) => {
                self.applied.keys().cloned().collect()
            }
            Changed::Cgroups(mut changed) => {
                changed.extend(self.drifting.iter().cloned());
                changed.extend(self.sweep.next(now, TICK, || {
                    self.applied.keys().cloned().collect::<Vec<_>>()
                }));
                changed
                    .into_iter()
                    .filter(|path| self.applied.contains_key(path))
                    .collect()
            }
        };
        let mut forgotten = false;
        for path in &candidates {
            match self.fs.id(path) {
                None => {
                    self.forget_cgroup(path);
                    forgotten = true;
                }
                Some(id)
                    if self
                        .applied
                        .get(path)
                        .is_some_and(|applied| applied.id != id) =>
                {
                    self.subtree_controls = SubtreeControls::default();
                    self.reconcile_listed(path, id);
                    forgotten = true;
                }
                Some(_) => self.restore_drift(path, now),
            }
        }
        let unapplied_before = self.unapplied.len();
        self.unapplied.retain(|path, _| self.fs.exists(path));
        // A cgroup's guard comes from its policy, one of the policy file's: without a guard
        // there, the thousands of kept cgroups are not looked through twice a second.
        if self
            .policy
            .services
            .iter()
            .any(|policy| policy.graceful_stop.is_some())
        {
            let guarded: Vec<CgroupPath> = self
                .applied
                .iter()
                .filter(|(_, applied)| applied.guard.is_some())
                .map(|(path, _)| path.clone())
                .collect();
            for path in guarded {
                self.guard_memory(&path, now);
            }
        }
        if forgotten || self.unapplied.len() != unapplied_before {
            self.publish();
        }
    }

    /// Asks for a walk as soon as [`RESCAN_SPACING`] allows; several before it make one.
    fn rescan(&mut self) {
        self.next_catch_up = self.next_catch_up.min(self.last_catch_up + RESCAN_SPACING);
    }

    /// Applies the policy to the cgroups the hierarchy's walk finds that the enforcer was not
    /// told of; those it failed on wait for a reload, as after a pass.
    fn catch_up(&mut self, now: Instant) {
        self.last_catch_up = now;
        self.next_catch_up = now + CATCH_UP;
        if self.policy.services.is_empty() {
            return;
        }
        self.subtree_controls = SubtreeControls::default();
        let mut found = 0;
        for (id, path) in walk_hierarchy(self.fs.root()) {
            let known = self
                .applied
                .get(path.as_str())
                .is_some_and(|applied| applied.id == id);
            if known || self.unapplied.contains_key(&path) || self.policy_for(&path).is_none() {
                continue;
            }
            found += 1;
            self.reconcile_listed(&path, id);
        }
        if found > 0 {
            warn!(
                cgroups = found,
                "the hierarchy's walk found cgroups whose creation was missed (a full queue, a \
                 path too long for the kernel's record, or a lost record); their policies are \
                 applied now"
            );
            self.publish();
        }
    }

    /// Puts back limits someone changed behind Sentinel's back: a cgroup's files directly, a
    /// unit's through systemd (never its cgroup files). The drift is reported and counted
    /// once; a fix that fails is tried again by [`FixRetry`]'s schedule.
    fn restore_drift(&mut self, path: &str, now: Instant) {
        let Some(applied) = self.applied.get(path) else {
            return;
        };
        let service = service_name(path).to_string();
        let drifted: Files = applied
            .expected
            .iter()
            .filter(|(file, expected)| {
                self.fs
                    .read(path, file)
                    .is_ok_and(|current| current != *expected)
            })
            .cloned()
            .collect();
        if drifted.is_empty() {
            // Put back by someone else meanwhile: the next drift is new.
            self.drifting.remove(path);
            if let Some(applied) = self.applied.get_mut(path) {
                applied.fix = FixRetry::default();
            }
            return;
        }
        // Checked again at every tick until it is put back.
        let drifted_path = self.path_of(path);
        self.drifting.insert(drifted_path);
        if !applied.fix.due(now) {
            return;
        }
        let retry = applied.fix.is_retry();
        if !retry {
            for (file, expected) in &drifted {
                let current = self.fs.read(path, file).unwrap_or_default();
                warn!(
                    service,
                    file, current, expected, "limit changed behind Sentinel's back; restoring it"
                );
                self.metrics.drift(&service, file, &current, expected);
            }
        }
        let result = match &applied.writer {
            Writer::Cgroupfs => write_back(&self.fs, path, &drifted),
            Writer::Systemd { unit } => {
                let unit = unit.clone();
                let properties = unit_properties(&applied.policy.limits);
                let expected = applied.expected.clone();
                self.set_unit_properties(path, &unit, &properties, &expected)
            }
        };
        let Some(applied) = self.applied.get_mut(path) else {
            return;
        };
        match result {
            Ok(()) => {
                if retry {
                    info!(service, "limits restored after an earlier failure");
                }
                applied.fix = FixRetry::default();
            }
            Err(error) => {
                error!(
                    service,
                    "cannot restore the limits, tried again in {} s: {error}",
                    SYSTEMD_RETRY.as_secs()
                );
                self.metrics.action(&service, Action::Failed);
                applied.fix.failed(now);
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
        // One summary per policy and kept values, shared by their cgroups. Neighbours in path
        // order nearly always share theirs: the last one used is tried first.
        let mut summaries: Vec<((*const ServicePolicy, *const Files), AppliedSummary)> = Vec::new();
        let mut last = 0;
        let mut summary = |path: &CgroupPath, applied: &Applied| {
            let key = (Arc::as_ptr(&applied.policy), Arc::as_ptr(&applied.expected));
            last = match summaries.get(last) {
                Some((shared, _)) if *shared == key => last,
                _ => match summaries.iter().position(|(shared, _)| *shared == key) {
                    Some(found) => found,
                    None => {
                        summaries.push((key, shared_summary(applied)));
                        summaries.len() - 1
                    }
                },
            };
            let summary = AppliedSummary {
                id: applied.id,
                ..summaries[last].1.clone()
            };
            (CgroupPath::clone(path), summary)
        };
        // In path order, as the applied cgroups are kept.
        let cgroups: Arc<BTreeMap<_, _>> = Arc::new(
            self.applied
                .iter()
                .map(|(path, applied)| summary(path, applied))
                .collect(),
        );
        // A cgroup tried again later (systemd retries) may have succeeded since it failed.
        let unapplied = self
            .unapplied
            .iter()
            .filter(|(path, _)| !self.applied.contains_key(path.as_str()))
            .map(|(path, (policy, outcome))| (path.clone(), policy.clone(), outcome.clone()))
            .collect();
        self.states.send_replace(PolicyStates {
            policies: self.policy.services.clone(),
            applied: Arc::clone(&cgroups),
            unapplied,
        });
        self.view.lock().expect("applied view lock").cgroups = cgroups;
    }
}

impl PolicyStates {
    /// Each policy's state, in file order, with its services sorted by name.
    pub fn list(&self) -> Vec<PolicyState> {
        // In path order, so that each policy's services come nearly sorted.
        let applied = self.applied.iter().map(|(path, summary)| {
            let outcome = match summary.mode {
                Mode::Enforce => ServiceOutcome::Enforcing,
                Mode::Observe => ServiceOutcome::Observing,
            };
            (&**path, &*summary.policy, outcome)
        });
        let unapplied = self
            .unapplied
            .iter()
            .map(|(path, policy, outcome)| (path.as_str(), policy.as_str(), outcome.clone()));
        let mut states: Vec<PolicyState> = self
            .policies
            .iter()
            .map(|policy| PolicyState {
                name: policy.name.clone(),
                mode: policy.mode,
                services: Vec::new(),
            })
            .collect();
        let by_name: HashMap<&str, usize> = self
            .policies
            .iter()
            .enumerate()
            .map(|(index, policy)| (policy.name.as_str(), index))
            .collect();
        // Neighbours in path order nearly always share their policy: looked up once.
        let mut last: Option<(&str, Option<usize>)> = None;
        for (path, policy, outcome) in applied.chain(unapplied) {
            let index = match last {
                Some((name, index)) if std::ptr::eq(name, policy) => index,
                _ => by_name.get(policy).copied(),
            };
            last = Some((policy, index));
            if let Some(state) = index.map(|index| &mut states[index]) {
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

/// What [`give_back_everything`] did: one line per cgroup or unit.
#[derive(Debug, Default)]
pub struct GivenBack {
    pub given_back: Vec<String>,
    /// What stays recorded, and why.
    pub failed: Vec<String>,
}

/// Gives every cgroup and unit recorded in `state_dir` the limits it had before Sentinel, as
/// releasing its policy does, without a daemon: for the package's removal, since the daemon
/// leaves limits in place when it stops. What cannot be given back stays recorded.
pub fn give_back_everything(
    state_dir: &Path,
    runtime: tokio::runtime::Handle,
) -> Result<GivenBack, Error> {
    let mut saved_file = StateFile::<SavedOriginals>::new(state_dir.join(ORIGINALS_FILE));
    let Some(mut saved) = saved_file.load()? else {
        return Ok(GivenBack::default());
    };
    let mut report = GivenBack::default();
    if !saved.cgroups.is_empty() {
        let fs = CgroupFs::new(find_cgroup2_mount()?);
        let paths: Vec<String> = saved.cgroups.keys().cloned().collect();
        for path in paths {
            // A cgroup that is gone has nothing to give back.
            if fs.exists(&path)
                && let Err(error) = write_back(&fs, &path, &saved.files(&path))
            {
                report.failed.push(format!("cgroup {path}: {error}"));
                continue;
            }
            report
                .given_back
                .push(format!("cgroup {path}: previous limits restored"));
            saved.cgroups.remove(&path);
        }
    }
    let units: Vec<String> = saved.units.keys().cloned().collect();
    let mut bus = systemd::booted().then(|| SystemdBus::new(runtime));
    let drop_ins = RuntimeDropIns::new(RUNTIME_CONTROL_DIR.into());
    let given = systemd::give_back(bus.as_mut(), &drop_ins, &saved.units, &units);
    for (unit, reason) in given.failed {
        report.failed.push(format!("unit {unit}: {reason}"));
    }
    for (unit, now) in given.restored {
        let Some(record) = saved.units.remove(&unit) else {
            continue;
        };
        report.given_back.push(match now {
            Ok(now) if now == record.originals => {
                format!("unit {unit}: systemd has its previous limits back")
            }
            Ok(now) => format!(
                "unit {unit}: Sentinel's drop-ins removed, but its limits {now:?} differ from \
                 those before Sentinel {:?} (changed in its unit files meanwhile?)",
                record.originals
            ),
            Err(error) => format!(
                "unit {unit}: Sentinel's drop-ins removed; cannot read its limits back: {error}"
            ),
        });
    }
    saved_file.mark_changed();
    saved_file.write(&saved, Instant::now())?;
    Ok(report)
}

/// What `applied` shares with the cgroups of the same policy and kept values (its id left at 0):
/// the `memory.max` kept there, or for a policy that only observes, the one it would write.
fn shared_summary(applied: &Applied) -> AppliedSummary {
    let memory_max = |files: &Files| {
        files
            .iter()
            .find(|(file, _)| *file == "memory.max")
            .map(|(_, value)| Arc::from(value.as_str()))
    };
    AppliedSummary {
        policy: Arc::from(applied.policy.name.as_str()),
        mode: applied.policy.mode,
        memory_max: memory_max(&applied.expected)
            .or_else(|| memory_max(&applied.policy.limits.to_cgroup_files())),
        id: 0,
    }
}

/// The guard that stops `policy`'s runaway processes, when it has one.
fn memory_guard(policy: &ServicePolicy) -> Option<MemoryGuard> {
    policy.graceful_stop.map(|stop| {
        MemoryGuard::new(GuardLimits {
            threshold_bytes: stop.terminate_above,
            sustain: stop.sustained_for,
            grace: stop.grace,
        })
    })
}

/// Writes `files` (originals, or limits that drifted) back to `path`, every file even when one
/// fails; the last failure.
/// The first of `policies`, in file order, that matches `path`.
fn first_match<'a>(
    policies: &'a [Arc<ServicePolicy>],
    path: &str,
) -> Option<&'a Arc<ServicePolicy>> {
    policies.iter().find(|policy| policy.target.matches(path))
}

/// `value` as the kernel reads it back once written to `file`: memory sizes in whole pages,
/// the rest as written.
fn as_read_back(file: &str, value: &str, page_size: u64) -> String {
    match value.parse::<u64>() {
        Ok(bytes) if file.starts_with("memory.") => (bytes - bytes % page_size).to_string(),
        _ => value.to_string(),
    }
}

fn write_back(fs: &CgroupFs, path: &str, files: &Files) -> Result<(), Error> {
    let mut result = Ok(());
    // Reverse order: memory.high before memory.max, so the pair stays consistent.
    for (file, value) in files.iter().rev() {
        if let Err(error) = fs.write(path, file, value) {
            result = Err(error);
        }
    }
    result
}

/// The kernel keeps memory limits in whole pages of this size.
fn page_size() -> u64 {
    // SAFETY: sysconf only reads a constant of the running system.
    match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
        size if size > 0 => size as u64,
        _ => 4096,
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;
    use crate::{
        cgroup::{Attribution, CgroupTree},
        config::Config,
        queue::QueueDrops,
    };

    const NGINX: &str = "system.slice/nginx.service";

    struct StateDir(std::path::PathBuf);

    impl StateDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("sentinel-enforcer-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
    }

    impl Drop for StateDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn nginx_record(memory_max: u64) -> UnitRecord {
        UnitRecord {
            cgroup: NGINX.into(),
            properties: vec![(UnitProperty::MemoryMax, memory_max)],
            drop_ins: BTreeMap::from([("50-MemoryMax.conf".to_string(), None)]),
            directory_existed: false,
            originals: BTreeMap::from([(UnitProperty::MemoryMax, u64::MAX)]),
        }
    }

    /// An enforcer that finds `saved` in its state directory, with the policies of `file`.
    fn enforcer(dir: &StateDir, saved: &SavedOriginals, file: &str) -> Enforcer {
        // Nothing keeps the recent events here: the recorder finds its queue closed.
        enforcer_with_events(dir, saved, file).0
    }

    /// [`enforcer`], with what receives its recent events.
    fn enforcer_with_events(
        dir: &StateDir,
        saved: &SavedOriginals,
        file: &str,
    ) -> (Enforcer, crate::recent::Keeper) {
        let mut state = StateFile::new(dir.0.join("cgroup-originals.json"));
        state.mark_changed();
        state.write(saved, Instant::now()).unwrap();
        let fs = CgroupFs::new(dir.0.join("cgroup"));
        let view = Arc::new(Mutex::new(AppliedView::default()));
        let labels = Arc::new(Mutex::new(Attribution::new(
            CgroupTree::new(dir.0.join("cgroup")),
            16,
            Duration::from_secs(600),
        )));
        let mut registry = Registry::default();
        let (recent, events, _) = crate::recent::channel(&QueueDrops::new(&mut registry));
        let metrics = PolicyMetrics::new(&mut registry, labels, recent);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let policy = Config::parse("c.yaml", file).unwrap().policies;
        let enforcer = Enforcer::new(
            fs,
            policy,
            CgroupBackend::Cgroupfs,
            view,
            metrics,
            &dir.0,
            runtime.handle().clone(),
        )
        .unwrap();
        (enforcer, events)
    }

    /// The bench's policies: one per 100 cgroups, selected by a glob on their names.
    fn policies_per_hundred(cgroups: usize, memory_max: &str) -> String {
        let mut config = String::from("policies:\n");
        for policy in 0..cgroups.div_ceil(100) {
            config.push_str(&format!(
                "  - name: p{policy:03}\n    cgroup: svc-{policy:03}-*\n    memory.max: {memory_max}\n    \
                 memory.high: 128M\n    cpu.max: 50%\n    pids.max: 100\n"
            ));
        }
        config
    }

    /// Also the tree that `valgrind --tool=callgrind --toggle-collect='*Enforcer*apply_all*'`
    /// (or `*Enforcer*reload*`) counts the enforcer's own instructions on.
    #[test]
    fn thousands_of_cgroups_get_their_limits_in_one_pass_and_a_reload_changes_only_what_changed() {
        const CGROUPS: usize = 5000;
        let dir = StateDir::new("thousands");
        let root = dir.0.join("cgroup");
        let names: Vec<String> = (0..CGROUPS)
            .map(|index| format!("svc-{:03}-{index:05}", index / 100))
            .collect();
        let defaults = [
            ("memory.max", "max"),
            ("memory.high", "max"),
            ("cpu.max", "max 100000"),
            ("pids.max", "max"),
        ];
        for name in std::iter::once("").chain(names.iter().map(String::as_str)) {
            let cgroup = root.join(name);
            std::fs::create_dir_all(&cgroup).unwrap();
            std::fs::write(cgroup.join("cgroup.controllers"), "cpu memory pids").unwrap();
            std::fs::write(cgroup.join("cgroup.subtree_control"), "cpu memory pids").unwrap();
            for (file, value) in defaults {
                std::fs::write(cgroup.join(file), value).unwrap();
            }
        }
        let read =
            |name: &str, file: &str| std::fs::read_to_string(root.join(name).join(file)).unwrap();
        let (mut enforcer, _events) = enforcer_with_events(
            &dir,
            &SavedOriginals::default(),
            &policies_per_hundred(CGROUPS, "256M"),
        );
        enforcer.drift.wake_with(|| true);
        enforcer.apply_all();
        for name in &names {
            assert_eq!(read(name, "memory.max"), "268435456", "{name}");
            assert_eq!(read(name, "memory.high"), "134217728", "{name}");
            assert_eq!(read(name, "cpu.max"), "50000 100000", "{name}");
            assert_eq!(read(name, "pids.max"), "100", "{name}");
        }
        assert_eq!(enforcer.view.lock().unwrap().cgroups.len(), CGROUPS);
        let states = enforcer.subscribe().borrow().list();
        assert_eq!(states.len(), CGROUPS / 100);
        assert!(states.iter().all(|state| state.services.len() == 100));

        let policy = Config::parse("c.yaml", &policies_per_hundred(CGROUPS, "192M"))
            .unwrap()
            .policies;
        enforcer.reload(policy);
        for name in &names {
            assert_eq!(read(name, "memory.max"), "201326592", "{name}");
            assert_eq!(read(name, "memory.high"), "134217728", "{name}");
            assert_eq!(
                enforcer.saved.files(&format!("/{name}")),
                defaults
                    .map(|(file, value)| (file, value.to_string()))
                    .to_vec(),
                "{name}"
            );
        }
        // Its own writes were not taken for drift.
        assert!(enforcer.drifting.is_empty(), "{:?}", enforcer.drifting);
        assert!(!enforcer.check_everything);
        assert_eq!(enforcer.view.lock().unwrap().cgroups.len(), CGROUPS);
    }

    #[test]
    fn a_failing_drift_fix_is_tried_once_per_retry_period() {
        let start = Instant::now();
        let mut fix = FixRetry::default();
        assert!(!fix.is_retry());
        // A minute of checks every 0.5 s, each fix failing.
        let mut tried = Vec::new();
        for tick in 0..120u64 {
            let now = start + TICK * tick as u32;
            if fix.due(now) {
                tried.push((now - start).as_secs_f64());
                fix.failed(now);
            }
        }
        assert_eq!(tried, [0.0, 10.0, 20.0, 30.0, 40.0, 50.0]);
        assert!(fix.is_retry());
    }

    /// A cgroup tree in `dir`: the root and `cgroups`, each with the memory controller and
    /// an unlimited `memory.max`. Returns the root.
    fn memory_cgroups(dir: &StateDir, cgroups: &[&str]) -> std::path::PathBuf {
        let root = dir.0.join("cgroup");
        for cgroup in std::iter::once(&"").chain(cgroups) {
            std::fs::create_dir_all(root.join(cgroup)).unwrap();
            std::fs::write(root.join(cgroup).join("cgroup.controllers"), "memory").unwrap();
            std::fs::write(root.join(cgroup).join("cgroup.subtree_control"), "").unwrap();
            std::fs::write(root.join(cgroup).join("memory.max"), "max").unwrap();
        }
        root
    }

    #[test]
    fn a_pass_does_not_take_its_own_writes_for_drift_but_sees_the_next_one() {
        let dir = StateDir::new("own-writes");
        let root = memory_cgroups(&dir, &["a", "b"]);
        let policy = |memory: &str| {
            format!("policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: {memory}\n")
        };
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), &policy("64M"));
        enforcer.apply_all();
        enforcer.reload(Config::parse("c.yaml", &policy("32M")).unwrap().policies);
        assert!(enforcer.drifting.is_empty(), "{:?}", enforcer.drifting);
        assert_eq!(enforcer.drift.changed(), Changed::Cgroups(BTreeSet::new()));

        std::fs::write(root.join("b/memory.max"), "max").unwrap();
        assert_eq!(
            enforcer.drift.changed(),
            Changed::Cgroups(BTreeSet::from(["/b".into()]))
        );
    }

    #[test]
    fn cgroups_that_keep_and_had_the_same_values_share_one_copy() {
        let dir = StateDir::new("shared");
        memory_cgroups(&dir, &["a", "b", "c"]);
        let policy = |memory: &str| {
            format!("policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: {memory}\n")
        };
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), &policy("64M"));
        enforcer.apply_all();
        // One copy of what every cgroup keeps, one of what each had: (kept, had).
        let shared = |enforcer: &Enforcer| -> (Files, SavedList) {
            let kept: Vec<&Arc<Files>> = enforcer.applied.values().map(|a| &a.expected).collect();
            let had: Vec<&Arc<SavedList>> = enforcer
                .saved
                .cgroups
                .values()
                .map(|saved| &saved.0)
                .collect();
            assert_eq!((kept.len(), had.len()), (3, 3));
            assert!(kept.iter().all(|each| Arc::ptr_eq(each, kept[0])));
            assert!(had.iter().all(|each| Arc::ptr_eq(each, had[0])));
            let view = Arc::clone(&enforcer.view.lock().unwrap().cgroups);
            let summaries: Vec<&AppliedSummary> = view.values().collect();
            assert!(summaries.iter().all(|each| {
                Arc::ptr_eq(&each.policy, &summaries[0].policy)
                    && Arc::ptr_eq(
                        each.memory_max.as_ref().unwrap(),
                        summaries[0].memory_max.as_ref().unwrap(),
                    )
            }));
            // Each cgroup holds the policy file's entry in force, not a copy or an older one.
            assert!(
                enforcer
                    .applied
                    .values()
                    .all(|applied| Arc::ptr_eq(&applied.policy, &enforcer.policy.services[0]))
            );
            ((*kept[0]).to_vec(), (*had[0]).to_vec())
        };
        assert_eq!(
            shared(&enforcer),
            (
                vec![("memory.max", "67108864".to_owned())],
                vec![("memory.max".into(), "max".to_owned())]
            )
        );
        enforcer.reload(Config::parse("c.yaml", &policy("32M")).unwrap().policies);
        assert_eq!(
            shared(&enforcer),
            (
                vec![("memory.max", "33554432".to_owned())],
                vec![("memory.max".into(), "max".to_owned())]
            )
        );
        // A reload that changes nothing: each cgroup takes the new entry (checked by `shared`).
        enforcer.reload(Config::parse("c.yaml", &policy("32M")).unwrap().policies);
        assert_eq!(shared(&enforcer).0, [("memory.max", "33554432".to_owned())]);
        // What no cgroup keeps any more is forgotten.
        assert_eq!(
            (
                enforcer.kept_values.values.len(),
                enforcer.original_values.values.len()
            ),
            (1, 1)
        );
    }

    #[test]
    fn a_policed_cgroup_is_named_once_in_memory_across_a_reload() {
        let dir = StateDir::new("named-once");
        memory_cgroups(&dir, &["a"]);
        let policy = |memory: &str| {
            format!("policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: {memory}\n")
        };
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), &policy("64M"));
        enforcer.apply_all();
        let names = |enforcer: &Enforcer| {
            let (applied, _) = enforcer.applied.get_key_value("/a").unwrap();
            let view = Arc::clone(&enforcer.view.lock().unwrap().cgroups);
            let (published, _) = view.get_key_value("/a").unwrap();
            assert!(Arc::ptr_eq(applied, enforcer.drift.watched("/a").unwrap()));
            assert!(Arc::ptr_eq(applied, published));
            CgroupPath::clone(applied)
        };
        let before = names(&enforcer);
        enforcer.reload(Config::parse("c.yaml", &policy("32M")).unwrap().policies);
        assert!(Arc::ptr_eq(&before, &names(&enforcer)));
    }

    #[test]
    fn a_pass_names_a_few_services_in_the_recent_events_and_counts_many() {
        let dir = StateDir::new("pass-events");
        let many: Vec<String> = (0..=PASS_EVENTS_PER_POLICY)
            .map(|index| format!("b-{index}"))
            .collect();
        let names: Vec<&str> = ["a-1", "a-2"]
            .into_iter()
            .chain(many.iter().map(String::as_str))
            .collect();
        memory_cgroups(&dir, &names);
        let policy = "policies:\n  - name: few\n    cgroup: a-*\n    memory.max: 64M\n  \
                      - name: many\n    cgroup: b-*\n    memory.max: 64M\n";
        let (mut enforcer, mut events) =
            enforcer_with_events(&dir, &SavedOriginals::default(), policy);
        enforcer.apply_all();
        let recorded: Vec<(String, String, String)> = events
            .take_queued()
            .into_iter()
            .map(|event| (event.kind, event.subject, event.detail))
            .collect();
        let event = |subject: &str, detail: &str| {
            (
                "set_limits".to_owned(),
                subject.to_owned(),
                detail.to_owned(),
            )
        };
        assert_eq!(
            recorded,
            [
                event("a-1", ""),
                event("a-2", ""),
                event("policy many", &format!("{} services", many.len())),
            ]
        );
        // Each service is still counted.
        assert_eq!(enforcer.applied.len(), names.len());
    }

    #[test]
    fn a_cgroup_whose_creation_was_missed_gets_its_policy_at_the_next_walk() {
        let dir = StateDir::new("missed");
        let root = memory_cgroups(&dir, &["a"]);
        let policy = "policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: 64M\n";
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), policy);
        enforcer.apply_all();
        // Made without the enforcer being told (its queue full, or the record lost).
        memory_cgroups(&dir, &["b"]);
        let memory_max =
            |cgroup: &str| std::fs::read_to_string(root.join(cgroup).join("memory.max")).unwrap();
        enforcer.tick();
        assert_eq!(memory_max("b"), "max", "walked before it was due");
        enforcer.next_catch_up = Instant::now();
        enforcer.tick();
        assert_eq!([memory_max("a"), memory_max("b")], ["67108864", "67108864"]);
        assert_eq!(enforcer.applied.len(), 2);
        assert!(enforcer.next_catch_up > Instant::now() + CATCH_UP / 2);
        let view = Arc::clone(&enforcer.view.lock().unwrap().cgroups);
        assert!(view.contains_key("/b"));
        // A path too long for the kernel's record asks for a walk: no sooner than the spacing
        // after the last, however many ask.
        let walked = enforcer.last_catch_up;
        for _ in 0..100 {
            enforcer.rescan();
        }
        assert_eq!(enforcer.next_catch_up, walked + RESCAN_SPACING);
    }

    #[test]
    fn a_reload_walks_the_hierarchy_only_when_the_targets_change() {
        let dir = StateDir::new("reload-walk");
        let root = memory_cgroups(&dir, &["a", "b"]);
        let policy = |target: &str, mode: &str, memory: &str| {
            format!(
                "policies:\n  - name: p\n    cgroup: \"{target}\"\n    mode: {mode}\n    \
                 memory.max: {memory}\n"
            )
        };
        let reload = |enforcer: &mut Enforcer, text: &str| {
            enforcer.reload(Config::parse("c.yaml", text).unwrap().policies);
        };
        let memory_max =
            |cgroup: &str| std::fs::read_to_string(root.join(cgroup).join("memory.max")).unwrap();
        let mut enforcer = enforcer(
            &dir,
            &SavedOriginals::default(),
            &policy("?", "enforce", "64M"),
        );
        enforcer.apply_all();
        // Made without the enforcer being told: a reload that keeps the targets does not walk.
        memory_cgroups(&dir, &["c"]);
        reload(&mut enforcer, &policy("?", "enforce", "32M"));
        assert_eq!(
            [memory_max("a"), memory_max("b"), memory_max("c")],
            ["33554432", "33554432", "max"]
        );
        // Another mode: each cgroup is let go and taken again as the policy says.
        reload(&mut enforcer, &policy("?", "observe", "32M"));
        assert_eq!([memory_max("a"), memory_max("b")], ["max", "max"]);
        assert_eq!(enforcer.applied.len(), 2);
        assert!(
            enforcer
                .applied
                .values()
                .all(|applied| applied.expected.is_empty())
        );
        // Other targets: the walk finds every cgroup they match.
        reload(&mut enforcer, &policy("*", "enforce", "32M"));
        assert_eq!(
            [memory_max("a"), memory_max("b"), memory_max("c")],
            ["33554432", "33554432", "33554432"]
        );
        assert_eq!(enforcer.applied.len(), 3);
    }

    #[test]
    fn an_enforcer_wakes_only_for_what_it_keeps() {
        let dir = StateDir::new("no-timer");
        memory_cgroups(&dir, &["a"]);
        let next_tick = Instant::now() + TICK;
        let mut idle = enforcer(&dir, &SavedOriginals::default(), "");
        idle.apply_all();
        assert_eq!(idle.next_wake(next_tick), None);
        let policy = "policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: 64M\n";
        let mut keeping = enforcer(&dir, &SavedOriginals::default(), policy);
        keeping.apply_all();
        // Without the kernel's notices, the limits kept are looked at every tick.
        assert_eq!(keeping.next_wake(next_tick), Some(next_tick));
        // With them, it wakes for the next walk or sweep round, or a notice.
        keeping.drift.wake_with(|| true);
        assert_eq!(
            keeping.next_wake(next_tick),
            Some(keeping.next_catch_up.min(keeping.sweep.next_round()))
        );
        // A memory guard is looked at every tick.
        let guarded = format!("{policy}    terminate_above: 32M\n    for: 10s\n    grace: 5s\n");
        let mut guarding = enforcer(&dir, &SavedOriginals::default(), &guarded);
        guarding.apply_all();
        guarding.drift.wake_with(|| true);
        assert_eq!(guarding.next_wake(next_tick), Some(next_tick));
    }

    #[test]
    fn a_flood_of_notices_is_checked_once_per_tick_and_a_lone_one_at_once() {
        let start = Instant::now();
        let mut pace = NoticePace::new(start);
        // A writer who writes every millisecond for ten ticks, from a tick after the last
        // check: the loop checks when a notice is not held, and when the held one is due.
        let tick = TICK.as_millis() as u64;
        let mut checks = 0;
        for ms in tick..11 * tick {
            let now = start + Duration::from_millis(ms);
            if pace.held().is_some_and(|due| now >= due) || pace.noticed(now) {
                checks += 1;
                pace.ticked(now);
            }
        }
        assert_eq!(checks, 10);
        // After a quiet spell, a notice is checked at once and nothing is held.
        let quiet = start + 20 * TICK;
        assert!(pace.noticed(quiet));
        pace.ticked(quiet);
        assert_eq!(pace.held(), None);
        // One within a tick is held until the tick is out.
        assert!(!pace.noticed(quiet + TICK / 2));
        assert_eq!(pace.held(), Some(quiet + TICK));
    }

    #[test]
    fn a_write_by_someone_else_during_a_pass_is_drift_once_the_own_notices_are_read() {
        let dir = StateDir::new("foreign-in-pass");
        let root = memory_cgroups(&dir, &["a", "b"]);
        let policy = "policies:\n  - name: all\n    cgroup: \"*\"\n    memory.max: 64M\n";
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), policy);
        // A pass as `apply_all` makes it, with the notices read after `/a` as every
        // `OWN_NOTICES_BATCH` cgroups.
        enforcer.pass = Some(Pass::default());
        enforcer.reconcile("/a");
        enforcer.read_notices();
        std::fs::write(root.join("a/memory.max"), "max").unwrap();
        enforcer.reconcile("/b");
        enforcer.end_pass();
        assert_eq!(enforcer.drifting, BTreeSet::from(["/a".into()]));

        enforcer.tick();
        assert_eq!(
            std::fs::read_to_string(root.join("a/memory.max")).unwrap(),
            "67108864"
        );
        // The next tick reads the restored value back and finds it in place.
        enforcer.tick();
        assert!(enforcer.drifting.is_empty(), "{:?}", enforcer.drifting);
    }

    #[test]
    fn a_cgroup_made_again_at_its_path_gets_its_policy_as_a_new_one_and_no_drift() {
        let dir = StateDir::new("made-again");
        let root = memory_cgroups(&dir, &["a"]);
        let policy = "policies:\n  - name: all\n    cgroup: \"a\"\n    memory.max: 64M\n";
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), policy);
        enforcer.apply_all();
        let first_id = enforcer.applied["/a"].id;
        // A restarted service: a new cgroup with other defaults comes at the same path, and the
        // old one goes, before the enforcer looks. (Moved away first so that the test's
        // filesystem cannot give the new directory the old inode number, which cgroupfs never
        // does.)
        std::fs::rename(root.join("a"), root.join("a.old")).unwrap();
        memory_cgroups(&dir, &["a"]);
        std::fs::write(root.join("a/memory.max"), "33554432").unwrap();
        std::fs::remove_dir_all(root.join("a.old")).unwrap();

        enforcer.tick();
        let applied = &enforcer.applied["/a"];
        assert_ne!(applied.id, first_id);
        assert_eq!(applied.fix.retry_at, None);
        assert!(enforcer.drifting.is_empty(), "{:?}", enforcer.drifting);
        assert_eq!(
            std::fs::read_to_string(root.join("a/memory.max")).unwrap(),
            "67108864"
        );
        // Its originals are the new cgroup's, given back when the policy lets go.
        assert_eq!(
            enforcer.saved.files("/a"),
            [("memory.max", "33554432".to_owned())]
        );
        // Its writes are watched.
        std::fs::write(root.join("a/memory.max"), "max").unwrap();
        enforcer.tick();
        assert_eq!(enforcer.drifting, BTreeSet::from(["/a".into()]));
    }

    #[test]
    fn a_reload_writes_only_what_changes_and_gives_back_what_is_dropped() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

        let dir = StateDir::new("retarget");
        let root = dir.0.join("cgroup");
        for (cgroup, files) in [
            ("", vec![("cgroup.controllers", "memory cpu pids")]),
            (
                "svc",
                vec![
                    ("cgroup.controllers", "memory cpu pids"),
                    ("memory.max", "max"),
                    ("memory.high", "max"),
                    ("pids.max", "max"),
                ],
            ),
        ] {
            std::fs::create_dir_all(root.join(cgroup)).unwrap();
            std::fs::write(root.join(cgroup).join("cgroup.subtree_control"), "").unwrap();
            for (file, value) in files {
                std::fs::write(root.join(cgroup).join(file), value).unwrap();
            }
        }
        let policy = |limits: &str| format!("policies:\n  - name: svc\n    cgroup: svc\n{limits}");
        let first = policy("    memory.max: 64M\n    pids.max: 1000\n");
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), &first);
        enforcer.apply_all();
        let read = |file: &str| std::fs::read_to_string(root.join("svc").join(file)).unwrap();
        assert_eq!(
            [read("memory.max"), read("memory.high"), read("pids.max")],
            ["67108864", "max", "1000"]
        );

        let writes = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let watched: Vec<_> = ["memory.max", "memory.high", "pids.max"]
            .into_iter()
            .map(|file| {
                let flags = AddWatchFlags::IN_CLOSE_WRITE;
                (
                    writes
                        .add_watch(&root.join("svc").join(file), flags)
                        .unwrap(),
                    file,
                )
            })
            .collect();
        let second = policy("    memory.max: 64M\n    memory.high: 32M\n");
        enforcer.reload(Config::parse("c.yaml", &second).unwrap().policies);
        let mut written: Vec<&str> = writes
            .read_events()
            .unwrap()
            .iter()
            .map(|event| watched.iter().find(|(wd, _)| *wd == event.wd).unwrap().1)
            .collect();
        written.sort();
        // memory.max keeps its value unwritten; memory.high is set, pids.max given back.
        assert_eq!(written, ["memory.high", "pids.max"]);
        assert_eq!(
            [read("memory.max"), read("memory.high"), read("pids.max")],
            ["67108864", "33554432", "max"]
        );
        assert_eq!(enforcer.saved.cgroups.len(), 1);
        let mut saved: Vec<(String, String)> = enforcer
            .saved
            .cgroups
            .values()
            .next()
            .unwrap()
            .0
            .iter()
            .map(|(file, value)| (file.to_string(), value.clone()))
            .collect();
        saved.sort();
        assert_eq!(
            saved,
            [
                ("memory.high".to_string(), "max".to_string()),
                ("memory.max".to_string(), "max".to_string())
            ]
        );
        assert_eq!(enforcer.applied.len(), 1);
        assert_eq!(
            *enforcer.applied.values().next().unwrap().expected,
            [
                ("memory.max", "67108864".to_string()),
                ("memory.high", "33554432".to_string())
            ]
        );
    }

    #[test]
    fn a_reload_on_the_same_files_writes_only_the_changed_values_in_place_and_reports_a_failure() {
        use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify};

        let dir = StateDir::new("rewrite");
        let root = dir.0.join("cgroup");
        for cgroup in ["", "svc-a", "svc-b"] {
            std::fs::create_dir_all(root.join(cgroup)).unwrap();
            for (file, value) in [
                ("cgroup.controllers", "memory cpu pids"),
                ("cgroup.subtree_control", ""),
                ("memory.max", "max"),
                ("memory.high", "max"),
            ] {
                std::fs::write(root.join(cgroup).join(file), value).unwrap();
            }
        }
        let policy = |high: &str, stop: &str| {
            format!(
                "policies:\n  - name: svc\n    cgroup: svc-*\n    memory.max: 64M\n    \
                 memory.high: {high}\n{stop}"
            )
        };
        let mut enforcer = enforcer(&dir, &SavedOriginals::default(), &policy("32M", ""));
        enforcer.apply_all();
        let originals = enforcer.saved.files("/svc-a");
        assert_eq!(
            originals,
            [
                ("memory.max", "max".to_string()),
                ("memory.high", "max".to_string())
            ]
        );
        assert!(enforcer.applied["/svc-a"].guard.is_none());
        // svc-b's memory.high can no longer be written.
        let blocked = root.join("svc-b").join("memory.high");
        std::fs::remove_file(&blocked).unwrap();
        std::fs::create_dir(&blocked).unwrap();
        let writes = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let watched: Vec<_> = ["memory.max", "memory.high"]
            .into_iter()
            .map(|file| {
                let flags = AddWatchFlags::IN_CLOSE_WRITE;
                let file_path = root.join("svc-a").join(file);
                (writes.add_watch(&file_path, flags).unwrap(), file)
            })
            .collect();

        let second = policy("16M", "    terminate_above: 48M\n");
        enforcer.reload(Config::parse("c.yaml", &second).unwrap().policies);
        let written: Vec<&str> = writes
            .read_events()
            .unwrap()
            .iter()
            .map(|event| watched.iter().find(|(wd, _)| *wd == event.wd).unwrap().1)
            .collect();
        assert_eq!(written, ["memory.high"]);
        let read = |file: &str| std::fs::read_to_string(root.join("svc-a").join(file)).unwrap();
        assert_eq!(
            [read("memory.max"), read("memory.high")],
            ["67108864", "16777216"]
        );
        // The same files: the originals stay as they were saved.
        assert_eq!(enforcer.saved.files("/svc-a"), originals);
        let kept = &enforcer.applied["/svc-a"];
        assert_eq!(
            *kept.expected,
            [
                ("memory.max", "67108864".to_string()),
                ("memory.high", "16777216".to_string())
            ]
        );
        // The new policy's graceful stop guards it.
        assert!(kept.guard.is_some());
        assert_eq!(kept.policy.graceful_stop.unwrap().terminate_above, 48 << 20);
        // svc-b is not kept with values it does not hold: it is reported as failed.
        assert!(!enforcer.applied.contains_key("/svc-b"));
        let Some((name, ServiceOutcome::Failed { reason })) = enforcer.unapplied.get("/svc-b")
        else {
            panic!("{:?}", enforcer.unapplied);
        };
        assert_eq!(name, "svc");
        assert!(reason.contains("memory.high"), "{reason}");
        assert!(enforcer.drifting.is_empty(), "{:?}", enforcer.drifting);
    }

    #[test]
    fn a_unit_is_given_back_when_its_policy_goes_away_or_changes() {
        let dir = StateDir::new("stale");
        let saved = SavedOriginals {
            cgroups: BTreeMap::new(),
            units: BTreeMap::from([("nginx.service".to_string(), nginx_record(64 << 20))]),
        };
        let stale = |file: &str| enforcer(&dir, &saved, file).stale_units();
        let policy = |settings: &str| {
            format!("policies:\n  - name: web\n    unit: nginx.service\n{settings}")
        };
        // The same properties: the drop-ins stay, and so do the saved originals.
        assert!(stale(&policy("    memory.max: 64M\n")).is_empty());
        for changed in [
            policy("    memory.max: 128M\n"),
            policy("    memory.max: 64M\n    pids.max: 10\n"),
            policy("    memory.max: 64M\n    mode: observe\n"),
            "policies: []\n".to_string(),
        ] {
            assert_eq!(stale(&changed), ["nginx.service"], "{changed}");
        }
    }

    #[test]
    fn unit_records_survive_a_restart() {
        let dir = StateDir::new("restart");
        let mut record = nginx_record(64 << 20);
        record.drop_ins.insert(
            "50-TasksMax.conf".into(),
            Some("[Service]\nTasksMax=300\n".into()),
        );
        let saved = SavedOriginals {
            cgroups: BTreeMap::from([(
                "workers/a".to_string(),
                SavedFiles(Arc::new(vec![("memory.max".into(), "max".to_string())])),
            )]),
            units: BTreeMap::from([("nginx.service".to_string(), record.clone())]),
        };
        let loaded = enforcer(&dir, &saved, "policies: []\n").saved;
        assert_eq!(loaded.units, saved.units);
        assert_eq!(loaded.cgroups, saved.cgroups);
    }

    #[test]
    fn a_saved_original_of_a_file_this_version_does_not_know_is_kept() {
        // Written by a later version that also sets io.max.
        let text = r#"{"cgroups":{"/a":{"io.max":"8:0 rbps=max","memory.max":"max"}}}"#;
        let saved: SavedOriginals = serde_json::from_str(text).unwrap();
        assert_eq!(saved.files("/a"), [("memory.max", "max".to_owned())]);
        let written = serde_json::to_value(&saved).unwrap();
        assert_eq!(
            written["cgroups"]["/a"],
            serde_json::json!({"io.max": "8:0 rbps=max", "memory.max": "max"})
        );
    }

    #[test]
    fn a_state_file_from_before_the_systemd_backend_is_read() {
        let dir = StateDir::new("older");
        std::fs::write(
            dir.0.join("cgroup-originals.json"),
            r#"{"version":1,"cgroups":{"workers/a":{"memory.max":"max"}}}"#,
        )
        .unwrap();
        let state = StateFile::<SavedOriginals>::new(dir.0.join("cgroup-originals.json"));
        let saved = state.load().unwrap().unwrap();
        assert_eq!(saved.files("workers/a"), [("memory.max", "max".to_owned())]);
        assert!(saved.units.is_empty());
    }
}
