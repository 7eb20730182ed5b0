//! One guard against the attack: attacks from fresh addresses (no repeat-offender effect),
//! each timed end to end and at the firewall, then an allow-listed address failing twice the
//! threshold, which must not be banned.

use std::{
    net::Ipv4Addr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, ensure};

use super::{
    guards::{Guard, GuardSetup, MAX_FAILURES, RunningGuard},
    lab::{ALLOWED_ATTACKER, SshLab},
};
use crate::{interrupt, tools::sample};

/// Far beyond any guard's time-to-ban seen here (fail2ban's is under a second).
const BAN_LIMIT: Duration = Duration::from_secs(10);
/// A failing login takes about 2 s (PAM's delay on failure).
const LOGIN_LIMIT: Duration = Duration::from_secs(15);
/// How long an allow-listed address is watched after its last failure.
const ALLOWLIST_WATCH: Duration = Duration::from_secs(3);

/// One attack.
pub struct Sample {
    /// From sshd's fifth "Failed password" line to the first probe that was dropped; `None`
    /// when no ban came within `BAN_LIMIT`. The client itself learns of its failure only
    /// later: sshd holds a failed attempt back for at least as long as it took (against
    /// timing attacks), which with PAM's own delay is seconds.
    pub time_to_ban: Option<Duration>,
    /// From sshd's fifth "Failed password" line to the ban's set element, in milliseconds as
    /// both were read; negative when the element came first.
    pub commit_ms: Option<f64>,
}

pub struct AttackResults {
    pub guard: Guard,
    pub samples: Vec<Sample>,
    /// The guard's CPU time from the first attack to the last ban, per attack.
    pub cpu_seconds_per_attack: f64,
    /// The most resident memory seen after an attack, summed over the guard's processes.
    pub rss_kib: u64,
    /// Each process's peak since it started, summed.
    pub hwm_kib: u64,
    pub allowlisted_banned: bool,
    /// Sentinel's own `sentinel_ban_latency_seconds`: sum and count.
    pub own_latency: Option<(f64, u64)>,
}

pub fn measure(
    guard: Guard,
    lab: &SshLab,
    setup: &GuardSetup,
    attacks: u32,
) -> Result<AttackResults> {
    let sshd_log = setup.dir.join(format!("sshd-for-{}.log", guard.stem()));
    lab.copy_log_to(&sshd_log)?;
    let running = RunningGuard::start(guard, setup, &sshd_log)?;
    let before = running.usage()?;
    let mut samples = Vec::new();
    let mut rss_kib = 0;
    for attack_number in 1..=attacks {
        interrupt::check()?;
        let sample = attack(lab, lab.new_attacker()?)?;
        println!(
            "[bench] {} attack {attack_number}/{attacks}: time-to-ban {}, log line → element {}",
            guard.label(),
            sample
                .time_to_ban
                .map_or_else(|| "NONE".to_owned(), |time| format!("{time:.1?}")),
            sample
                .commit_ms
                .map_or_else(|| "not seen".to_owned(), |ms| format!("{ms:.2} ms")),
        );
        samples.push(sample);
        rss_kib = rss_kib.max(running.usage()?.rss_kib);
    }
    let after = running.usage()?;
    let allowlisted_banned = attack_allowlisted(lab)?;
    let own_latency = running.metrics()?.and_then(|metrics| {
        let histogram =
            |part: &str| sample::<f64>(&metrics, &format!("sentinel_ban_latency_seconds_{part}"));
        Some((histogram("sum")?, histogram("count")? as u64))
    });
    running.stop()?;
    Ok(AttackResults {
        guard,
        samples,
        cpu_seconds_per_attack: (after.cpu_seconds - before.cpu_seconds) / f64::from(attacks),
        rss_kib,
        hwm_kib: after.hwm_kib,
        allowlisted_banned,
        own_latency,
    })
}

/// Four failing logins at once, then the fifth alone, whose failure must bring the ban.
fn attack(lab: &SshLab, source: Ipv4Addr) -> Result<Sample> {
    let bookmark = lab.bookmark();
    lab.fail_logins(source, MAX_FAILURES - 1)?;
    let fifth = lab.start_failing_login(source)?;
    let fifth_logged =
        lab.await_failure_logged(source, &bookmark, MAX_FAILURES as usize, LOGIN_LIMIT)?;
    let dropped = lab.await_drop(source, BAN_LIMIT)?;
    lab.expect_refused(fifth, source)?;
    if dropped.is_some() {
        ensure!(
            lab.sshd_drops(source)?,
            "{source}'s probes are dropped but it still reaches sshd"
        );
    }
    let commit_ms = lab
        .committed(source, &bookmark, dropped.is_some())
        .map(|committed| signed_millis(committed, fifth_logged));
    Ok(Sample {
        time_to_ban: dropped.map(|at| at.saturating_duration_since(fifth_logged)),
        commit_ms,
    })
}

/// Twice the threshold from the allow-listed address; true if it was banned all the same.
fn attack_allowlisted(lab: &SshLab) -> Result<bool> {
    let bookmark = lab.bookmark();
    for _ in 0..2 {
        lab.fail_logins(ALLOWED_ATTACKER, MAX_FAILURES)?;
    }
    thread::sleep(ALLOWLIST_WATCH);
    Ok(lab.committed(ALLOWED_ATTACKER, &bookmark, false).is_some()
        || lab.drops(ALLOWED_ATTACKER)?)
}

/// `later - earlier` in milliseconds, negative when `later` came first.
pub(super) fn signed_millis(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(earlier.duration_since(later).as_secs_f64() * 1e3),
    }
}
