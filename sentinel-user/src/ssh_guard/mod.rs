//! The SSH brute-force guard: failed authentications seen in the kernel become bans in
//! Sentinel's nftables table within milliseconds, with no log in between.
//!
//! The guard runs on its own thread: a ban is a netlink round-trip, and it must not wait
//! behind anything else the daemon does.

pub mod audit;
pub mod engine;
mod metrics;
pub mod settings;

use std::{
    net::IpAddr,
    path::PathBuf,
    sync::mpsc::{Receiver, RecvTimeoutError, Sender},
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info, warn};

pub use self::metrics::SshGuardMetrics;
use self::{
    audit::{AuditAction, AuditLog, AuditRecord},
    engine::{BanEngine, GuardRules, Verdict},
};
use crate::{
    Error,
    cgroup::guardian::ProcessHandle,
    events::{SshAuth, SshOutcome},
    firewall::{Ban, Firewall, FirewallOptions, IpNet},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
}

/// What reaches the guard's thread.
pub enum Input {
    Auth(SshAuth),
    Control(Control),
    Stop,
}

/// Operator requests from the control socket.
pub enum Control {
    List(Sender<Vec<BanInfo>>),
    Ban {
        addr: IpAddr,
        duration: Duration,
        reply: Sender<Result<IpNet, String>>,
    },
    Unban {
        addr: IpAddr,
        reply: Sender<Result<IpNet, String>>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BanInfo {
    pub address: String,
    pub reason: String,
    pub failures: u32,
    pub expires_in_seconds: u64,
}

pub struct SshGuard {
    mode: GuardMode,
    engine: BanEngine,
    firewall: Option<Firewall>,
    audit: AuditLog,
    metrics: SshGuardMetrics,
    /// Why each ban in force was made, for `sentinel bans`.
    reasons: std::collections::HashMap<IpNet, (String, u32)>,
}

impl SshGuard {
    /// Opens the firewall (enforce mode) and adopts the bans already in the kernel.
    pub fn open(settings: SshGuardSettings, metrics: SshGuardMetrics) -> Result<Self, Error> {
        let mut engine = BanEngine::new(settings.rules);
        let audit = AuditLog::open(&settings.audit_log)?;
        let firewall = match settings.mode {
            GuardMode::Observe => None,
            GuardMode::Enforce => {
                let mut firewall = Firewall::open(settings.firewall)?;
                let now = Instant::now();
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
        let mut guard = Self {
            mode: settings.mode,
            engine,
            firewall,
            audit,
            metrics,
            reasons: Default::default(),
        };
        guard.update_gauges();
        Ok(guard)
    }

    /// Handles inputs until `Stop` (or every sender is gone); bans stay unless the firewall
    /// was configured to flush on exit.
    pub fn run(mut self, inputs: Receiver<Input>) {
        loop {
            let first = match inputs.recv_timeout(Duration::from_secs(1)) {
                Ok(input) => input,
                Err(RecvTimeoutError::Timeout) => {
                    self.update_gauges();
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => break,
            };
            // Everything already queued goes into the same firewall transaction.
            let mut batch = vec![first];
            batch.extend(inputs.try_iter());
            let stop = batch.iter().any(|input| matches!(input, Input::Stop));
            self.handle(batch);
            if stop {
                break;
            }
        }
        if let Some(firewall) = self.firewall.take()
            && let Err(error) = firewall.close()
        {
            error!("closing the firewall failed: {error}");
        }
    }

    fn handle(&mut self, inputs: Vec<Input>) {
        let now = Instant::now();
        let mut bans = Vec::new();
        let mut failure_times = Vec::new();
        for input in inputs {
            match input {
                Input::Auth(auth) => {
                    if let Some(ban) = self.on_auth(now, &auth) {
                        bans.push(ban);
                        failure_times.push(auth.timestamp_ns);
                    }
                }
                Input::Control(control) => self.on_control(now, control),
                Input::Stop => {}
            }
        }
        if bans.is_empty() {
            return;
        }
        if let Some(firewall) = &mut self.firewall {
            if let Err(error) = firewall.ban(&bans) {
                error!(
                    "committing {} ban(s) to nftables failed: {error}",
                    bans.len()
                );
                return;
            }
            let committed = monotonic_ns();
            for failed_at in failure_times {
                let latency = committed.saturating_sub(failed_at) as f64 / 1e9;
                self.metrics.ban_latency_seconds.observe(latency);
            }
        }
        self.update_gauges();
    }

    /// Returns the ban to commit, if this authentication calls for one.
    fn on_auth(&mut self, now: Instant, auth: &SshAuth) -> Option<Ban> {
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
        self.metrics.auth_failures.inc();
        match self.engine.failure(now, addr) {
            Verdict::Counted => None,
            Verdict::Skip {
                net,
                reason,
                failures,
            } => {
                self.metrics.skipped(reason.label()).inc();
                info!(address = %net, reason = reason.label(), failures, "ban skipped");
                self.audit(AuditRecord::new(
                    AuditAction::Skip,
                    &net,
                    reason.label(),
                    failures,
                    None,
                ));
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
                let expires = SystemTime::now() + duration;
                let action = match self.mode {
                    GuardMode::Enforce => AuditAction::Ban,
                    GuardMode::Observe => AuditAction::WouldBan,
                };
                info!(address = %net, failures, offense, ban_seconds = duration.as_secs(), mode = ?self.mode, "ban");
                self.metrics.bans(reason).inc();
                self.reasons.insert(net, (reason.to_string(), failures));
                self.audit(AuditRecord::new(
                    action,
                    &net,
                    reason,
                    failures,
                    Some(expires),
                ));
                (self.mode == GuardMode::Enforce).then_some(Ban {
                    net,
                    timeout: duration,
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
            Control::Ban {
                addr,
                duration,
                reply,
            } => {
                let net = self.engine.offender(addr);
                let result = self.commit(|firewall| {
                    firewall.ban(&[Ban {
                        net,
                        timeout: duration,
                    }])
                });
                if result.is_ok() {
                    self.engine.record_ban(net, now, duration, 1);
                    self.reasons.insert(net, ("operator".into(), 0));
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
            Control::Unban { addr, reply } => {
                let net = self.engine.offender(addr);
                let result = self.commit(|firewall| firewall.unban(&[net]));
                if result.is_ok() {
                    self.engine.lift(&net);
                    self.reasons.remove(&net);
                    self.audit(AuditRecord::new(
                        AuditAction::Unban,
                        &net,
                        "operator",
                        0,
                        None,
                    ));
                }
                let _ = reply.send(result.map(|()| net));
            }
        }
        self.update_gauges();
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

    fn audit(&mut self, record: AuditRecord) {
        if let Err(error) = self.audit.append(&record) {
            error!("{error}");
        }
    }

    fn update_gauges(&mut self) {
        let active: std::collections::HashSet<IpNet> = self
            .engine
            .bans(Instant::now())
            .map(|(net, _)| *net)
            .collect();
        let v4 = active.iter().filter(|net| net.is_ipv4()).count();
        self.metrics.set_banned(v4, active.len() - v4);
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
