//! The port-scan section of `cargo xtask bench`: Debian's nmap scanning closed ports of the SSH
//! lab's server (sshd listening, nothing else) from a fresh attacker address per scan, a SYN
//! scan and a connect scan at a fixed rate, against Sentinel (`port_scan: {mode: enforce}`
//! with its defaults) and psad, the one packaged peer that detects scans. fail2ban and
//! sshguard have no port-scan detector in their stock configuration and are not run. For
//! psad an nftables `log` rule of the bench's own logs, in the server namespace only, every
//! SYN to a port other than sshd's, and a `dmesg` follower copies those lines to the file psad
//! reads, as syslog would. Per tool and scan: whether the attacker was dropped, how many of
//! the scanned ports answered before, the time from the scan's start to the first dropped
//! probe, and the tool's CPU time and memory. Nothing is asserted; psad that cannot run is
//! reported instead.
//!
//! Under `target/bench/scan/`: each tool's configuration and output, psad's kernel log, and the
//! lab's files.

use std::{
    fmt::Write as _,
    fs::{self, File},
    io::Write as _,
    path::Path,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use sentinel_tests::sshlab::SshdAuth;
use serde_json::{Value, json};

use crate::{
    interrupt,
    ssh::{
        guards::{Guard, GuardSetup, PSAD_DANGER_LEVEL, RunningGuard, SentinelSettings, Usage},
        lab::{CLOSED_PORT, SSH_PORT, SshLab, syslog_line},
        timeline::{Stamped, Timeline, lock},
    },
    summary::Summary,
    system::{Machine, Sysctl},
};

/// The scanned ports: all closed, and apart from sshd's and the drop probe's.
const PORTS: &str = "1000-1099";
const PORT_COUNT: u32 = 100;
/// Probes a second: the 100 ports take 5 s, one check interval of psad's.
const RATE: u32 = 20;
/// nmap's option and the scan's name.
const SCANS: [(&str, &str); 2] = [("-sS", "SYN"), ("-sT", "connect")];
/// How long an attacker is probed for a drop: the scan and three of psad's check intervals.
const DROP_LIMIT: Duration = Duration::from_secs(20);
/// The log rule's table in the server namespace, and the prefix of its lines (psad looks
/// for DROP in them).
const LOG_TABLE: &str = "sentinel-bench-log";
const LOG_PREFIX: &str = "sentinel-bench DROP ";

pub struct ScanBench<'a> {
    pub daemon: &'a Path,
    pub out_dir: &'a Path,
    pub with_peers: bool,
    pub machine: &'a Machine,
}

/// One scan against one tool.
struct Sample {
    scan: &'static str,
    /// Ports nmap found closed: answered before the attacker was dropped.
    answered: u16,
    /// From the scan's start to the first dropped probe; `None`: not dropped within
    /// `DROP_LIMIT`.
    time_to_drop: Option<Duration>,
}

struct ScanResults {
    guard: Guard,
    samples: Vec<Sample>,
    cpu_seconds_per_scan: f64,
    /// Each process's peak since it started, summed.
    hwm_kib: u64,
}

pub fn bench(bench: &ScanBench, summary: &mut Summary) -> Result<()> {
    let dir = bench.out_dir.join("scan");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "[bench] scans: {} of {PORT_COUNT} closed ports at {RATE} a second per tool, each from \
         a fresh address",
        SCANS.len()
    );
    let lab = SshLab::start(&dir, SshdAuth::Password)?;
    let setup = GuardSetup {
        daemon: bench.daemon,
        server: lab.server(),
        dir: &dir,
    };
    let mut results = vec![measure(Guard::Sentinel, &lab, &setup)?];
    let mut unavailable = None;
    if bench.with_peers {
        match measure(Guard::Psad, &lab, &setup) {
            Ok(measured) => results.push(measured),
            Err(error) => {
                interrupt::check()?;
                println!("[bench] psad: COULD NOT BE MEASURED: {error:#}");
                unavailable = Some(format!("{error:#}"));
            }
        }
    }
    drop(lab);
    crate::step("bench: port-scan results");
    println!(
        "\n{}",
        report(bench.machine, &results, unavailable.as_deref())
    );
    summarize(&results, summary);
    Ok(())
}

fn measure(guard: Guard, lab: &SshLab, setup: &GuardSetup) -> Result<ScanResults> {
    crate::step(&format!("bench: port scans against {}", guard.label()));
    // Only psad reads the kernel's log of the packets.
    let (_nf_log, _rule, kernel_log, running) = if guard == Guard::Psad {
        let nf_log = Sysctl::enable(Sysctl::NF_LOG_ALL_NETNS)?;
        let rule = LogRule::add(lab)?;
        let kernel_log = KernelLog::start(&setup.dir.join("kernel-for-psad.log"))?;
        let running = RunningGuard::psad(setup, &kernel_log.path)?;
        (Some(nf_log), Some(rule), Some(kernel_log), running)
    } else {
        let running = RunningGuard::sentinel(setup, &SentinelSettings::SCAN, "sentinel-scan")?;
        (None, None, None, running)
    };
    let before = running.usage()?;
    let mut samples = Vec::new();
    for (option, scan) in SCANS {
        interrupt::check()?;
        let sample = scan_once(lab, option, scan)?;
        println!(
            "[bench]   {} {scan} scan: {} of {PORT_COUNT} ports answered, first drop {}",
            guard.label(),
            sample.answered,
            sample
                .time_to_drop
                .map_or("never".to_owned(), |time| format!("after {time:.2?}"))
        );
        samples.push(sample);
    }
    let after: Usage = running.usage()?;
    running.stop()?;
    drop(kernel_log);
    Ok(ScanResults {
        guard,
        samples,
        cpu_seconds_per_scan: (after.cpu_seconds - before.cpu_seconds) / SCANS.len() as f64,
        hwm_kib: after.hwm_kib,
    })
}

/// One scan from a fresh address, probed for a drop all along.
fn scan_once(lab: &SshLab, option: &str, scan: &'static str) -> Result<Sample> {
    let source = lab.new_attacker()?;
    ensure!(
        !lab.drops(source)?,
        "{source} is dropped before it scanned anything"
    );
    let (answered, dropped) = thread::scope(|scope| {
        let started = Instant::now();
        let prober = scope.spawn(|| lab.await_drop(source, DROP_LIMIT));
        let answered = lab.scan(source, option, PORTS, RATE);
        let dropped = prober
            .join()
            .map_err(|_| anyhow::anyhow!("the drop prober panicked"))?;
        Ok::<_, anyhow::Error>((answered, dropped?.map(|at| at.duration_since(started))))
    })?;
    Ok(Sample {
        scan,
        answered,
        time_to_drop: dropped,
    })
}

/// An nftables `log` rule in the server namespace: every SYN to a port other than sshd's, as
/// a firewall that lets only SSH in would log what it drops; but not the drop probes' port,
/// whose thousand SYNs a second would make psad's alert, not the scan's. Removed on drop.
struct LogRule<'a> {
    lab: &'a SshLab,
}

impl<'a> LogRule<'a> {
    fn add(lab: &'a SshLab) -> Result<Self> {
        lab.server().nft(
            &["-f", "-"],
            &format!(
                "table inet {LOG_TABLE} {{
    chain input {{
        type filter hook input priority filter - 10; policy accept;
        tcp dport != {{ {SSH_PORT}, {CLOSED_PORT} }} tcp flags & (syn | ack) == syn log prefix \"{LOG_PREFIX}\"
    }}
}}
"
            ),
        );
        Ok(Self { lab })
    }
}

impl Drop for LogRule<'_> {
    fn drop(&mut self) {
        self.lab
            .server()
            .nft(&["delete", "table", "inet", LOG_TABLE], "");
    }
}

/// `dmesg --follow-new`, its lines with the log rule's prefix copied to `path` in syslog's
/// format, as syslog would write the kernel's messages. Stopped on drop.
struct KernelLog {
    process: Child,
    path: std::path::PathBuf,
    _lines: Timeline,
}

impl KernelLog {
    fn start(path: &Path) -> Result<Self> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        let file = Arc::new(Mutex::new(file));
        let mut process = Command::new("dmesg")
            .args(["--follow-new", "--kernel"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start dmesg")?;
        let stdout = process.stdout.take().context("dmesg's output")?;
        let lines = Timeline::record(stdout, move |line: &Stamped| {
            if line.text.contains(LOG_PREFIX) {
                // A failed write shows up as psad never detecting.
                let _ = lock(&file).write_all(syslog_line("kernel", &line.text).as_bytes());
            }
        });
        Ok(Self {
            process,
            path: path.to_owned(),
            _lines: lines,
        })
    }
}

impl Drop for KernelLog {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

fn report(machine: &Machine, results: &[ScanResults], unavailable: Option<&str>) -> String {
    let mut text = format!(
        "Port scans on {machine}: nmap from a fresh address per scan, {PORT_COUNT} closed ports \
         at {RATE} a second, one probe per port; a probe of port {CLOSED_PORT} from the same \
         address every millisecond tells when its packets start being dropped (Sentinel counts \
         that port as one of its 20; psad's log rule leaves it out). Sentinel: \
         `port_scan: {{mode: enforce}}` (20 distinct closed ports within 10 s). psad: Debian's \
         configuration with its auto IDS on at danger level {PSAD_DANGER_LEVEL} (15 packets), \
         reading an nftables log rule's lines.\n\n\
         | tool | scan | dropped | ports answered before | scan start to first drop | \
         CPU per scan | peak RSS |\n|---|---|---|--:|--:|--:|--:|\n"
    );
    for results in results {
        for sample in &results.samples {
            let _ = writeln!(
                text,
                "| {} | {} | {} | {} of {PORT_COUNT} | {} | {:.0} ms | {:.1} MiB |",
                results.guard.label(),
                sample.scan,
                if sample.time_to_drop.is_some() {
                    "yes"
                } else {
                    "no"
                },
                sample.answered,
                sample
                    .time_to_drop
                    .map_or("-".to_owned(), |time| format!("{:.0} ms", millis(time))),
                results.cpu_seconds_per_scan * 1e3,
                results.hwm_kib as f64 / 1024.0,
            );
        }
    }
    if let Some(reason) = unavailable {
        let _ = writeln!(text, "\npsad could not be measured: {reason}");
    }
    text.push_str(
        "\nfail2ban and sshguard were not run: neither has a port-scan detector in its stock \
         configuration.\n",
    );
    text
}

fn millis(time: Duration) -> f64 {
    time.as_secs_f64() * 1e3
}

fn summarize(results: &[ScanResults], summary: &mut Summary) {
    summary.record(
        "scan",
        Value::Array(
            results
                .iter()
                .map(|results| {
                    json!({
                        "tool": results.guard.label(),
                        "cpu_seconds_per_scan": results.cpu_seconds_per_scan,
                        "peak_rss_kib": results.hwm_kib,
                        "scans": results.samples.iter().map(|sample| json!({
                            "scan": sample.scan,
                            "ports_answered": sample.answered,
                            "ms_to_first_drop": sample.time_to_drop.map(millis),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect(),
        ),
    );
    let [sentinel, peers @ ..] = results else {
        return;
    };
    for peer in peers {
        let against = peer.guard.label();
        for (ours, theirs) in sentinel.samples.iter().zip(&peer.samples) {
            summary.compare(
                "scan",
                format!("{} scan: ports answered before the drop", ours.scan),
                "ports",
                f64::from(ours.answered),
                against,
                f64::from(theirs.answered),
            );
            if let (Some(mine), Some(its)) = (ours.time_to_drop, theirs.time_to_drop) {
                summary.compare(
                    "scan",
                    format!("{} scan: start to first drop", ours.scan),
                    "ms",
                    millis(mine),
                    against,
                    millis(its),
                );
            }
        }
        summary.compare(
            "scan",
            "CPU per scan",
            "ms",
            sentinel.cpu_seconds_per_scan * 1e3,
            against,
            peer.cpu_seconds_per_scan * 1e3,
        );
        summary.compare(
            "scan",
            "peak RSS",
            "MiB",
            sentinel.hwm_kib as f64 / 1024.0,
            against,
            peer.hwm_kib as f64 / 1024.0,
        );
    }
}
