//! A flood of failures from 10,000 addresses, too many for real SSH clients, fed at Sentinel's
//! detection input: a small program named like sshd calls libpam itself, with a `PAM_RHOST` of
//! each address and a PAM service that always fails. Sentinel's real uprobes, guard and
//! firewall handle it, with its tables bounded to fewer entries than the flood brings:
//!
//! 1. spray: 10,000 addresses (198.18.0.0 on) fail once each; the tracking table must stay
//!    at its bound and count the addresses it forgets;
//! 2. flood: 10,000 other addresses (198.19.0.0 on) fail twice each, the threshold; the
//!    first bans fill the ban table to its bound and the rest must be refused and counted.
//!
//! The PAM service lives in a directory of the bench's own (`pam_start_confdir`): nothing is
//! written to /etc/pam.d.

use std::{
    fs,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use sentinel_tests::eventually;

use super::{
    guards::{Guard, GuardSetup, RunningGuard, SentinelSettings},
    lab::SshLab,
};
use crate::{host::run, interrupt, tools::sample};

pub const ADDRESSES: u32 = 10_000;
/// Both of the guard's tables hold half the flood.
pub const BOUND: usize = 5_000;
const SPRAY_FIRST: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const FLOOD_FIRST: Ipv4Addr = Ipv4Addr::new(198, 19, 0, 0);
const FAILURES_TO_BAN: u32 = 2;
/// Longer than the flood: no ban expires while it is counted.
const BAN_SECONDS: u32 = 600;
const SETTLE_LIMIT: Duration = Duration::from_secs(120);
const POLL: Duration = Duration::from_millis(100);
/// Sentinel's probes only look at processes whose command name starts with "sshd".
const FEEDER: &str = "sshd-flood";
const PAM_SERVICE: &str = "sentinel-bench-flood";
const PAM_SERVICE_TEXT: &str = "# Every authentication fails at once, without a delay.\n\
                                auth requisite pam_deny.so\n";
const FEEDER_SOURCE: &str = r#"/* Fails PAM authentications as sshd would, from COUNT consecutive IPv4 addresses. */
#include <arpa/inet.h>
#include <security/pam_appl.h>
#include <stdio.h>
#include <stdlib.h>

/* pam_deny asks nothing; any question would be refused. */
static int refuse(int count, const struct pam_message **messages,
                  struct pam_response **responses, void *data) {
    (void)count; (void)messages; (void)responses; (void)data;
    return PAM_CONV_ERR;
}

int main(int argc, char **argv) {
    struct in_addr first;
    if (argc != 6 || inet_pton(AF_INET, argv[3], &first) != 1) {
        fprintf(stderr, "usage: %s CONFDIR SERVICE FIRST-ADDRESS COUNT FAILURES-EACH\n", argv[0]);
        return 2;
    }
    unsigned long count = strtoul(argv[4], NULL, 10);
    unsigned long failures_each = strtoul(argv[5], NULL, 10);
    const struct pam_conv conversation = { refuse, NULL };
    pam_handle_t *pamh;
    int status = pam_start_confdir(argv[2], "nobody", &conversation, argv[1], &pamh);
    if (status != PAM_SUCCESS) {
        fprintf(stderr, "pam_start_confdir: %s\n", pam_strerror(NULL, status));
        return 1;
    }
    for (unsigned long i = 0; i < count; i++) {
        struct in_addr address = { htonl(ntohl(first.s_addr) + (uint32_t)i) };
        char text[INET_ADDRSTRLEN];
        inet_ntop(AF_INET, &address, text, sizeof text);
        pam_set_item(pamh, PAM_RHOST, text);
        for (unsigned long j = 0; j < failures_each; j++) {
            if (pam_authenticate(pamh, 0) == PAM_SUCCESS) {
                fprintf(stderr, "an authentication succeeded\n");
                return 1;
            }
        }
    }
    pam_end(pamh, PAM_AUTH_ERR);
    return 0;
}
"#;

pub struct FloodResults {
    /// Failures fed in both passes, as Sentinel counted them, and lost on the way.
    pub fed: u64,
    pub counted: u64,
    pub lost: u64,
    pub tracked_after_spray: u64,
    pub evictions: u64,
    pub bans: u64,
    /// Bans refused because the ban table was full.
    pub refused: u64,
    /// Elements in the kernel's set once the flood was handled.
    pub elements: usize,
    /// The flood pass's feeder, start to exit.
    pub feed_time: Duration,
    /// From the flood's first failure fed to the last element `nft monitor` saw.
    pub all_committed_after: Duration,
    /// Elements seen by `nft monitor`, per second between the first and the last.
    pub bans_per_second: f64,
    pub rss_idle_kib: u64,
    pub rss_after_spray_kib: u64,
    pub rss_after_kib: u64,
    pub hwm_kib: u64,
    pub cpu_seconds: f64,
}

/// Sentinel's SSH guard counters, read from /metrics (a series not yet created reads 0).
#[derive(Debug, Clone, Copy)]
struct Counters {
    failures: u64,
    lost: u64,
    bans: u64,
    refused: u64,
    tracked: u64,
    evictions: u64,
}

impl Counters {
    fn read(running: &RunningGuard) -> Result<Self> {
        let metrics = running.metrics()?.context("Sentinel serves /metrics")?;
        let value = |series: &str| sample::<u64>(&metrics, series).unwrap_or(0);
        Ok(Self {
            failures: value("sentinel_ssh_auth_failures_total"),
            lost: value("sentinel_events_lost_total{kind=\"ssh\"}"),
            bans: value("sentinel_bans_total{reason=\"ssh_failures\"}"),
            refused: value("sentinel_bans_skipped_total{reason=\"ban_table_full\"}"),
            tracked: value("sentinel_ssh_tracked_addresses"),
            evictions: value("sentinel_ssh_tracking_evictions_total"),
        })
    }
}

pub fn measure(lab: &SshLab, setup: &GuardSetup) -> Result<FloodResults> {
    let dir = setup.dir.join("flood");
    fs::create_dir_all(dir.join("pam.d"))
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let pam_service = dir.join("pam.d").join(PAM_SERVICE);
    fs::write(&pam_service, PAM_SERVICE_TEXT)
        .with_context(|| format!("cannot write {}", pam_service.display()))?;
    let feeder = build_feeder(&dir)?;
    let settings = SentinelSettings {
        max_failures: FAILURES_TO_BAN,
        ban_seconds: BAN_SECONDS,
        max_tracked: BOUND,
        max_banned: BOUND,
        feeder: Some(feeder.clone()),
        port_scan: false,
    };
    let running = RunningGuard::sentinel(setup, &settings, "sentinel-flood")?;
    let idle = running.usage()?;

    println!("[bench] flood: spraying one failure from each of {ADDRESSES} addresses");
    feed(&feeder, &dir, SPRAY_FIRST, 1)?;
    let sprayed = u64::from(ADDRESSES);
    let after_spray = await_counters(&running, |counters| {
        // Each address is tracked or was evicted, once the guard has published its gauges.
        counters.failures + counters.lost >= sprayed
            && counters.tracked + counters.evictions + counters.lost >= sprayed
    })?;
    let spray_usage = running.usage()?;

    println!("[bench] flood: {FAILURES_TO_BAN} failures from each of {ADDRESSES} other addresses");
    let bookmark = lab.bookmark();
    let started = Instant::now();
    feed(&feeder, &dir, FLOOD_FIRST, FAILURES_TO_BAN)?;
    let feed_time = started.elapsed();
    let fed = sprayed + u64::from(ADDRESSES * FAILURES_TO_BAN);
    let decisions = u64::from(ADDRESSES);
    let counters = await_counters(&running, |counters| {
        // With events lost, some addresses never reach the threshold.
        counters.failures + counters.lost >= fed
            && (counters.lost > 0 || counters.bans + counters.refused >= decisions)
    })?;
    let table = Guard::Sentinel.table();
    eventually(SETTLE_LIMIT, || {
        lab.elements_added(&table, &bookmark).len() as u64 >= counters.bans
    });
    let committed = lab.elements_added(&table, &bookmark);
    let (Some(first), Some(last)) = (committed.first(), committed.last()) else {
        bail!("nft monitor saw no ban of the flood");
    };
    let span = last.duration_since(*first).as_secs_f64();
    let elements = lab.server().sentinel_set("banned_v4").len();
    let after = running.usage()?;
    running.stop()?;
    Ok(FloodResults {
        fed,
        counted: counters.failures,
        lost: counters.lost,
        tracked_after_spray: after_spray.tracked,
        evictions: counters.evictions,
        bans: counters.bans,
        refused: counters.refused,
        elements,
        feed_time,
        all_committed_after: last.duration_since(started),
        bans_per_second: if span > 0.0 {
            committed.len() as f64 / span
        } else {
            f64::INFINITY
        },
        rss_idle_kib: idle.rss_kib,
        rss_after_spray_kib: spray_usage.rss_kib,
        rss_after_kib: after.rss_kib,
        hwm_kib: after.hwm_kib,
        cpu_seconds: after.cpu_seconds - idle.cpu_seconds,
    })
}

/// Compiles the feeder: it needs libpam's headers (libpam0g-dev).
fn build_feeder(dir: &Path) -> Result<PathBuf> {
    let source = dir.join(format!("{FEEDER}.c"));
    let program = dir.join(FEEDER);
    fs::write(&source, FEEDER_SOURCE)
        .with_context(|| format!("cannot write {}", source.display()))?;
    run(Command::new("gcc")
        .args(["-O2", "-Wall", "-Werror", "-o"])
        .arg(&program)
        .arg(&source)
        .arg("-lpam"))
    .context("building the flood's PAM feeder failed (it needs gcc and libpam0g-dev)")?;
    Ok(program)
}

fn feed(feeder: &Path, dir: &Path, first: Ipv4Addr, failures_each: u32) -> Result<()> {
    run(Command::new(feeder)
        .arg(dir.join("pam.d"))
        .arg(PAM_SERVICE)
        .arg(first.to_string())
        .arg(ADDRESSES.to_string())
        .arg(failures_each.to_string()))
}

/// Polls Sentinel's counters until `done` holds; fails after `SETTLE_LIMIT`.
fn await_counters(running: &RunningGuard, done: impl Fn(&Counters) -> bool) -> Result<Counters> {
    let deadline = Instant::now() + SETTLE_LIMIT;
    loop {
        interrupt::check()?;
        let counters = Counters::read(running)?;
        if done(&counters) {
            return Ok(counters);
        }
        if Instant::now() >= deadline {
            bail!("Sentinel had not handled the flood after {SETTLE_LIMIT:?}: {counters:?}");
        }
        thread::sleep(POLL);
    }
}
