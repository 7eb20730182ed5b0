//! The fleet, through CrowdSec's Local API (LAPI): as a bouncer, Sentinel pulls the fleet's
//! decisions and the SSH guard, which owns the firewall, bans them; as a watcher, it pushes its
//! own bans as alerts, so that every other bouncer of the fleet bans them too.
//!
//! Both run as tasks that talk to the guard only through queues: a LAPI that is down, slow or
//! confused delays the fleet's bans and never a local one.

mod lapi;
mod metrics;
mod push;
pub mod settings;
mod stream;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio::sync::mpsc;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

pub use self::metrics::FleetMetrics;
use self::{
    lapi::Lapi,
    push::PushQueue,
    settings::{CrowdsecConfig, read_secret},
    stream::KnownDecisions,
};
use crate::{
    Error,
    components::{Components, supervised},
    firewall::IpNet,
    queue::{Queue, Refused},
    ssh_guard::Input as GuardInput,
};

/// `sentinel bans` shows a fleet ban's reason with this prefix: `crowdsec:<scenario or origin>`.
const FLEET_REASON_PREFIX: &str = "crowdsec:";

/// Local bans waiting for the watcher, on top of those it already holds.
const HANDOFF: usize = 1024;
/// Local bans the watcher keeps while LAPI is away; the oldest go first.
const PUSH_QUEUE: usize = 10_000;
/// How often the watcher tells LAPI it is alive (`cscli machines list`, Last Heartbeat), as
/// CrowdSec's own agents do.
const HEARTBEAT: Duration = Duration::from_secs(60);

/// A ban the fleet asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetBan {
    pub net: IpNet,
    pub remaining: Duration,
    pub origin: String,
    /// What `sentinel bans` shows.
    pub reason: String,
}

/// What one pull changes. A complete update lists every fleet ban in force: the guard lifts
/// the fleet bans it holds that are not listed (those that ended while LAPI was away).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetUpdate {
    pub complete: bool,
    pub bans: Vec<FleetBan>,
    pub lifts: Vec<IpNet>,
}

/// A ban this host made, for the fleet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalBan {
    pub net: IpNet,
    pub until: SystemTime,
    pub reason: &'static str,
    pub failures: u32,
}

/// Where the SSH guard hands its bans to the watcher; never blocks.
#[derive(Clone)]
pub struct BanHandoff {
    sender: mpsc::Sender<LocalBan>,
    metrics: FleetMetrics,
}

impl BanHandoff {
    pub fn offer(&self, ban: LocalBan) {
        if self.sender.try_send(ban).is_err() {
            self.metrics
                .push_dropped(push::Dropped::QueueFull.label())
                .inc();
        }
    }
}

/// `crowdsec:<scenario>` for alerts' decisions (origin `crowdsec`), `crowdsec:<origin>` for the
/// others (`cscli`, `CAPI`, lists), whose scenario is a sentence.
pub fn fleet_reason(origin: &str, scenario: &str) -> String {
    let what = if origin == "crowdsec" {
        scenario
    } else {
        origin
    };
    format!("{FLEET_REASON_PREFIX}{what}")
}

pub fn is_fleet_reason(reason: &str) -> bool {
    reason.starts_with(FLEET_REASON_PREFIX)
}

/// What the daemon runs for the fleet, before the guard starts.
pub struct Fleet {
    lapi: Lapi,
    bouncer_key: Option<String>,
    watcher: Option<(String, String, mpsc::Receiver<LocalBan>)>,
    pull_interval: Duration,
    pub metrics: FleetMetrics,
    /// For the SSH guard, when pushing is on.
    pub handoff: Option<BanHandoff>,
}

impl Fleet {
    /// Reads the credential files (root-only, or refused) and sets up the client; nothing is
    /// sent yet.
    pub fn prepare(config: &CrowdsecConfig, metrics: FleetMetrics) -> Result<Self, Error> {
        let bouncer_key = config
            .bouncer_key_file
            .as_deref()
            .map(read_secret)
            .transpose()?;
        let (watcher, handoff) = match &config.machine {
            Some(machine) => {
                let password = read_secret(&machine.password_file)?;
                let (sender, receiver) = mpsc::channel(HANDOFF);
                let handoff = BanHandoff {
                    sender,
                    metrics: metrics.clone(),
                };
                (
                    Some((machine.id.clone(), password, receiver)),
                    Some(handoff),
                )
            }
            None => (None, None),
        };
        Ok(Self {
            lapi: Lapi::new(&config.lapi_url, config.ca.as_ref())?,
            bouncer_key,
            watcher,
            pull_interval: config.pull_interval,
            metrics,
            handoff,
        })
    }

    /// Starts the bouncer (with the guard's queue) and the watcher.
    pub fn start(
        self,
        guard: Option<Queue<GuardInput>>,
        components: &Components,
        tasks: &TaskTracker,
        cancel: &CancellationToken,
    ) {
        let lapi = std::sync::Arc::new(self.lapi);
        if let (Some(key), Some(guard)) = (self.bouncer_key, guard) {
            let bouncer = Bouncer {
                lapi: lapi.clone(),
                key,
                guard,
                metrics: self.metrics.clone(),
            };
            let run = bouncer.run(self.pull_interval, cancel.clone());
            tasks.spawn(supervised(
                components.start("crowdsec bouncer"),
                async move {
                    run.await;
                    Ok::<(), std::convert::Infallible>(())
                },
            ));
        }
        if let Some((machine_id, password, bans)) = self.watcher {
            let watcher = Watcher {
                lapi,
                machine_id,
                password,
                metrics: self.metrics,
            };
            let run = watcher.run(bans, cancel.clone());
            tasks.spawn(supervised(
                components.start("crowdsec watcher"),
                async move {
                    run.await;
                    Ok::<(), std::convert::Infallible>(())
                },
            ));
        }
    }
}

struct Bouncer {
    lapi: std::sync::Arc<Lapi>,
    key: String,
    guard: Queue<GuardInput>,
    metrics: FleetMetrics,
}

/// How often the bouncer pulls every decision even when the changes came through: LAPI's
/// change stream can miss a batch of decisions committed while a pull was answered (seen in
/// `cargo xtask bench --only fleet`: 50 of 10,000 imported at once never listed as new),
/// and only a full list brings them.
const FULL_PULL_EVERY: Duration = Duration::from_secs(600);

/// Whether the next pull asks for every decision: at first, after a failure, and once the
/// last full pull is [`FULL_PULL_EVERY`] old.
fn pull_in_full(after_failure: bool, last_full: Option<Instant>, now: Instant) -> bool {
    after_failure || last_full.is_none_or(|last| now.duration_since(last) >= FULL_PULL_EVERY)
}

impl Bouncer {
    /// Pulls every `interval`: everything at first, after any failure and every
    /// [`FULL_PULL_EVERY`], the changes otherwise.
    async fn run(self, interval: Duration, cancel: CancellationToken) {
        let mut known = KnownDecisions::default();
        let mut after_failure = false;
        let mut last_full = None;
        let mut failing = false;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            let now = Instant::now();
            let full = pull_in_full(after_failure, last_full, now);
            match self.pull(&mut known, full).await {
                Ok(()) => {
                    if failing {
                        info!("CrowdSec's Local API answers again; decisions pulled in full");
                    }
                    failing = false;
                    after_failure = false;
                    if full {
                        last_full = Some(now);
                    }
                }
                Err(PullFailed::GuardGone) => return,
                Err(PullFailed::Lapi(problem)) => {
                    // One message per outage, not one per pull.
                    if !failing {
                        warn!(
                            "pulling the fleet's decisions failed; local bans go on, the next \
                             pull will take every decision: {problem}"
                        );
                    }
                    failing = true;
                    after_failure = true;
                }
                Err(PullFailed::GuardBusy) => {
                    warn!(
                        "the SSH guard's queue is full; the fleet's decisions wait for a full pull"
                    );
                    after_failure = true;
                }
            }
        }
    }

    async fn pull(&self, known: &mut KnownDecisions, full: bool) -> Result<(), PullFailed> {
        let body = match self.lapi.stream(&self.key, full).await {
            Ok(body) => body,
            Err(error) => {
                let kind = match error {
                    Error::LapiStatus { .. } => "http",
                    Error::LapiMalformed(_) => "malformed",
                    Error::LapiCertificate(_) => "certificate",
                    _ => "unreachable",
                };
                self.metrics.pull_errors(kind).inc();
                self.metrics
                    .reachable
                    .set(i64::from(!matches!(kind, "unreachable" | "certificate")));
                return Err(PullFailed::Lapi(error.to_string()));
            }
        };
        self.metrics.reachable.set(1);
        let checked = stream::check(&body).map_err(|reason| {
            self.metrics.pull_errors("malformed").inc();
            error!("{}", Error::LapiMalformed(reason.clone()));
            PullFailed::Lapi(reason)
        })?;
        for origin in &checked.received {
            self.metrics.received(origin).inc();
        }
        self.metrics
            .skipped("unsupported")
            .inc_by(checked.unsupported as u64);
        let outcome = known.apply(checked, full, Instant::now());
        for origin in &outcome.ended {
            self.metrics.expired(origin).inc();
        }
        let update = outcome.update;
        if update.complete || !update.bans.is_empty() || !update.lifts.is_empty() {
            match self.guard.offer(GuardInput::Fleet(update)) {
                Ok(()) => {}
                Err(Refused::Full) => return Err(PullFailed::GuardBusy),
                Err(Refused::Closed) => return Err(PullFailed::GuardGone),
            }
        }
        let synced = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        self.metrics.last_sync.set(synced.as_secs() as i64);
        Ok(())
    }
}

enum PullFailed {
    Lapi(String),
    GuardBusy,
    GuardGone,
}

struct Watcher {
    lapi: std::sync::Arc<Lapi>,
    machine_id: String,
    password: String,
    metrics: FleetMetrics,
}

/// What the watcher sends with its token.
#[derive(Clone, Copy)]
enum Request<'a> {
    Alerts(&'a [push::Alert]),
    Heartbeat,
}

impl Watcher {
    /// Pushes each local ban as an alert, in batches; while LAPI is away they wait, bounded,
    /// and are retried with a growing delay. A heartbeat goes out every [`HEARTBEAT`].
    async fn run(self, mut bans: mpsc::Receiver<LocalBan>, cancel: CancellationToken) {
        let mut queue = PushQueue::new(PUSH_QUEUE);
        // Logged in at once: wrong credentials show in the log at start, not at the first ban.
        let mut token = self
            .login()
            .await
            .inspect_err(|error| {
                warn!(
                    machine_id = self.machine_id,
                    "logging in to CrowdSec's Local API failed: {error}"
                );
            })
            .ok();
        let mut heartbeat =
            tokio::time::interval_at((Instant::now() + HEARTBEAT).into(), HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut heartbeat_failing = false;
        loop {
            let retry = queue.backoff.next_try();
            tokio::select! {
                () = cancel.cancelled() => return,
                ban = bans.recv() => match ban {
                    Some(ban) => self.queue(&mut queue, ban),
                    None => return,
                },
                () = sleep_until(retry), if queue.len() > 0 => {}
                _ = heartbeat.tick() => {
                    heartbeat_failing = self.heartbeat(&mut token, heartbeat_failing).await;
                    continue;
                }
            }
            while let Ok(ban) = bans.try_recv() {
                self.queue(&mut queue, ban);
            }
            let (alerts, ended) = queue.due(Instant::now(), SystemTime::now());
            self.metrics
                .push_dropped(push::Dropped::Ended.label())
                .inc_by(ended as u64);
            if !alerts.is_empty() {
                match self.send(&mut token, Request::Alerts(&alerts)).await {
                    Ok(()) => {
                        queue.delivered(alerts.len());
                        self.metrics.pushes("ok").inc_by(alerts.len() as u64);
                    }
                    Err(error) => {
                        let delay = queue.backoff.failed(Instant::now());
                        self.metrics.pushes("failed").inc();
                        warn!(
                            waiting = queue.len(),
                            retry_in_seconds = delay.as_secs(),
                            "pushing local bans to CrowdSec's Local API failed: {error}"
                        );
                    }
                }
            }
            self.metrics.push_queue.set(queue.len() as i64);
        }
    }

    /// One heartbeat, counted; a failure is logged once until one succeeds. Returns whether
    /// heartbeats are failing.
    async fn heartbeat(&self, token: &mut Option<String>, failing: bool) -> bool {
        match self.send(token, Request::Heartbeat).await {
            Ok(()) => {
                self.metrics.heartbeats("ok").inc();
                false
            }
            Err(error) => {
                self.metrics.heartbeats("failed").inc();
                if !failing {
                    warn!("the watcher's heartbeat to CrowdSec's Local API failed: {error}");
                }
                true
            }
        }
    }

    /// Sends `request` with the token, logging in first when there is none, and again at once
    /// when LAPI refuses the token (it expired, or LAPI restarted with a new secret) rather
    /// than at the next retry.
    async fn send(&self, token: &mut Option<String>, request: Request<'_>) -> Result<(), Error> {
        let mut fresh = false;
        loop {
            let jwt = match token.as_deref() {
                Some(jwt) => jwt,
                None => {
                    fresh = true;
                    token.insert(self.login().await?)
                }
            };
            let result = match request {
                Request::Alerts(alerts) => self.lapi.push(jwt, alerts).await,
                Request::Heartbeat => self.lapi.heartbeat(jwt).await,
            };
            self.metrics.reachable.set(i64::from(answered(&result)));
            match result {
                Err(Error::LapiStatus {
                    unauthorized: true, ..
                }) if !fresh => {
                    info!("CrowdSec's Local API refused the watcher's token; logging in again");
                    *token = None;
                }
                result => return result,
            }
        }
    }

    fn queue(&self, queue: &mut PushQueue, ban: LocalBan) {
        if let Some(dropped) = queue.push(ban) {
            self.metrics.push_dropped(dropped.label()).inc();
        }
        self.metrics.push_queue.set(queue.len() as i64);
    }

    /// A new token, counted.
    async fn login(&self) -> Result<String, Error> {
        let result = self.lapi.login(&self.machine_id, &self.password).await;
        self.metrics
            .logins(if result.is_ok() { "ok" } else { "failed" })
            .inc();
        self.metrics.reachable.set(i64::from(answered(&result)));
        result
    }
}

/// Whether LAPI answered, even with a refusal: not when it could not be reached or its
/// certificate was not trusted.
fn answered<T>(result: &Result<T, Error>) -> bool {
    !matches!(
        result,
        Err(Error::LapiUnreachable(_) | Error::LapiCertificate(_))
    )
}

/// Sleeps until `at`; at once when `None`.
async fn sleep_until(at: Option<Instant>) {
    if let Some(at) = at {
        tokio::time::sleep_until(at.into()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_decision_is_pulled_at_first_after_a_failure_and_every_ten_minutes() {
        let start = Instant::now();
        assert!(pull_in_full(false, None, start));
        let minute = Duration::from_secs(60);
        // A pull a minute, the first in full: the next full one ten minutes later.
        let full: Vec<u32> = (0..25u32)
            .scan(None, |last_full, minute_number| {
                let now = start + minute * minute_number;
                let full = pull_in_full(false, *last_full, now);
                if full {
                    *last_full = Some(now);
                }
                Some(full.then_some(minute_number))
            })
            .flatten()
            .collect();
        assert_eq!(full, [0, 10, 20]);
        assert!(pull_in_full(true, Some(start), start + minute));
    }
}
