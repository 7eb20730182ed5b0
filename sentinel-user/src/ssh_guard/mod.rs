//! The SSH brute-force guard: failed authentications seen in the kernel become bans in
//! Sentinel's nftables table within milliseconds, with no log in between.
//!
//! The guard runs on its own thread: a ban is a netlink round-trip, and it must not wait
//! behind anything else the daemon does.

pub mod audit;
pub mod engine;
mod fleet;
mod metrics;
pub mod settings;

use std::{
    collections::HashMap,
    net::IpAddr,
    path::PathBuf,
    sync::mpsc::{RecvTimeoutError, Sender},
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info, warn};

use self::{
    audit::{AuditAction, AuditLog, AuditRecord},
    engine::{BanEngine, GuardRules, SkipReason, Verdict},
};
pub use self::{fleet::Unbanned, metrics::SshGuardMetrics};
use crate::{
    Error,
    cgroup::guardian::ProcessHandle,
    crowdsec::{FleetUpdate, is_fleet_reason},
    events::{SshAuth, SshOutcome},
    firewall::{Ban, Firewall, FirewallOptions, IpNet, TableWatch},
    port_scan::{PORT_SCAN_REASON, Scanner},
    queue::Inbox,
    recent::Recorder,
    state::{Clocks, SavedBan, SavedOffense, SavedState, StateFile},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GuardMode {
    Enforce,
    /// Detect, count and audit "would ban"; never touch the firewall.
    Observe,
}

pub struct SshGuardSettings {
    pub mode: GuardMode,
    pub rules: GuardRules,
    pub firewall: FirewallOptions,
    pub audit_log: PathBuf,
    /// Where the bans in force and the offense counts are kept across restarts.
    pub state_file: PathBuf,
}

/// What reaches the guard's thread.
pub enum Input {
    Auth(SshAuth),
    Control(Control),
    /// Something may have removed bans from the table (see `firewall::TableWatch`).
    TableChanged,
    /// The configuration file was reloaded.
    Reload(LiveSettings),
    /// The fleet's decisions, from CrowdSec's Local API.
    Fleet(FleetUpdate),
    /// An address found scanning ports, to ban (or, in `mode` observe, to audit) as an offender.
    Scanner {
        scanner: Scanner,
        mode: GuardMode,
    },
    Stop,
}

/// A ban the engine called for, made once nftables has it.
struct Decided {
    ban: Ban,
    reason: &'static str,
    failures: u32,
    offense: u32,
    failed_at_ns: u64,
}

/// The state file is rewritten at most this often while bans change.
const STATE_WRITE_SPACING: Duration = Duration::from_secs(1);

/// Bans about to end anyway are not put back when found missing.
const RESTORE_AT_LEAST: Duration = Duration::from_secs(1);

/// Operator requests from the control socket.
/// What a reload changes in a running guard; the rest of its settings need a restart.
#[derive(Debug, Clone)]
pub struct LiveSettings {
    pub rules: GuardRules,
    pub flush_on_exit: bool,
}

pub enum Control {
    List(Sender<Vec<BanInfo>>),
    Status(Sender<GuardStatus>),
    /// `net` is an address, to be widened like an offender's, or a network, banned as given.
    Ban {
        net: IpNet,
        duration: Duration,
        reply: Sender<Result<IpNet, String>>,
    },
    Unban {
        net: IpNet,
        reply: Sender<Result<Unbanned, String>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BanInfo {
    pub address: String,
    pub reason: String,
    pub failures: u32,
    pub expires_in_seconds: u64,
}

/// The guard at a glance, for `sentinel status`.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct GuardStatus {
    pub mode: GuardMode,
    /// Addresses with recent failures.
    pub tracked_addresses: u64,
    pub bans_in_force: u64,
}

pub struct SshGuard {
    mode: GuardMode,
    engine: BanEngine,
    firewall: Option<Firewall>,
    audit: AuditLog,
    metrics: SshGuardMetrics,
    /// Why each ban in force was made, for `sentinel bans`.
    reasons: HashMap<IpNet, (String, u32)>,
    state: StateFile<SavedState>,
    /// `flush_on_exit`: the bans end with the daemon, on disk too.
    forget_bans_on_exit: bool,
    /// `None` unless the daemon takes part in a CrowdSec fleet.
    fleet: Option<fleet::FleetLink>,
    /// Every audit record also goes to the daemon's recent events.
    recent: Recorder,
}

impl SshGuard {
    /// Opens the firewall (enforce mode), adopts the bans already in the kernel and puts back
    /// the saved bans still in force that the kernel lost (a reboot, a flushed ruleset).
    pub fn open(
        settings: SshGuardSettings,
        metrics: SshGuardMetrics,
        recent: Recorder,
    ) -> Result<Self, Error> {
        let mut engine = BanEngine::new(settings.rules);
        let audit = AuditLog::open(&settings.audit_log)?;
        let forget_bans_on_exit = settings.firewall.flush_on_exit;
        let state = StateFile::new(settings.state_file);
        let saved = match state.load() {
            Ok(saved) => saved.unwrap_or_default(),
            Err(error) => {
                error!("{error}; starting without the saved bans (those in the kernel stay)");
                SavedState::default()
            }
        };
        let clocks = Clocks::read();
        let now = clocks.now;
        for offense in &saved.offenses {
            let ends = clocks.to_instant(offense.ends_unix_ms);
            engine.record_offense(offense.net, offense.count, ends);
        }
        let saved_bans: Vec<(Ban, &SavedBan)> = saved
            .bans
            .iter()
            .filter_map(|saved| {
                let until = clocks.to_instant(saved.expires_unix_ms);
                let timeout = until.saturating_duration_since(now);
                (timeout >= RESTORE_AT_LEAST).then_some((
                    Ban {
                        net: saved.net,
                        timeout,
                    },
                    saved,
                ))
            })
            .collect();
        let firewall = match settings.mode {
            GuardMode::Observe => None,
            GuardMode::Enforce => {
                let mut firewall = Firewall::open(settings.firewall)?;
                let adopted = firewall.list()?;
                for ban in &adopted {
                    let remaining = ban
                        .expires_in
                        .unwrap_or(Duration::from_secs(u32::MAX.into()));
                    engine.record_ban(ban.net, now, remaining, 1);
                }
                if !adopted.is_empty() {
                    info!(
                        bans = adopted.len(),
                        "adopted the bans already in the kernel"
                    );
                }
                Some(firewall)
            }
        };
        let mut reasons = HashMap::new();
        for (ban, saved) in &saved_bans {
            if is_fleet_reason(&saved.reason) {
                engine.hold(ban.net, now + ban.timeout);
            } else {
                engine.record_ban(ban.net, now, ban.timeout, 1);
            }
            reasons.insert(ban.net, (saved.reason.clone(), saved.failures));
        }
        let mut guard = Self {
            mode: settings.mode,
            engine,
            firewall,
            audit,
            metrics,
            reasons,
            state,
            forget_bans_on_exit,
            fleet: None,
            recent,
        };
        // Saved bans the kernel lost (a reboot, a flushed ruleset while the daemon was down).
        let restored = guard.restore_missing_bans()?;
        if restored > 0 {
            info!(
                bans = restored,
                "restored the saved bans the kernel no longer had, with their remaining time"
            );
        }
        guard.update_gauges();
        Ok(guard)
    }

    /// What tells of bans removed behind the guard's back, for a thread that forwards it as
    /// `Input::TableChanged` (enforce mode only).
    pub fn take_table_watch(&mut self) -> Option<TableWatch> {
        self.firewall.as_mut()?.take_table_watch()
    }

    /// Handles inputs until `Stop` (or every sender is gone); bans stay unless the firewall
    /// was configured to flush on exit.
    pub fn run(mut self, inputs: Inbox<Input>) {
        loop {
            // Woken by time only when a ban ends, an offender is to be forgotten or the state
            // file is due: an idle guard sleeps.
            let now = Instant::now();
            let wake = [
                self.engine.next_change(now),
                self.state.due_at(now, STATE_WRITE_SPACING),
            ]
            .into_iter()
            .flatten()
            .min();
            let wait = wake.map_or(Duration::MAX, |at| at.saturating_duration_since(now));
            let first = match inputs.recv_timeout(wait) {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout) => {
                    self.engine.forget_old_offenses(Instant::now());
                    self.update_gauges();
                    self.save_state(STATE_WRITE_SPACING);
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Everything already queued goes into the same firewall transaction.
            let mut batch = vec![first];
            batch.extend(inputs.try_iter());
            let stop = batch.iter().any(|input| matches!(input, Input::Stop));
            self.handle(batch);
            self.save_state(STATE_WRITE_SPACING);
            if stop {
                break;
            }
        }
        if self.forget_bans_on_exit {
            // The table goes with its bans: a restart must not bring them back.
            self.engine.lift_all();
            self.state.mark_changed();
        }
        self.save_state(Duration::ZERO);
        if let Some(firewall) = self.firewall.take()
            && let Err(error) = firewall.close()
        {
            error!("closing the firewall failed: {error}");
        }
    }

    fn handle(&mut self, inputs: Vec<Input>) {
        let now = Instant::now();
        let mut decided = Vec::new();
        let mut table_changed = false;
        for input in inputs {
            match input {
                Input::Auth(auth) => decided.extend(self.on_auth(now, &auth)),
                Input::Control(control) => self.on_control(now, control),
                Input::TableChanged => table_changed = true,
                Input::Reload(live) => self.reload(now, live),
                Input::Fleet(update) => self.on_fleet(now, update),
                Input::Scanner { scanner, mode } => {
                    decided.extend(self.on_scanner(now, scanner, mode));
                }
                Input::Stop => {}
            }
        }
        if table_changed {
            match self.restore_missing_bans() {
                Ok(0) => {}
                Ok(restored) => warn!(
                    bans = restored,
                    "bans in force were missing from nftables (ruleset flushed or table edited); \
                     restored with their remaining time"
                ),
                Err(error) => error!("restoring the bans missing from nftables failed: {error}"),
            }
        }
        if !decided.is_empty() {
            self.make_bans(decided);
        }
        self.update_gauges();
    }

    /// Takes the reloaded settings, and lifts the bans the allow list now covers.
    fn reload(&mut self, now: Instant, live: LiveSettings) {
        self.engine.set_rules(live.rules);
        self.forget_bans_on_exit = live.flush_on_exit;
        if let Some(firewall) = &mut self.firewall {
            firewall.set_flush_on_exit(live.flush_on_exit);
        }
        let allowed = self.engine.allowed_bans(now);
        if allowed.is_empty() {
            return;
        }
        if let Some(firewall) = &mut self.firewall
            && let Err(error) = firewall.unban(&allowed)
        {
            error!(
                bans = allowed.len(),
                "lifting the bans the allow list now covers failed; they stay until they expire \
                 or the next reload: {error}"
            );
            return;
        }
        for net in &allowed {
            self.engine.lift(net);
            warn!(address = %net, "ban lifted: the reloaded allow list covers it");
            self.audit(AuditRecord::new(
                AuditAction::Unban,
                net,
                "allowlisted",
                0,
                None,
            ));
        }
        self.state.mark_changed();
    }

    /// Commits the bans in one transaction; only then are they counted, audited and listed.
    /// Bans the kernel refused are not recorded as made.
    fn make_bans(&mut self, decided: Vec<Decided>) {
        if let Some(firewall) = &mut self.firewall {
            let bans: Vec<Ban> = decided.iter().map(|decision| decision.ban).collect();
            if let Err(error) = firewall.ban(&bans) {
                error!(
                    "committing {} ban(s) to nftables failed; they are not in force: {error}",
                    bans.len()
                );
                for decision in &decided {
                    self.engine.withdraw(&decision.ban.net, decision.offense);
                }
                self.metrics.commit_failures.inc_by(bans.len() as u64);
                return;
            }
            let committed = monotonic_ns();
            for decision in &decided {
                let latency = committed.saturating_sub(decision.failed_at_ns) as f64 / 1e9;
                self.metrics.ban_latency_seconds.observe(latency);
            }
        }
        let action = match self.mode {
            GuardMode::Enforce => AuditAction::Ban,
            GuardMode::Observe => AuditAction::WouldBan,
        };
        for Decided {
            ban,
            reason,
            failures,
            ..
        } in decided
        {
            match self.mode {
                GuardMode::Enforce => {
                    self.share(ban.net, SystemTime::now() + ban.timeout, reason, failures);
                    self.metrics.bans(reason).inc();
                }
                // Not a ban: counted as one the threshold called for but that was not made.
                GuardMode::Observe => {
                    self.metrics.skipped("observe_mode").inc();
                }
            }
            self.reasons.insert(ban.net, (reason.to_string(), failures));
            self.state.mark_changed();
            self.audit(AuditRecord::new(
                action,
                &ban.net,
                reason,
                failures,
                Some(SystemTime::now() + ban.timeout),
            ));
        }
    }

    /// Puts back every ban in force that the kernel no longer has, with its remaining time;
    /// returns how many. Reading the table also recreates it when it is gone.
    fn restore_missing_bans(&mut self) -> Result<usize, Error> {
        let Some(firewall) = &mut self.firewall else {
            return Ok(0);
        };
        let in_kernel = firewall.list()?;
        let now = Instant::now();
        let missing: Vec<Ban> = self
            .engine
            .bans(now)
            .filter(|(net, _)| !in_kernel.iter().any(|ban| ban.net.contains(net)))
            .filter_map(|(net, until)| {
                let remaining = until.saturating_duration_since(now);
                (remaining >= RESTORE_AT_LEAST).then_some(Ban {
                    net: *net,
                    timeout: remaining,
                })
            })
            .collect();
        if !missing.is_empty() {
            firewall.ban(&missing)?;
            self.metrics.restored.inc_by(missing.len() as u64);
        }
        Ok(missing.len())
    }

    /// Returns the ban to make, if this authentication calls for one.
    fn on_auth(&mut self, now: Instant, auth: &SshAuth) -> Option<Decided> {
        let Ok(addr) = auth.remote_host.parse::<IpAddr>() else {
            warn!(
                remote = auth.remote_host,
                "ssh remote host is not an IP address (sshd UseDNS?); cannot ban it"
            );
            return None;
        };
        if auth.outcome == SshOutcome::SessionOpened {
            match ProcessHandle::open(auth.pid as i32) {
                Ok(session) => self
                    .engine
                    .session_opened(addr, move || session.signal(0).unwrap_or(false)),
                Err(error) => warn!(pid = auth.pid, "cannot watch the ssh session: {error}"),
            }
            return None;
        }
        let verdict = match auth.outcome {
            SshOutcome::PreauthEnd => {
                self.metrics.preauth_ends.inc();
                self.engine.preauth_end(now, addr)
            }
            _ => {
                self.metrics.auth_failures.inc();
                self.engine.failure(now, addr)
            }
        };
        match verdict {
            Verdict::Counted => None,
            Verdict::Skip {
                net,
                reason,
                failures,
            } => {
                self.spared(&net, reason, reason.label().to_owned(), failures);
                None
            }
            Verdict::Ban {
                net,
                duration,
                failures,
                offense,
            } => {
                let reason = if offense > 1 {
                    "ssh_repeat_offender"
                } else {
                    "ssh_failures"
                };
                info!(address = %net, failures, offense, ban_seconds = duration.as_secs(), mode = ?self.mode, "ban");
                Some(Decided {
                    ban: Ban {
                        net,
                        timeout: duration,
                    },
                    reason,
                    failures,
                    offense,
                    failed_at_ns: auth.timestamp_ns,
                })
            }
        }
    }

    /// Returns the ban to make for a port scanner. A scan found in observe mode, or while the
    /// guard itself only observes, is audited as a ban that would have been made.
    fn on_scanner(&mut self, now: Instant, scanner: Scanner, mode: GuardMode) -> Option<Decided> {
        let enforce = mode == GuardMode::Enforce && self.firewall.is_some();
        let verdict = if enforce {
            self.engine.convict(now, scanner.addr, scanner.ports)
        } else {
            let net = self.engine.offender(scanner.addr);
            match self.engine.skip_reason(now, &net) {
                Some(reason) => Verdict::Skip {
                    net,
                    reason,
                    failures: scanner.ports,
                },
                None => {
                    self.metrics.skipped("observe_mode").inc();
                    info!(address = %net, ports = scanner.ports, "port scan: would ban (observe mode)");
                    self.audit(AuditRecord::new(
                        AuditAction::WouldBan,
                        &net,
                        PORT_SCAN_REASON,
                        scanner.ports,
                        None,
                    ));
                    return None;
                }
            }
        };
        match verdict {
            Verdict::Counted => None,
            Verdict::Skip {
                net,
                reason,
                failures,
            } => {
                let audited = format!("{PORT_SCAN_REASON}/{}", reason.label());
                self.spared(&net, reason, audited, failures);
                None
            }
            Verdict::Ban {
                net,
                duration,
                failures,
                offense,
            } => {
                info!(address = %net, ports = failures, offense, ban_seconds = duration.as_secs(), "port scan: ban");
                Some(Decided {
                    ban: Ban {
                        net,
                        timeout: duration,
                    },
                    reason: PORT_SCAN_REASON,
                    failures,
                    offense,
                    failed_at_ns: monotonic_ns(),
                })
            }
        }
    }

    fn on_control(&mut self, now: Instant, control: Control) {
        match control {
            Control::List(reply) => {
                let reasons = &self.reasons;
                let list = self
                    .engine
                    .bans(now)
                    .map(|(net, until)| {
                        let (reason, failures) = reasons
                            .get(net)
                            .cloned()
                            .unwrap_or_else(|| ("adopted".into(), 0));
                        BanInfo {
                            address: net.to_string(),
                            reason,
                            failures,
                            expires_in_seconds: until.saturating_duration_since(now).as_secs(),
                        }
                    })
                    .collect();
                let _ = reply.send(list);
            }
            Control::Status(reply) => {
                let _ = reply.send(GuardStatus {
                    mode: self.mode,
                    tracked_addresses: self.engine.tracked() as u64,
                    bans_in_force: self.engine.bans(now).count() as u64,
                });
            }
            Control::Ban {
                net,
                duration,
                reply,
            } => {
                let net = self.operator_target(net);
                if self.engine.covers_allowed(&net) {
                    let _ = reply.send(Err(format!(
                        "refused: {net} holds an allow-listed address (ssh_guard.allow, loopback), \
                         which is never banned"
                    )));
                    return;
                }
                let result = self.commit(|firewall| {
                    firewall.ban(&[Ban {
                        net,
                        timeout: duration,
                    }])
                });
                if result.is_ok() {
                    self.engine.record_ban(net, now, duration, 1);
                    self.reasons.insert(net, ("operator".into(), 0));
                    self.state.mark_changed();
                    self.metrics.bans("operator").inc();
                    self.audit(AuditRecord::new(
                        AuditAction::Ban,
                        &net,
                        "operator",
                        0,
                        Some(SystemTime::now() + duration),
                    ));
                }
                let _ = reply.send(result.map(|()| net));
            }
            Control::Unban { net, reply } => {
                let net = self.unban_target(net);
                let result = self.commit(|firewall| firewall.unban(&[net])).map(|()| {
                    let ends = self.engine.ban_end(&net);
                    self.engine.lift(&net);
                    self.state.mark_changed();
                    let lifted = self.reasons.remove(&net);
                    let fleet_ban = lifted.is_some_and(|(reason, _)| is_fleet_reason(&reason));
                    let fleet_override = fleet_ban
                        .then(|| self.override_fleet_ban(net, now, ends))
                        .flatten();
                    self.audit(AuditRecord::new(
                        AuditAction::Unban,
                        &net,
                        if fleet_ban {
                            "operator_fleet_override"
                        } else {
                            "operator"
                        },
                        0,
                        None,
                    ));
                    Unbanned {
                        net,
                        fleet_override,
                    }
                });
                let _ = reply.send(result);
            }
        }
        self.update_gauges();
    }

    /// What an operator's ban or unban applies to: a single address as the guard itself would
    /// ban it (IPv6 widened to its prefix), a network as written.
    fn operator_target(&self, net: IpNet) -> IpNet {
        if net.prefix_len() == IpNet::from(net.network()).prefix_len() {
            self.engine.offender(net.network())
        } else {
            net
        }
    }

    /// What an operator's unban lifts: a ban in force on exactly what was given (a fleet ban
    /// of one IPv6 address is lifted as it was made, never widened to its prefix), otherwise
    /// what the same operator's ban would have banned.
    fn unban_target(&self, net: IpNet) -> IpNet {
        if self.engine.ban_end(&net).is_some() {
            net
        } else {
            self.operator_target(net)
        }
    }

    fn commit(
        &mut self,
        change: impl FnOnce(&mut Firewall) -> Result<(), crate::Error>,
    ) -> Result<(), String> {
        match &mut self.firewall {
            Some(firewall) => change(firewall).map_err(|e| e.to_string()),
            None => Err("the SSH guard is in observe mode: the firewall is not touched".into()),
        }
    }

    /// Writes the bans in force and the offense counts when they changed and the last write
    /// is at least `spacing` old.
    fn save_state(&mut self, spacing: Duration) {
        let clocks = Clocks::read();
        if !self.state.due(clocks.now, spacing) {
            return;
        }
        let reasons = &self.reasons;
        let bans = self
            .engine
            .bans(clocks.now)
            .map(|(net, until)| {
                let (reason, failures) = reasons
                    .get(net)
                    .cloned()
                    .unwrap_or_else(|| ("adopted".into(), 0));
                SavedBan {
                    net: *net,
                    expires_unix_ms: clocks.to_unix_ms(*until),
                    reason,
                    failures,
                }
            })
            .collect();
        let offenses = self
            .engine
            .offenses()
            .map(|(net, offense)| SavedOffense {
                net: *net,
                count: offense.count,
                ends_unix_ms: clocks.to_unix_ms(offense.ends),
            })
            .collect();
        if let Err(error) = self.state.write(&SavedState { bans, offenses }, clocks.now) {
            error!("{error}; the bans stay in the kernel but would not survive a reboot");
            self.metrics.state_write_failures.inc();
        }
    }

    /// A ban the threshold called for that `reason` spares: counted, logged, and audited as a
    /// `skip` with `audited` as its reason.
    fn spared(&mut self, net: &IpNet, reason: SkipReason, audited: String, failures: u32) {
        self.metrics.skipped(reason.label()).inc();
        info!(address = %net, reason = audited, failures, "ban skipped");
        self.audit(AuditRecord::new(
            AuditAction::Skip,
            net,
            audited,
            failures,
            None,
        ));
    }

    fn audit(&mut self, record: AuditRecord) {
        if let Err(error) = self.audit.append(&record) {
            error!("{error}");
        }
        self.recent.record_at(
            record.time,
            record.action.label(),
            &record.address,
            record.reason,
        );
    }

    fn update_gauges(&mut self) {
        let active: std::collections::HashSet<IpNet> = self
            .engine
            .bans(Instant::now())
            .map(|(net, _)| *net)
            .collect();
        let v4 = active.iter().filter(|net| net.is_ipv4()).count();
        match self.mode {
            GuardMode::Enforce => self.metrics.set_banned(v4, active.len() - v4),
            // The engine remembers would-be bans (so that each is reported once); none is in
            // force.
            GuardMode::Observe => self.metrics.set_banned(0, 0),
        }
        self.metrics
            .set_tracked(self.engine.tracked(), self.engine.evicted);
        self.reasons.retain(|net, _| active.contains(net));
    }
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of the kernel's event timestamps.
fn monotonic_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}
