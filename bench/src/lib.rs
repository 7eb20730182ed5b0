//! `cargo xtask bench`: what Sentinel costs, always side by side with a floor (the same work
//! done by nothing, or by the least program that can do it) and with the tools an operator
//! would otherwise run, all in one run. Every section prints its own report; the run ends with
//! one table of ratios (see `summary`) and writes every raw figure to
//! `target/bench/results.json`. xtask drives it: it builds the daemon and boots the VM.
//!
//! Overhead section: two loops run in a cgroup of their own: spawning a tiny static program,
//! and loopback TCP connects closed with RST. Baseline runs (nothing attached) alternate with
//! runs under each tool (Sentinel, bpftrace, execsnoop-bpfcc), and each tool run is compared
//! with the baseline runs on either side of it. SSH section: brute force against Sentinel,
//! fail2ban and sshguard (`ssh/mod.rs`). Scan section: nmap against Sentinel and psad
//! (`scan.rs`). Scale sections: thousands of attributed cgroups on
//! this host (`scale.rs`), and hundreds to thousands of policed services in the VM, the only
//! place with cgroup v2 controllers (`policy.rs`). Fleet section: CrowdSec decisions applied by
//! Sentinel and by crowdsec-firewall-bouncer (`fleet.rs`).
//!
//! The bench reports timings and never asserts them. It fails when Sentinel cannot run, when a
//! tool fails during the measured runs, or when Sentinel's counts differ from the work done; a
//! peer that cannot run here is reported instead.
//!
//! Under `target/bench/`: the tiny program, Sentinel's configuration and control socket, each
//! tool's output from its latest run, and `results.json`.

mod cgroup;
mod fleet;
mod interrupt;
mod policy;
mod report;
mod scale;
mod scan;
mod ssh;
mod summary;
mod system;
mod tools;
mod workload;

use std::{
    fs,
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sentinel_host as host;

pub use self::fleet::FleetTools;
use self::{
    cgroup::BenchCgroup,
    report::{Report, ToolResults},
    summary::Summary,
    system::{Machine, Sysctl, TracefsMount, attachments, kernel_has_kprobes},
    tools::{RunSetup, Tool, measured_run, preflight},
    workload::{LoopTimes, run_loops},
};
use crate::host::{ensure_packages, is_root};

/// bpftool reads the programs' statistics; gcc and libc6-dev build the static no-op program.
const PACKAGES: &[&str] = &["bpftool", "gcc", "libc6-dev"];
const PEER_PACKAGES: &[&str] = &["bpftrace", "bpfcc-tools"];
/// The whole bench, peers included, took 5 to 7 minutes with this on a 2-vCPU VM: room to
/// stay under ten on a busier machine.
const DEFAULT_PAIRS: u32 = 10;
/// Where the loops' events are traced.
const LOOP_TRACEPOINTS: [&str; 2] = ["sched_process_exec", "inet_sock_set_state"];
/// Rough cost of starting and stopping a tool around a run, for the time estimate.
const TOOL_START_STOP_SECS: f64 = 3.0;

/// What the bench needs from its driver: the daemon built, and jobs run in the VM guest.
pub trait Driver {
    /// Builds the release daemon and whatever building it needs; returns its path.
    fn build_daemon(&self) -> Result<PathBuf>;
    /// Boots the VM guest to run `command` (a program of sentinel-tests) as a job named
    /// `name`; returns the lines it printed.
    fn run_vm_job(&self, name: &str, command: &str, timeout: Duration) -> Result<Vec<String>>;
    /// Debian's crowdsec and crowdsec-firewall-bouncer packages, unpacked (pinned).
    fn fleet_tools(&self) -> Result<FleetTools>;
}

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Iterations of each loop (execs, then TCP connects) per run.
    #[arg(long, value_name = "N", default_value_t = 20_000,
          value_parser = clap::value_parser!(u32).range(1..))]
    iterations: u32,
    /// Runs per tool, each paired with the baseline runs around it. Single pairs vary by
    /// ±20 % on a noisy VM: the medians need several.
    #[arg(long, value_name = "N", default_value_t = DEFAULT_PAIRS,
          value_parser = clap::value_parser!(u32).range(1..))]
    pairs: u32,
    /// SSH brute-force attacks per tool, each from a fresh address.
    #[arg(long, value_name = "N", default_value_t = 9,
          value_parser = clap::value_parser!(u32).range(1..=50))]
    ssh_attacks: u32,
    /// Key-only SSH attackers per tool, each from a fresh address, up to 20 attempts each.
    #[arg(long, value_name = "N", default_value_t = 3,
          value_parser = clap::value_parser!(u32).range(1..=50))]
    ssh_preauth_attacks: u32,
    /// Measure Sentinel only, without its peers (bpftrace and execsnoop-bpfcc; fail2ban and
    /// sshguard; psad).
    #[arg(long)]
    skip_peers: bool,
    /// Sizes of the policy section, in policed services, one VM run each.
    #[arg(long, value_name = "N", value_delimiter = ',', default_values_t = [500, 5_000],
          value_parser = clap::value_parser!(u32).range(1..))]
    policy_services: Vec<u32>,
    /// Where the policy section's services are: each a cgroup of its own at the top of the
    /// hierarchy, or all in one slice, as systemd places services.
    #[arg(long, value_enum, value_name = "LAYOUT", default_value = "top-level")]
    policy_layout: policy::Layout,
    /// Run these sections only (repeat or separate with commas).
    #[arg(long, value_enum, value_name = "SECTION", value_delimiter = ',')]
    only: Vec<Section>,
    /// Leave out these sections (repeat or separate with commas).
    #[arg(
        long,
        value_enum,
        value_name = "SECTION",
        value_delimiter = ',',
        conflicts_with = "only"
    )]
    skip: Vec<Section>,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Section {
    /// Exec and connect loops under each tracer.
    Overhead,
    /// SSH brute force against Sentinel, fail2ban and sshguard, and the flood.
    Ssh,
    /// Port scans (nmap, SYN and connect) against Sentinel and psad.
    Scan,
    /// 5,000 attributed cgroups on this host: scrapes, memory and CPU.
    Scale,
    /// Policed services in a VM (500 and 5,000 unless --policy-services says otherwise):
    /// apply, reload, scrapes, memory and CPU.
    Policy,
    /// CrowdSec decisions (10 and 10,000) applied by Sentinel and by
    /// crowdsec-firewall-bouncer from a real Local API, and by `nft -f`.
    Fleet,
}

impl BenchArgs {
    fn runs(&self, section: Section) -> bool {
        if self.only.is_empty() {
            !self.skip.contains(&section)
        } else {
            self.only.contains(&section)
        }
    }
}

pub fn bench(args: &BenchArgs, workspace: &Path, driver: &dyn Driver) -> Result<()> {
    ensure!(
        is_root(),
        "cargo xtask bench must run as root: it loads eBPF programs, creates cgroups and \
         network namespaces, and sets kernel.bpf_stats_enabled"
    );
    let started = Instant::now();
    let out_dir = workspace.join("target/bench");
    fs::create_dir_all(&out_dir).with_context(|| format!("cannot create {}", out_dir.display()))?;

    step("bench: installing what is missing");
    if args.runs(Section::Overhead) {
        ensure_packages("bench tools", PACKAGES)?;
        if !args.skip_peers {
            ensure_packages("peers to compare with", PEER_PACKAGES)?;
        }
    }
    if args.runs(Section::Ssh) {
        ssh::ensure_packages(!args.skip_peers)?;
    }
    let fleet_tools = if args.runs(Section::Fleet) {
        Some(driver.fleet_tools()?)
    } else {
        None
    };
    if args.runs(Section::Scan) {
        ssh::ensure_scan_packages(!args.skip_peers)?;
    }
    step("bench: building the daemon (release)");
    let daemon = driver.build_daemon()?;
    let machine = Machine::read()?;

    // From here on the bench changes the host: every change is undone on drop.
    interrupt::install()?;
    let mut summary = Summary::default();
    // A section that fails does not keep the next from running; the bench fails at the end.
    let mut failed = Vec::new();
    if args.runs(Section::Overhead) {
        let outcome = overhead(args, &daemon, &out_dir, &machine, &mut summary);
        note_failure(&mut failed, "overhead", outcome)?;
    }
    if args.runs(Section::Ssh) {
        let outcome = ssh::bench(
            &ssh::SshBench {
                daemon: &daemon,
                out_dir: &out_dir,
                attacks: args.ssh_attacks,
                preauth_attacks: args.ssh_preauth_attacks,
                with_peers: !args.skip_peers,
                machine: &machine,
            },
            &mut summary,
        );
        note_failure(&mut failed, "ssh", outcome)?;
    }
    if args.runs(Section::Scan) {
        let outcome = scan::bench(
            &scan::ScanBench {
                daemon: &daemon,
                out_dir: &out_dir,
                with_peers: !args.skip_peers,
                machine: &machine,
            },
            &mut summary,
        );
        note_failure(&mut failed, "scan", outcome)?;
    }
    if args.runs(Section::Scale) {
        let outcome = scale::bench(&daemon, &out_dir, &mut summary);
        note_failure(&mut failed, "scale", outcome)?;
    }
    if args.runs(Section::Policy) {
        let outcome = policy::bench(
            driver,
            &args.policy_services,
            args.policy_layout,
            &mut summary,
        );
        note_failure(&mut failed, "policy", outcome)?;
    }
    if let Some(tools) = &fleet_tools {
        let outcome = fleet::bench(&daemon, tools, &out_dir, &mut summary);
        note_failure(&mut failed, "fleet", outcome)?;
    }
    step("bench: Sentinel against the floor and its peers, all from this run");
    println!("\n{machine}.\n\n{summary}");
    let results = out_dir.join("results.json");
    summary.write(&results, &machine)?;
    println!("[bench] raw figures: {}", results.display());
    println!(
        "[bench] done in {:.1} minutes",
        started.elapsed().as_secs_f64() / 60.0
    );
    ensure!(
        failed.is_empty(),
        "bench sections failed: {}",
        failed.join("; ")
    );
    Ok(())
}

fn step(title: &str) {
    println!("[bench] === {title}");
}

/// Records a failed section; Ctrl-C or SIGTERM still ends the whole bench at once.
fn note_failure(failed: &mut Vec<String>, section: &str, outcome: Result<()>) -> Result<()> {
    if let Err(error) = outcome {
        interrupt::check()?;
        eprintln!("[bench] the {section} section FAILED: {error:#}");
        failed.push(format!("{section}: {error:#}"));
    }
    Ok(())
}

fn overhead(
    args: &BenchArgs,
    daemon: &Path,
    out_dir: &Path,
    machine: &Machine,
    summary: &mut Summary,
) -> Result<()> {
    let started = Instant::now();
    let nop = workload::build_nop_program(out_dir)?;
    let daemon_configs = tools::write_daemon_configs(out_dir, &nop)?;
    let _tracefs = if args.skip_peers {
        None
    } else {
        TracefsMount::mount_if_missing()?
    };
    let cgroup = BenchCgroup::create()?;
    let _bpf_stats = Sysctl::enable(Sysctl::BPF_STATS)?;
    let setup = RunSetup {
        daemon,
        daemon_configs: &daemon_configs,
        daemon_socket: &out_dir.join("sentinel.sock"),
        nop: &nop,
        out_dir,
        cgroup: &cgroup,
        iterations: args.iterations,
        own_comm: fs::read_to_string("/proc/self/comm")
            .context("cannot read /proc/self/comm")?
            .trim()
            .to_owned(),
    };

    step("bench: checking that each tool runs here");
    let lineup = lineup(&setup, args.skip_peers)?;
    step("bench: measuring");
    warn_about_other_tracers()?;
    let (baselines, results) = measure(&setup, &lineup.tools, args.pairs)?;

    let report = Report {
        machine,
        iterations: args.iterations,
        baselines: &baselines,
        results: &results,
        unavailable: &lineup.unavailable,
        elapsed: started.elapsed(),
    };
    step("bench: overhead results");
    println!("\n{report}");
    report.summarize(summary);
    check_sentinel_counts(&results, args.iterations)
}

struct Lineup {
    tools: Vec<Tool>,
    /// Peers that cannot run here, and why.
    unavailable: Vec<(Tool, String)>,
}

/// Sentinel must run, with and without containment; a peer that cannot is reported instead.
fn lineup(setup: &RunSetup, skip_peers: bool) -> Result<Lineup> {
    let mut tools = Vec::new();
    for tool in [Tool::Sentinel, Tool::SentinelContained] {
        preflight(tool, setup)
            .with_context(|| format!("{} cannot run on this host", tool.label()))?;
        println!("[bench] {}: runs", tool.label());
        tools.push(tool);
    }
    let mut unavailable = Vec::new();
    if !skip_peers {
        for peer in Tool::PEERS {
            match preflight(peer, setup) {
                Ok(()) => {
                    println!("[bench] {}: runs", peer.label());
                    tools.push(peer);
                }
                Err(error) => {
                    interrupt::check()?;
                    let reason = unavailable_reason(peer, &error);
                    println!("[bench] {}: CANNOT RUN HERE: {reason}", peer.label());
                    unavailable.push((peer, reason));
                }
            }
        }
    }
    Ok(Lineup { tools, unavailable })
}

fn unavailable_reason(peer: Tool, error: &anyhow::Error) -> String {
    let mut reason = format!("{error:#}");
    if peer == Tool::Execsnoop && !kernel_has_kprobes() {
        reason.push_str(
            "; besides, this kernel has no kprobes (CONFIG_KPROBES is off), which \
             execsnoop-bpfcc attaches to execve with",
        );
    }
    reason
}

/// Another tracer on the loops' tracepoints (a Sentinel service, a test suite) would slow
/// the baseline runs too and shrink every ratio.
fn warn_about_other_tracers() -> Result<()> {
    let others: Vec<String> = attachments()?
        .iter()
        .filter(|attachment| LOOP_TRACEPOINTS.contains(&attachment.target.as_str()))
        .map(|attachment| format!("pid {} on {}", attachment.pid, attachment.target))
        .collect();
    if !others.is_empty() {
        println!(
            "[bench] WARNING: BPF programs of other processes are attached to the loops' \
             tracepoints ({}); the baseline runs are not free of tracing",
            others.join(", ")
        );
    }
    Ok(())
}

/// Baseline runs alternating with the tools' runs: B T1 B T2 B ... T1 B T2 B.
fn measure(
    setup: &RunSetup,
    tools: &[Tool],
    pairs: u32,
) -> Result<(Vec<LoopTimes>, Vec<ToolResults>)> {
    // A short unrecorded run warms the page cache and the allocators.
    let warmup_iterations = (setup.iterations / 10).max(1);
    let warmup = run_loops(setup.nop, warmup_iterations, setup.cgroup)?;
    let loops_secs = (warmup.exec.wall + warmup.connect.wall) * f64::from(setup.iterations) / 1e6;
    let tool_runs = pairs as usize * tools.len();
    let estimate =
        (2 * tool_runs + 1) as f64 * loops_secs + tool_runs as f64 * TOOL_START_STOP_SECS;
    println!(
        "[bench] {tool_runs} tool runs and {} baseline runs; about {:.0} minutes",
        tool_runs + 1,
        estimate / 60.0
    );

    let mut baselines = vec![baseline_run(setup, "start")?];
    let mut results: Vec<ToolResults> = tools.iter().map(|&tool| ToolResults::new(tool)).collect();
    for pair in 1..=pairs {
        for results in &mut results {
            let label = results.tool.label();
            let run = measured_run(results.tool, setup)
                .with_context(|| format!("run {pair} of {label} failed"))?;
            print_times(&format!("{pair}/{pairs} {label}"), run.times);
            let before = *baselines
                .last()
                .expect("the first baseline run is recorded");
            let after = baseline_run(setup, &format!("{pair}/{pairs}"))?;
            baselines.push(after);
            let ratios = results.push(run, before, after);
            println!(
                "[bench]   {label} against the baselines around it: exec {:.3}x (CPU {:.3}x), \
                 connect {:.3}x (CPU {:.3}x)",
                ratios.exec.wall, ratios.exec.cpu, ratios.connect.wall, ratios.connect.cpu,
            );
        }
    }
    Ok((baselines, results))
}

fn baseline_run(setup: &RunSetup, when: &str) -> Result<LoopTimes> {
    let times = run_loops(setup.nop, setup.iterations, setup.cgroup)
        .with_context(|| format!("baseline run ({when}) failed"))?;
    print_times(&format!("{when} baseline"), times);
    Ok(times)
}

fn print_times(what: &str, times: LoopTimes) {
    println!(
        "[bench] {what:<34} µs per exec {:>6.1} (CPU {:>6.1}), per connect {:>5.1} (CPU {:>5.1})",
        times.exec.wall, times.exec.cpu, times.connect.wall, times.connect.cpu
    );
}

/// Sentinel must have counted every exec and connect of the bench's cgroup, lost nothing,
/// and found no violation of the allow list, which holds the exec loop's program.
fn check_sentinel_counts(results: &[ToolResults], iterations: u32) -> Result<()> {
    let expected = Some(u64::from(iterations));
    let wrong: Vec<String> = results
        .iter()
        .filter(|results| results.tool.is_sentinel())
        .flat_map(|results| {
            let label = results.tool.label();
            results.runs.iter().enumerate().map(move |run| (label, run))
        })
        .filter(|(_, (_, run))| {
            run.seen.execs != expected
                || run.seen.connects != expected
                || run.seen.lost != Some(0)
                || run.seen.violations != Some(0)
        })
        .map(|(label, (index, run))| {
            format!(
                "{label}, run {}: execs {:?}, connects {:?}, lost {:?}, violations {:?}",
                index + 1,
                run.seen.execs,
                run.seen.connects,
                run.seen.lost,
                run.seen.violations
            )
        })
        .collect();
    if !wrong.is_empty() {
        bail!(
            "Sentinel's counters for the bench cgroup differ from the {iterations} iterations \
             per loop (or events were lost, or an exec was a violation):\n  {}",
            wrong.join("\n  ")
        );
    }
    println!(
        "[bench] Sentinel counted every exec and connect of the bench's cgroup exactly, lost \
         no events and, contained, counted no violation during the loops"
    );
    Ok(())
}
