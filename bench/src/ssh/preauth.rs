//! Attackers that never reach a password: a key-only sshd (`PasswordAuthentication no`) and
//! one attempt at a time from a fresh address, alternating an unauthorised key for a real
//! account and an unknown user name, until the address is dropped or `MAX_ATTEMPTS` were
//! made. Each guard meets the same attack; the peers read sshd's log, Sentinel reads none.

use std::{net::Ipv4Addr, path::Path, time::Duration};

use anyhow::{Result, ensure};

use super::{
    attack::signed_millis,
    guards::{Guard, GuardSetup, RunningGuard},
    lab::{ACCOUNT, SshLab},
};
use crate::{interrupt, tools::sample};

/// An attacker that is not dropped by then is reported as never banned.
pub const MAX_ATTEMPTS: u32 = 20;
/// After each attempt, how long the attacker is probed before the next one: twice the
/// slowest time-to-ban any guard showed in the brute-force attack here (fail2ban's, 1 s).
pub const SETTLE: Duration = Duration::from_secs(2);
/// A refused key takes well under a second; a client still running after this had its
/// connection dropped midway.
const ATTEMPT_LIMIT: Duration = Duration::from_secs(10);
/// Sentinel's count of connections that ended before authenticating.
const PREAUTH_SERIES: &str = "sentinel_ssh_preauth_disconnects_total";

/// One attacker.
pub struct PreauthSample {
    /// The attempt after (or during) which the attacker was dropped; `None` when it was not
    /// within `MAX_ATTEMPTS`.
    pub banned_at: Option<u32>,
    /// From the banning attempt's end (its client exited, refused) to the first dropped probe;
    /// `None` when not banned or when the ban cut that attempt's own connection.
    pub time_to_drop: Option<Duration>,
    /// From the last line sshd logged about the attacker before the ban's set element to that
    /// element (`nft monitor`), in milliseconds.
    pub line_to_commit_ms: Option<f64>,
}

pub struct PreauthResults {
    pub guard: Guard,
    pub samples: Vec<PreauthSample>,
    /// The guard's CPU time from the first attempt to the last, per attacker.
    pub cpu_seconds_per_attack: f64,
    /// Attempts made, all attackers together.
    pub attempts: u32,
    /// Sentinel only: the connections it counted as ended before authenticating.
    pub counted: Option<u64>,
}

pub fn measure(
    guard: Guard,
    lab: &SshLab,
    setup: &GuardSetup,
    attacks: u32,
    key: &Path,
) -> Result<PreauthResults> {
    let sshd_log = setup.dir.join(format!("sshd-for-{}.log", guard.stem()));
    lab.copy_log_to(&sshd_log)?;
    let running = RunningGuard::start(guard, setup, &sshd_log)?;
    let counted_before = preauth_count(&running)?;
    let before = running.usage()?;
    let mut samples = Vec::new();
    let mut attempts = 0;
    for attack_number in 1..=attacks {
        interrupt::check()?;
        let (sample, made) = attack(lab, lab.new_attacker()?, key)?;
        attempts += made;
        println!(
            "[bench] {} key-only attack {attack_number}/{attacks}: {}, attempt end → drop {}, \
             log line → element {}",
            guard.label(),
            sample.banned_at.map_or_else(
                || format!("NOT banned after {MAX_ATTEMPTS} attempts"),
                |attempt| format!("banned at attempt {attempt}")
            ),
            sample
                .time_to_drop
                .map_or_else(|| "—".to_owned(), |time| format!("{time:.1?}")),
            sample
                .line_to_commit_ms
                .map_or_else(|| "—".to_owned(), |ms| format!("{ms:.2} ms")),
        );
        samples.push(sample);
    }
    let after = running.usage()?;
    let counted = preauth_count(&running)?
        .zip(counted_before)
        .map(|(after, before)| after - before);
    running.stop()?;
    Ok(PreauthResults {
        guard,
        samples,
        cpu_seconds_per_attack: (after.cpu_seconds - before.cpu_seconds) / f64::from(attacks),
        attempts,
        counted,
    })
}

/// Attempts from `source` one at a time until it is dropped; returns the sample and the
/// number of attempts made.
fn attack(lab: &SshLab, source: Ipv4Addr, key: &Path) -> Result<(PreauthSample, u32)> {
    let bookmark = lab.bookmark();
    for attempt in 1..=MAX_ATTEMPTS {
        interrupt::check()?;
        let unknown_user = format!("no-such-user-{attempt}");
        let user = if attempt % 2 == 1 {
            ACCOUNT
        } else {
            &unknown_user
        };
        let client = lab.start_key_login(source, user, key)?;
        let time_to_drop = match lab.finish_key_login(client, source, ATTEMPT_LIMIT)? {
            Some(ended) => match lab.await_drop(source, SETTLE)? {
                Some(dropped) => Some(dropped.saturating_duration_since(ended)),
                None => continue,
            },
            None => {
                ensure!(
                    lab.drops(source)?,
                    "key login {attempt} from {source} as {user} was neither refused nor \
                     dropped"
                );
                None
            }
        };
        ensure!(
            lab.sshd_drops(source)?,
            "{source}'s probes are dropped but it still reaches sshd"
        );
        let line_to_commit_ms = lab
            .committed(source, &bookmark, true)
            .and_then(|committed| {
                lab.last_logged_before(source, &bookmark, committed)
                    .map(|line| signed_millis(committed, line))
            });
        let sample = PreauthSample {
            banned_at: Some(attempt),
            time_to_drop,
            line_to_commit_ms,
        };
        return Ok((sample, attempt));
    }
    let sample = PreauthSample {
        banned_at: None,
        time_to_drop: None,
        line_to_commit_ms: None,
    };
    Ok((sample, MAX_ATTEMPTS))
}

/// Sentinel's `sentinel_ssh_preauth_disconnects_total` (a series not yet created reads 0);
/// `None` for the peers.
fn preauth_count(running: &RunningGuard) -> Result<Option<u64>> {
    Ok(running
        .metrics()?
        .map(|metrics| sample::<u64>(&metrics, PREAUTH_SERIES).unwrap_or(0)))
}

/// Sentinel must have counted every attempt made against it, no more and no fewer.
pub fn check_sentinel_count(results: &[PreauthResults]) -> Result<()> {
    for results in results {
        if let Some(counted) = results.counted {
            ensure!(
                counted == u64::from(results.attempts),
                "Sentinel counted {counted} connections that ended before authenticating, but \
                 {} were made",
                results.attempts
            );
        }
    }
    Ok(())
}

impl PreauthResults {
    /// The guard's CPU time per attempt made, all attackers together.
    pub fn cpu_seconds_per_attempt(&self) -> f64 {
        self.cpu_seconds_per_attack * self.samples.len() as f64 / f64::from(self.attempts.max(1))
    }

    /// The attempts until each ban, of the attackers that were banned.
    pub fn attempts_to_ban(&self) -> Vec<f64> {
        self.samples
            .iter()
            .filter_map(|sample| sample.banned_at)
            .map(f64::from)
            .collect()
    }

    pub fn times_to_drop_ms(&self) -> Vec<f64> {
        self.samples
            .iter()
            .filter_map(|sample| sample.time_to_drop)
            .map(|time| time.as_secs_f64() * 1e3)
            .collect()
    }

    pub fn lines_to_commit_ms(&self) -> Vec<f64> {
        self.samples
            .iter()
            .filter_map(|sample| sample.line_to_commit_ms)
            .collect()
    }

    /// Attackers banned within `MAX_ATTEMPTS`.
    pub fn banned(&self) -> usize {
        self.samples
            .iter()
            .filter(|sample| sample.banned_at.is_some())
            .count()
    }
}
