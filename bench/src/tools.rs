//! The tracers under test: Sentinel, and the peers an operator would otherwise run for the
//! same visibility. Each is started before a run's loops and stopped after them; a run
//! records what the tool saw of the loops and what it cost.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    str::FromStr,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};

use super::{
    cgroup::{BenchCgroup, SERVICE},
    interrupt,
    system::{Attachment, ProcessUsage, ProgramCost, attachments, process_usage, program_costs},
    workload::{LoopTimes, NOP_PROGRAM, run_loops},
};

/// Observation only: the SSH guard would write nftables rules in the host's network
/// namespace, and the loops never exercise it.
const DAEMON_CONFIG: &str = "ssh_guard:\n  enabled: false\n";
/// Files in the contained run's `exec.allow`: the exec loop's program and others.
pub const ALLOWED_EXECUTABLES: usize = 50;
/// Where the rest of the allow list comes from: real executables, as a service would list.
const ALLOW_LIST_SOURCE: &str = "/usr/bin";
/// Sentinel reports a violation through its alerts ring buffer, polled within milliseconds.
const VIOLATION_TIMEOUT: Duration = Duration::from_secs(10);
/// Count-only: the kernel keeps the counts, user space reads them once at exit.
/// (State 2 is TCP_SYN_SENT: connect() has sent its SYN.)
const BPFTRACE_COUNT: &str = "tracepoint:sched:sched_process_exec { @exec[comm] = count(); } \
    tracepoint:sock:inet_sock_set_state /args->newstate == 2/ { @connect[comm] = count(); }";
/// One line per event, as an operator watching a terminal would run it.
const BPFTRACE_PRINTF: &str = r#"tracepoint:sched:sched_process_exec {
    printf("exec %s %d %s\n", comm, pid, str(args->filename)); }
tracepoint:sock:inet_sock_set_state /args->newstate == 2/ {
    printf("connect %s %d %s %d\n", comm, pid, ntop(args->daddr), args->dport); }"#;
/// Each bpftrace script has two tracepoints; execsnoop attaches to execve's entry and return.
const PEER_ATTACHMENTS: usize = 2;
/// Sentinel's probes the loops exercise (`program` labels of `sentinel_probe_attached`).
const SENTINEL_PROBES: [&str; 2] = ["exec", "tcp_state"];
/// BCC compiles its programs with clang at start-up, which takes a while.
const READY_TIMEOUT: Duration = Duration::from_secs(90);
/// bpftrace prints its maps on SIGINT; on a loaded machine that took over 10 s once.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tool {
    Sentinel,
    /// Sentinel with the loops' cgroup contained by a policy (`exec.allow`, `on_violation:
    /// alert`).
    SentinelContained,
    BpftraceCount,
    BpftracePrintf,
    Execsnoop,
}

impl Tool {
    pub const PEERS: [Self; 3] = [Self::BpftraceCount, Self::BpftracePrintf, Self::Execsnoop];

    pub fn label(self) -> &'static str {
        match self {
            Self::Sentinel => "Sentinel",
            Self::SentinelContained => "Sentinel, exec.allow of 50",
            Self::BpftraceCount => "bpftrace, count per comm",
            Self::BpftracePrintf => "bpftrace, printf per event",
            Self::Execsnoop => "execsnoop-bpfcc",
        }
    }

    pub fn is_sentinel(self) -> bool {
        matches!(self, Self::Sentinel | Self::SentinelContained)
    }

    fn file_stem(self) -> &'static str {
        match self {
            Self::Sentinel => "sentinel",
            Self::SentinelContained => "sentinel-contained",
            Self::BpftraceCount => "bpftrace-count",
            Self::BpftracePrintf => "bpftrace-printf",
            Self::Execsnoop => "execsnoop-bpfcc",
        }
    }
}

/// What every run needs.
pub struct RunSetup<'a> {
    pub daemon: &'a Path,
    /// Sentinel's configuration files and control socket.
    pub daemon_configs: &'a DaemonConfigs,
    pub daemon_socket: &'a Path,
    pub nop: &'a Path,
    pub out_dir: &'a Path,
    pub cgroup: &'a BenchCgroup,
    pub iterations: u32,
    /// `comm` of this process, which makes the connect loop's connects.
    pub own_comm: String,
}

/// One run of both loops under a tool.
pub struct ToolRun {
    pub times: LoopTimes,
    pub seen: Seen,
    /// CPU time during the loops; memory at their end.
    pub usage: ProcessUsage,
    pub programs: Vec<ProgramCost>,
}

/// The loops' events as the tool reported them; `None` where it does not watch that kind.
#[derive(Debug, Clone, Copy, Default)]
pub struct Seen {
    pub execs: Option<u64>,
    pub connects: Option<u64>,
    /// Sentinel only: the sum of `sentinel_events_lost_total`.
    pub lost: Option<u64>,
    /// Sentinel only: `sentinel_exec_violations_total` of the loops' cgroup.
    pub violations: Option<u64>,
}

/// Sentinel's configurations: count only, and with the loops' cgroup contained.
pub struct DaemonConfigs {
    count_only: PathBuf,
    contained: PathBuf,
    /// A copy of the exec loop's program: a file the allow list does not hold.
    unlisted: PathBuf,
}

/// Writes the configurations Sentinel runs with during the bench. The contained one lists `nop`
/// and other executables, `ALLOWED_EXECUTABLES` in all, so that nothing the loops run is a
/// violation; alerts go to an audit log under `out_dir`.
pub fn write_daemon_configs(out_dir: &Path, nop: &Path) -> Result<DaemonConfigs> {
    let write = |name: &str, text: &str| {
        let path = out_dir.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok::<_, anyhow::Error>(path)
    };
    let count_only = write("sentinel.yaml", DAEMON_CONFIG)?;
    let mut allow = vec![nop.display().to_string()];
    allow.extend(other_executables(ALLOWED_EXECUTABLES - 1)?);
    let contained = write(
        "sentinel-contained.yaml",
        &format!(
            "ssh_guard:\n  enabled: false\n  audit_log: {}\npolicies:\n  - name: bench-loops\n    \
             cgroup: {SERVICE}\n    exec.allow: [{}]\n    on_violation: alert\n",
            out_dir.join("sentinel-contained-audit.log").display(),
            allow.join(", ")
        ),
    )?;
    let unlisted = out_dir.join(format!("{NOP_PROGRAM}-unlisted"));
    fs::copy(nop, &unlisted).with_context(|| format!("cannot write {}", unlisted.display()))?;
    Ok(DaemonConfigs {
        count_only,
        contained,
        unlisted,
    })
}

/// The first `count` regular files of `ALLOW_LIST_SOURCE` by name, with names that need no
/// quoting in YAML.
fn other_executables(count: usize) -> Result<Vec<String>> {
    let entries = fs::read_dir(ALLOW_LIST_SOURCE)
        .with_context(|| format!("cannot list {ALLOW_LIST_SOURCE}"))?;
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .filter(|entry| entry.file_type().is_ok_and(|kind| kind.is_file()))
        .filter_map(|entry| entry.file_name().into_string().ok())
        .filter(|name| {
            name.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        })
        .collect();
    names.sort();
    ensure!(
        names.len() >= count,
        "{ALLOW_LIST_SOURCE} has {} executables, fewer than the {count} the allow list needs",
        names.len()
    );
    Ok(names
        .into_iter()
        .take(count)
        .map(|name| format!("{ALLOW_LIST_SOURCE}/{name}"))
        .collect())
}

/// Starts and stops `tool` once, so that a tool that cannot run here is known before the
/// measured runs start (and its start-up caches are warm for them).
pub fn preflight(tool: Tool, setup: &RunSetup) -> Result<()> {
    let mut tracer = Tracer::start(tool, setup)?;
    tracer.wait_ready()?;
    tracer.stop()
}

pub fn measured_run(tool: Tool, setup: &RunSetup) -> Result<ToolRun> {
    let mut tracer = Tracer::start(tool, setup)?;
    tracer.wait_ready()?;
    let pid = tracer.child.id();
    let before = process_usage(pid)?;
    let times = run_loops(setup.nop, setup.iterations, setup.cgroup)?;
    let mut usage = process_usage(pid)?;
    usage.cpu_seconds -= before.cpu_seconds;
    let programs = program_costs(pid)?;
    let daemon_seen = tracer.metrics.map(sentinel_seen).transpose()?;
    if tool == Tool::SentinelContained {
        tracer.prove_contained(setup)?;
    }
    tracer.stop()?;
    let seen = match daemon_seen {
        Some(seen) => seen,
        None => peer_seen(tool, setup)?,
    };
    Ok(ToolRun {
        times,
        seen,
        usage,
        programs,
    })
}

/// A started tool, killed on drop unless it was stopped.
struct Tracer {
    tool: Tool,
    child: Child,
    stderr: PathBuf,
    /// Sentinel's /metrics address.
    metrics: Option<SocketAddr>,
}

impl Tracer {
    fn start(tool: Tool, setup: &RunSetup) -> Result<Self> {
        let (mut command, metrics) = match tool {
            Tool::Sentinel | Tool::SentinelContained => {
                let config = if tool == Tool::Sentinel {
                    &setup.daemon_configs.count_only
                } else {
                    &setup.daemon_configs.contained
                };
                let address = free_loopback_address()?;
                let mut command = Command::new(setup.daemon);
                // Its own configuration and socket: neither the host's configuration nor a
                // Sentinel service already running changes what is measured.
                command
                    .arg("run")
                    .arg("--config")
                    .arg(config)
                    .arg("--control-socket")
                    .arg(setup.daemon_socket)
                    .arg("--metrics-addr")
                    .arg(address.to_string());
                (command, Some(address))
            }
            Tool::BpftraceCount => (bpftrace(BPFTRACE_COUNT), None),
            Tool::BpftracePrintf => (bpftrace(BPFTRACE_PRINTF), None),
            Tool::Execsnoop => (Command::new("execsnoop-bpfcc"), None),
        };
        let stdout = output_path(tool, setup, "stdout");
        let stderr = output_path(tool, setup, "stderr");
        let child = command
            .stdin(Stdio::null())
            .stdout(create(&stdout)?)
            .stderr(create(&stderr)?)
            .spawn()
            .with_context(|| format!("cannot start {}", tool.label()))?;
        Ok(Self {
            tool,
            child,
            stderr,
            metrics,
        })
    }

    fn wait_ready(&mut self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            interrupt::check()?;
            if let Some(status) = self.child.try_wait()? {
                bail!(
                    "{} exited before attaching ({status}): {}",
                    self.tool.label(),
                    self.stderr_summary()
                );
            }
            if self.is_ready()? {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not attach within {READY_TIMEOUT:?}: {}",
                self.tool.label(),
                self.stderr_summary()
            );
            thread::sleep(POLL);
        }
    }

    fn is_ready(&self) -> Result<bool> {
        let Some(address) = self.metrics else {
            return Ok(attachments_of(self.child.id())?.len() >= PEER_ATTACHMENTS);
        };
        // The daemon serves /metrics only once its probes are attached.
        let Ok(metrics) = scrape(address) else {
            return Ok(false);
        };
        for probe in SENTINEL_PROBES {
            let attached = sample(
                &metrics,
                &format!("sentinel_probe_attached{{program=\"{probe}\"}}"),
            );
            ensure!(
                attached == Some(1),
                "Sentinel's {probe} probe is not attached (sentinel_probe_attached: {attached:?}); \
                 its log: {}",
                self.stderr.display()
            );
        }
        Ok(true)
    }

    /// Sentinel's containment was in force during the loops: one exec of a file its allow
    /// list does not hold, in the loops' cgroup, is exactly one violation (after the loops'
    /// none; `on_violation: alert` lets it run).
    fn prove_contained(&self, setup: &RunSetup) -> Result<()> {
        let address = self.metrics.context("Sentinel serves /metrics")?;
        let violations = || -> Result<u64> { Ok(sentinel_seen(address)?.violations.unwrap_or(0)) };
        let before = violations()?;
        let inside = setup.cgroup.enter()?;
        let unlisted = &setup.daemon_configs.unlisted;
        let status = Command::new(unlisted)
            .status()
            .with_context(|| format!("cannot start {}", unlisted.display()));
        inside.leave()?;
        let status = status?;
        ensure!(
            status.success(),
            "{} failed in the contained cgroup ({status}): `on_violation: alert` must let it run",
            unlisted.display()
        );
        let deadline = Instant::now() + VIOLATION_TIMEOUT;
        loop {
            let after = violations()?;
            if after == before + 1 {
                return Ok(());
            }
            ensure!(
                after <= before && Instant::now() < deadline,
                "the containment policy was not in force: an exec of {} in the contained cgroup \
                 moved sentinel_exec_violations_total from {before} to {after} (expected one \
                 more) within {VIOLATION_TIMEOUT:?}; its log: {}",
                unlisted.display(),
                self.stderr.display()
            );
            thread::sleep(POLL);
        }
    }

    /// SIGTERM for Sentinel, SIGINT for the peers (bpftrace prints its maps on SIGINT).
    fn stop(mut self) -> Result<()> {
        let signal = if self.tool.is_sentinel() {
            libc::SIGTERM
        } else {
            libc::SIGINT
        };
        let pid = libc::pid_t::try_from(self.child.id()).context("pid out of range")?;
        // SAFETY: kill has no memory-safety preconditions; the pid is our child, not yet
        // reaped, so it cannot have been reused.
        if unsafe { libc::kill(pid, signal) } != 0 {
            bail!(
                "cannot signal {}: {}",
                self.tool.label(),
                std::io::Error::last_os_error()
            );
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait()? {
                break status;
            }
            ensure!(
                Instant::now() < deadline,
                "{} did not stop within {STOP_TIMEOUT:?} of signal {signal}",
                self.tool.label()
            );
            thread::sleep(POLL);
        };
        ensure!(
            status.success(),
            "{} failed when stopped ({status}): {}",
            self.tool.label(),
            self.stderr_summary()
        );
        Ok(())
    }

    /// The first and last lines of the tool's error output, and where the rest is.
    fn stderr_summary(&self) -> String {
        let text = fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| !line.trim().is_empty())
            .collect();
        let gist = match lines[..] {
            [] => "no error output".to_owned(),
            [only] => only.to_owned(),
            [first, .., last] => format!("{first} … {last}"),
        };
        format!("{gist} (full output: {})", self.stderr.display())
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if let Err(error) = self.child.kill() {
                eprintln!(
                    "[bench] WARNING: cannot kill {} (pid {}): {error}",
                    self.tool.label(),
                    self.child.id()
                );
            }
            // Reaps it; kill either worked or the process is gone.
            self.child.wait().ok();
        }
    }
}

fn attachments_of(pid: u32) -> Result<Vec<Attachment>> {
    Ok(attachments()?
        .into_iter()
        .filter(|attachment| attachment.pid == pid)
        .collect())
}

fn bpftrace(script: &str) -> Command {
    let mut command = Command::new("bpftrace");
    command.arg("-e").arg(script);
    command
}

fn output_path(tool: Tool, setup: &RunSetup, stream: &str) -> PathBuf {
    setup.out_dir.join(format!("{}.{stream}", tool.file_stem()))
}

fn create(path: &Path) -> Result<File> {
    File::create(path).with_context(|| format!("cannot create {}", path.display()))
}

pub(super) fn free_loopback_address() -> Result<SocketAddr> {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .context("cannot find a free loopback port for Sentinel's /metrics")
}

/// Sentinel's counters for the bench cgroup, read from /metrics.
fn sentinel_seen(address: SocketAddr) -> Result<Seen> {
    let metrics = scrape(address)?;
    let counter = |name: &str| {
        let series = format!("{name}{{service=\"{SERVICE}\"}}");
        // A service with no events yet has no series.
        sample(&metrics, &series).unwrap_or(0)
    };
    let lost = metrics
        .lines()
        .filter(|line| line.starts_with("sentinel_events_lost_total{"))
        .map(|line| {
            line.rsplit_once(' ')
                .and_then(|(_, value)| value.parse::<u64>().ok())
                .with_context(|| format!("unreadable sample in /metrics: {line}"))
        })
        .sum::<Result<u64>>()?;
    Ok(Seen {
        execs: Some(counter("sentinel_exec_total")),
        connects: Some(counter("sentinel_tcp_connects_total")),
        lost: Some(lost),
        violations: Some(counter("sentinel_exec_violations_total")),
    })
}

/// The loops' events in a peer's output, read after it stopped.
fn peer_seen(tool: Tool, setup: &RunSetup) -> Result<Seen> {
    let path = output_path(tool, setup, "stdout");
    let output =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let own_comm = setup.own_comm.as_str();
    let map_value = |key: String| {
        output
            .lines()
            .find_map(|line| line.strip_prefix(&key)?.trim().parse().ok())
            .unwrap_or(0)
    };
    let lines_starting = |words: &[&str]| {
        let count = output
            .lines()
            .filter(|line| {
                line.split_whitespace()
                    .take(words.len())
                    .eq(words.iter().copied())
            })
            .count();
        u64::try_from(count).expect("a line count fits in u64")
    };
    let (execs, connects) = match tool {
        Tool::Sentinel | Tool::SentinelContained => {
            bail!("Sentinel's counts come from its /metrics")
        }
        Tool::BpftraceCount => (
            map_value(format!("@exec[{NOP_PROGRAM}]:")),
            Some(map_value(format!("@connect[{own_comm}]:"))),
        ),
        Tool::BpftracePrintf => (
            lines_starting(&["exec", NOP_PROGRAM]),
            Some(lines_starting(&["connect", own_comm])),
        ),
        // A line per exec, starting with the command name; it does not watch connects.
        Tool::Execsnoop => (lines_starting(&[NOP_PROGRAM]), None),
    };
    Ok(Seen {
        execs: Some(execs),
        connects,
        lost: None,
        violations: None,
    })
}

pub(super) fn scrape(address: SocketAddr) -> Result<String> {
    sentinel_tests::http_get(address, "/metrics", None)
        .with_context(|| format!("scraping http://{address}/metrics failed"))
}

/// The value of one series in Prometheus text, e.g. `name{label="value"}`.
pub(super) fn sample<T: FromStr>(metrics: &str, series: &str) -> Option<T> {
    metrics.lines().find_map(|line| {
        line.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}
