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
    guards::{Guard, GuardSetup, MAX_FAILURES, RunningGuard, Usage},
    lab::{ALLOWED_ATTACKER, SshLab},
};
use crate::bench::{interrupt, tools::sample};

/// Far beyond any guard's time-to-ban seen here (fail2ban's is under a second).
const BAN_LIMIT: Duration = Duration::from_secs(10);
/// How long an allow-listed address is watched after its last failure.
const ALLOWLIST_WATCH: Duration = Duration::from_secs(3);

/// One attack.
pub struct Sample {
    /// From the fifth failing client's exit to the first probe that was dropped; `None` when
    /// no ban came within `BAN_LIMIT`.
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
    /// Memory after the attacks.
    pub usage: Usage,
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
        usage: after,
        allowlisted_banned,
        own_latency,
    })
}

/// Four failing logins at once, then the fifth alone, whose failure must bring the ban.
fn attack(lab: &SshLab, source: Ipv4Addr) -> Result<Sample> {
    let bookmark = lab.bookmark();
    lab.fail_logins(source, MAX_FAILURES - 1)?;
    lab.fail_logins(source, 1)?;
    let fifth_failed = Instant::now();
    let dropped = lab.await_drop(source, BAN_LIMIT)?;
    if dropped.is_some() {
        ensure!(
            lab.sshd_drops(source)?,
            "{source}'s probes are dropped but it still reaches sshd"
        );
    }
    let failures = lab.failures_logged(source, &bookmark, MAX_FAILURES as usize);
    ensure!(
        failures.len() == MAX_FAILURES as usize,
        "sshd logged {} failed passwords from {source}, not {MAX_FAILURES}",
        failures.len()
    );
    let commit_ms = lab
        .committed(source, &bookmark, dropped.is_some())
        .zip(failures.last())
        .map(|(committed, fifth_logged)| signed_millis(committed, *fifth_logged));
    Ok(Sample {
        time_to_ban: dropped.map(|at| at.saturating_duration_since(fifth_failed)),
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
fn signed_millis(later: Instant, earlier: Instant) -> f64 {
    match later.checked_duration_since(earlier) {
        Some(after) => after.as_secs_f64() * 1e3,
        None => -(earlier.duration_since(later).as_secs_f64() * 1e3),
    }
}
