//! The SSH section of `cargo xtask bench`: the same brute-force attack against the same real
//! sshd, side by side in one run with Sentinel, fail2ban and sshguard (Debian's packages,
//! nftables backends, the same thresholds); then a flood of failures from 10,000 addresses at
//! Sentinel's detection input; then attackers that never reach a password, against a key-only
//! sshd, side by side again (`preauth.rs`). It reports time-to-ban end to end and at the
//! firewall, attempts until a ban, each tool's CPU and memory, and whether an allow-listed
//! address was banned; it asserts none of them. A peer that cannot run here is reported
//! instead; Sentinel must run.
//!
//! Under `target/bench/ssh/`: sshd's host key, the copies of its log each peer read, each
//! tool's configuration and output, `nft monitor`'s output, and the flood's feeder; the same
//! for the key-only sshd under `keys-only/`, with the attackers' key.

mod attack;
mod flood;
pub mod guards;
mod install;
pub mod lab;
mod preauth;
mod report;
pub mod timeline;

use std::{fs, path::Path, time::Instant};

use anyhow::{Context, Result};
use sentinel_tests::sshlab::{SshdAuth, key_pair};

pub use self::install::{ensure_packages, ensure_scan_packages};
use self::{
    guards::{Guard, GuardSetup},
    lab::SshLab,
    report::SshReport,
};
use super::{interrupt, summary::Summary, system::Machine};

/// Per attack: four failing logins at once and a fifth, each held about 2 s by PAM's delay
/// on failure, then the probes: about 5 s. Per tool: start, the allow-listed attack, stop.
const ATTACK_SECS: f64 = 5.0;
const TOOL_SECS: f64 = 15.0;
const FLOOD_SECS: f64 = 30.0;
/// Per key-only attacker: up to 20 attempts, each well under a second plus the wait for a ban.
const PREAUTH_ATTACK_SECS: f64 = 30.0;

pub struct SshBench<'a> {
    pub daemon: &'a Path,
    pub out_dir: &'a Path,
    /// Attacks per tool.
    pub attacks: u32,
    /// Key-only attackers per tool.
    pub preauth_attacks: u32,
    pub with_peers: bool,
    pub machine: &'a Machine,
}

pub fn bench(bench: &SshBench, summary: &mut Summary) -> Result<()> {
    let started = Instant::now();
    let dir = bench.out_dir.join("ssh");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let mut lineup = vec![Guard::Sentinel];
    if bench.with_peers {
        lineup.extend(Guard::PEERS);
    }
    let estimate = lineup.len() as f64
        * (f64::from(bench.attacks) * ATTACK_SECS
            + f64::from(bench.preauth_attacks) * PREAUTH_ATTACK_SECS
            + 2.0 * TOOL_SECS)
        + FLOOD_SECS;
    println!(
        "[bench] SSH: {} tools, {} attacks each, the flood, then {} key-only attackers each; \
         about {:.0} minutes",
        lineup.len(),
        bench.attacks,
        bench.preauth_attacks,
        estimate / 60.0
    );

    warn_about_other_daemons()?;
    let lab = SshLab::start(&dir, SshdAuth::Password)?;
    let setup = GuardSetup {
        daemon: bench.daemon,
        server: lab.server(),
        dir: &dir,
    };
    let mut results = Vec::new();
    let mut unavailable = Vec::new();
    for &guard in &lineup {
        match attack::measure(guard, &lab, &setup, bench.attacks) {
            Ok(measured) => results.push(measured),
            Err(error) if guard != Guard::Sentinel => {
                interrupt::check()?;
                println!(
                    "[bench] {}: COULD NOT BE MEASURED: {error:#}",
                    guard.label()
                );
                unavailable.push((guard, format!("{error:#}")));
            }
            Err(error) => return Err(error.context("Sentinel could not be measured")),
        }
    }
    crate::step("bench: SSH flood at Sentinel's detection input");
    let flood = flood::measure(&lab, &setup)?;
    drop(lab);

    crate::step("bench: SSH attackers that never reach a password, against a key-only sshd");
    let keys_dir = dir.join("keys-only");
    fs::create_dir_all(&keys_dir)
        .with_context(|| format!("cannot create {}", keys_dir.display()))?;
    let key = keys_dir.join("attacker_key");
    if !key.exists() {
        key_pair(&key);
    }
    let lab = SshLab::start(&keys_dir, SshdAuth::KeysOnly)?;
    let setup = GuardSetup {
        daemon: bench.daemon,
        server: lab.server(),
        dir: &keys_dir,
    };
    let mut preauth = Vec::new();
    let mut preauth_unavailable = Vec::new();
    for guard in lineup {
        if unavailable.iter().any(|(peer, _)| *peer == guard) {
            continue;
        }
        match preauth::measure(guard, &lab, &setup, bench.preauth_attacks, &key) {
            Ok(measured) => preauth.push(measured),
            Err(error) if guard != Guard::Sentinel => {
                interrupt::check()?;
                println!(
                    "[bench] {} against the key-only sshd: COULD NOT BE MEASURED: {error:#}",
                    guard.label()
                );
                preauth_unavailable.push((guard, format!("{error:#}")));
            }
            Err(error) => {
                return Err(
                    error.context("Sentinel could not be measured against the key-only sshd")
                );
            }
        }
    }
    drop(lab);

    let report = SshReport {
        machine: bench.machine,
        attacks: bench.attacks,
        results: &results,
        unavailable: &unavailable,
        flood: &flood,
        preauth: &preauth,
        preauth_unavailable: &preauth_unavailable,
        elapsed: started.elapsed(),
    };
    crate::step("bench: SSH results");
    println!("\n{report}");
    report.summarize(summary);
    preauth::check_sentinel_count(&preauth)
}

/// Sentinel's uprobes see every sshd on the host: another daemon (a service, a test suite)
/// counts the bench's failures, and its sshd's failures reach the bench's daemons.
fn warn_about_other_daemons() -> Result<()> {
    let mut others = Vec::new();
    for entry in fs::read_dir("/proc").context("cannot list /proc")? {
        let pid = entry?.file_name();
        let Some(pid) = pid.to_str().filter(|pid| pid.parse::<u32>().is_ok()) else {
            continue;
        };
        // A process that has exited since the listing has no comm to read.
        if fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|comm| comm.starts_with("sentinel"))
        {
            others.push(pid.to_owned());
        }
    }
    if !others.is_empty() {
        println!(
            "[bench] WARNING: other Sentinel daemons are running (pid {}): they count the \
             bench's SSH failures, and any SSH failures they see reach the bench's daemon too",
            others.join(", ")
        );
    }
    Ok(())
}
