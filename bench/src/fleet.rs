//! The fleet section: the same stream of CrowdSec decisions applied by Sentinel and by CrowdSec's
//! own `crowdsec-firewall-bouncer` (Debian's package), with 10 and with 10,000 decisions per
//! round. A real Local API (Debian's crowdsec, as the fleet suite runs it) and each consumer run
//! in a network namespace of their own, the LAPI on its loopback, so the bouncer's tables never
//! touch the host's ruleset; each consumer has its own bouncer key and the same pull interval.
//! Measured per round: from `cscli decisions import` returning (the decisions are in LAPI) to
//! every element being in the consumer's nftables set (`nft -j list set`, polled), and the
//! consumer's CPU time over that span; per run, its peak RSS. The floor: `nft -f` of a file
//! adding the same elements to a set like Sentinel's. Decisions that never reach a set (the
//! stream skips a batch committed across a pull) are reported per round, and the last element
//! that arrived is timed; when none is missing, Sentinel's set must hold exactly the decisions
//! imported.
//!
//! Under `target/bench/fleet/`: each run's configuration, key, decision files and output.

use std::{
    fs::{self, File},
    net::Ipv4Addr,
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sentinel_tests::{
    eventually,
    lapi::Lapi,
    netlab::{Netns, SetElement},
};
use serde_json::{Value, json};

use crate::{
    interrupt,
    report::{mebibytes, median},
    summary::Summary,
    system::{ProcessUsage, process_usage},
};

/// Decisions per round, one run of each consumer per size.
const SIZES: [usize; 2] = [10, 10_000];
/// Rounds per run, each importing `size` new decisions: the pull interval puts up to a second
/// of chance into each one.
const ROUNDS: usize = 3;
/// Both consumers' pull interval (Sentinel's `crowdsec.pull_interval`, the bouncer's
/// `update_frequency`).
const PULL_INTERVAL: &str = "1s";
/// Far beyond a pull and applying 10,000 elements, even on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(180);
/// A set that has not grown for this long after a round's import holds all it will get.
const SETTLED: Duration = Duration::from_secs(10);
/// How often the consumer's set is listed while waiting.
const POLL: Duration = Duration::from_millis(50);
/// A decision in LAPI before the consumer starts: once it is in the set, the consumer has made
/// its first pull and what follows measures the stream.
const READY: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// The decisions' addresses: every other address from here, so that no two are adjacent.
const FIRST_ADDRESS: Ipv4Addr = Ipv4Addr::new(100, 64, 0, 2);

/// Where the fleet's peers were unpacked.
pub struct FleetTools {
    /// Debian's crowdsec package (for `crowdsec` and `cscli`).
    pub crowdsec: PathBuf,
    /// The `crowdsec-firewall-bouncer` binary of Debian's package.
    pub firewall_bouncer: PathBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Consumer {
    Sentinel,
    Bouncer,
}

impl Consumer {
    fn label(self) -> &'static str {
        match self {
            Self::Sentinel => "Sentinel",
            Self::Bouncer => "crowdsec-firewall-bouncer",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Sentinel => "sentinel",
            Self::Bouncer => "bouncer",
        }
    }

    /// The IPv4 set it bans from: `family table set`.
    fn set(self) -> [&'static str; 3] {
        match self {
            Self::Sentinel => ["inet", "sentinel", "banned_v4"],
            Self::Bouncer => ["ip", "crowdsec", "crowdsec-blacklists"],
        }
    }
}

/// One run's figures: a consumer, one size.
struct RunFigures {
    /// Per round: import returned to every element in the set, in seconds.
    latencies: Vec<f64>,
    /// Per round: the consumer's CPU time over that span, in seconds.
    cpu: Vec<f64>,
    /// How long each round's `cscli decisions import` took, in seconds.
    imports: Vec<f64>,
    /// Per round: decisions imported that never reached the set.
    missing: Vec<usize>,
    peak_rss_kib: u64,
}

impl RunFigures {
    fn json(&self) -> Value {
        json!({
            "latency_s": self.latencies,
            "cpu_s": self.cpu,
            "import_s": self.imports,
            "missing": self.missing,
            "peak_rss_mib": mebibytes(self.peak_rss_kib),
        })
    }
}

/// The floor for one size: `nft -f` adding the elements.
struct FloorFigures {
    wall: Vec<f64>,
    cpu: Vec<f64>,
}

pub fn bench(
    daemon: &Path,
    tools: &FleetTools,
    out_dir: &Path,
    summary: &mut Summary,
) -> Result<()> {
    crate::step("bench: CrowdSec decisions applied by Sentinel and crowdsec-firewall-bouncer");
    let dir = out_dir.join("fleet");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "[bench] fleet: {ROUNDS} rounds of {SIZES:?} decisions per consumer, pull interval \
         {PULL_INTERVAL} for both"
    );
    let mut raw = serde_json::Map::new();
    for size in SIZES {
        let section = format!("fleet, {size} decisions");
        let sentinel = run(Consumer::Sentinel, size, daemon, tools, &dir)?;
        let bouncer = run(Consumer::Bouncer, size, daemon, tools, &dir)?;
        let floor = floor(size, &dir)?;
        let (latency, cpu) = (median(&sentinel.latencies), median(&sentinel.cpu));
        let (bouncer_latency, bouncer_cpu) = (median(&bouncer.latencies), median(&bouncer.cpu));
        let (floor_wall, floor_cpu) = (median(&floor.wall), median(&floor.cpu));
        println!(
            "[bench] {size} decisions, medians of {ROUNDS} rounds: import to kernel: Sentinel \
             {latency:.3} s, bouncer {bouncer_latency:.3} s, nft -f {floor_wall:.3} s; CPU: \
             Sentinel {:.1} ms, bouncer {:.1} ms, nft -f {:.1} ms; peak RSS: Sentinel {:.1} MiB, \
             bouncer {:.1} MiB",
            cpu * 1e3,
            bouncer_cpu * 1e3,
            floor_cpu * 1e3,
            mebibytes(sentinel.peak_rss_kib),
            mebibytes(bouncer.peak_rss_kib),
        );
        let measure = format!("decisions to kernel (pull {PULL_INTERVAL})");
        summary.compare(&section, &measure, "s", latency, "nft -f", floor_wall);
        summary.compare(
            &section,
            &measure,
            "s",
            latency,
            Consumer::Bouncer.label(),
            bouncer_latency,
        );
        summary.compare(&section, "CPU", "ms", cpu * 1e3, "nft -f", floor_cpu * 1e3);
        summary.compare(
            &section,
            "CPU",
            "ms",
            cpu * 1e3,
            Consumer::Bouncer.label(),
            bouncer_cpu * 1e3,
        );
        summary.compare(
            &section,
            "peak RSS",
            "MiB",
            mebibytes(sentinel.peak_rss_kib),
            Consumer::Bouncer.label(),
            mebibytes(bouncer.peak_rss_kib),
        );
        raw.insert(
            size.to_string(),
            json!({
                "sentinel": sentinel.json(),
                "bouncer": bouncer.json(),
                "floor_nft_f": {"wall_s": floor.wall, "cpu_s": floor.cpu},
            }),
        );
    }
    summary.record(
        "fleet",
        json!({
            "pull_interval": PULL_INTERVAL,
            "rounds": ROUNDS,
            "bouncer_version": "crowdsec-firewall-bouncer 0.0.25-4~deb12u1",
            "sizes": raw,
        }),
    );
    Ok(())
}

/// One consumer against a fresh LAPI, in a fresh namespace: `ROUNDS` imports of `size` new
/// decisions each.
fn run(
    consumer: Consumer,
    size: usize,
    daemon: &Path,
    tools: &FleetTools,
    dir: &Path,
) -> Result<RunFigures> {
    let dir = dir.join(format!("{}-{size}", consumer.name()));
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let netns = Netns::new("bench-fleet");
    let lapi = Lapi::start_in(&tools.crowdsec, &netns);
    lapi.add_operator();
    let key = lapi.add_bouncer(&format!("bench-{}", consumer.name()));
    lapi.ban("--ip", &READY.to_string());
    let process = match consumer {
        Consumer::Sentinel => start_sentinel(daemon, &netns, &lapi, &key, &dir)?,
        Consumer::Bouncer => start_bouncer(&tools.firewall_bouncer, &netns, &lapi, &key, &dir)?,
    };
    let mut running = Running {
        child: process,
        output: dir.join("output.log"),
    };
    let (mut held, _) = running.await_elements(consumer, &netns, 0, 1)?;

    let mut figures = RunFigures {
        latencies: Vec::new(),
        cpu: Vec::new(),
        imports: Vec::new(),
        missing: Vec::new(),
        peak_rss_kib: 0,
    };
    for round in 0..ROUNDS {
        interrupt::check()?;
        let file = dir.join(format!("decisions-{round}.json"));
        write_decisions(&file, addresses(round * size, size))?;
        let before = running.cpu_seconds()?;
        let started = Instant::now();
        lapi.cscli(&["decisions", "import", "-i", &file.display().to_string()]);
        let imported = Instant::now();
        let expected = held + size;
        let (now_held, applied) = running.await_elements(consumer, &netns, held, expected)?;
        let after = running.cpu_seconds()?;
        let latency = applied.saturating_duration_since(imported).as_secs_f64();
        let missing = expected - now_held.min(expected);
        println!(
            "[bench]   {} round {}/{ROUNDS}: {size} decisions imported in {:.2} s, {} in the \
             kernel {latency:.3} s later, {:.1} ms CPU{}",
            consumer.label(),
            round + 1,
            imported.duration_since(started).as_secs_f64(),
            now_held - held,
            (after - before) * 1e3,
            if missing > 0 {
                format!(
                    "; {missing} NEVER ARRIVED (nothing more for {} s)",
                    SETTLED.as_secs()
                )
            } else {
                String::new()
            }
        );
        held = now_held;
        figures.missing.push(missing);
        figures.latencies.push(latency);
        figures.cpu.push(after - before);
        figures
            .imports
            .push(imported.duration_since(started).as_secs_f64());
    }
    figures.peak_rss_kib = running.usage()?.hwm_kib;
    if consumer == Consumer::Sentinel && figures.missing.iter().all(|&missing| missing == 0) {
        check_sentinel_set(&netns, size)?;
    }
    Ok(figures)
}

/// A consumer's process, killed and reaped on drop (before its namespace goes).
struct Running {
    child: Child,
    output: PathBuf,
}

impl Running {
    fn usage(&self) -> Result<ProcessUsage> {
        process_usage(self.child.id())
    }

    /// CPU time of the process's threads, to the nanosecond (`usage` counts clock ticks, as
    /// long as applying ten decisions takes).
    fn cpu_seconds(&self) -> Result<f64> {
        let tasks = format!("/proc/{}/task", self.child.id());
        let mut nanoseconds = 0u64;
        for task in fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
            let path = task?.path().join("schedstat");
            // A thread that ended meanwhile has no more to say.
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            nanoseconds += text
                .split_whitespace()
                .next()
                .and_then(|field| field.parse::<u64>().ok())
                .with_context(|| format!("cannot parse {}: {text}", path.display()))?;
        }
        Ok(nanoseconds as f64 / 1e9)
    }

    /// Waits until the consumer's set holds `expected` elements, or has held the same number
    /// (more than `from`) for `SETTLED`; returns how many it holds and when the last arrived.
    fn await_elements(
        &mut self,
        consumer: Consumer,
        netns: &Netns,
        from: usize,
        expected: usize,
    ) -> Result<(usize, Instant)> {
        let [family, table, set] = consumer.set();
        let has_table = |netns: &Netns| {
            netns
                .nft(&["list", "tables"], "")
                .lines()
                .any(|line| line.trim() == format!("table {family} {table}"))
        };
        let mut held = from;
        let mut last_change = Instant::now();
        let mut exited = None;
        let reached = eventually(PATIENCE, || {
            if let Ok(Some(status)) = self.child.try_wait() {
                exited = Some(status);
                return true;
            }
            let now = if has_table(netns) {
                netns.set_elements(family, table, set).len()
            } else {
                0
            };
            if now != held {
                held = now;
                last_change = Instant::now();
            }
            std::thread::sleep(POLL);
            held >= expected || (held > from && last_change.elapsed() > SETTLED)
        });
        if let Some(status) = exited {
            bail!(
                "{} exited ({status}); its output is {}",
                consumer.label(),
                self.output.display()
            );
        }
        ensure!(
            reached,
            "{} held {held} of {expected} elements after {} s; its output is {}",
            consumer.label(),
            PATIENCE.as_secs(),
            self.output.display()
        );
        Ok((held, last_change))
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        if !eventually(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        }) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn start_sentinel(
    daemon: &Path,
    netns: &Netns,
    lapi: &Lapi,
    key: &str,
    dir: &Path,
) -> Result<Child> {
    let key_file = dir.join("bouncer.key");
    write_private(&key_file, key)?;
    let config = dir.join("sentinel.yaml");
    fs::write(
        &config,
        format!(
            "ssh_guard:
  enabled: true
  mode: enforce
  flush_on_exit: true
  netns: {}
crowdsec:
  lapi_url: {}
  bouncer_key_file: {}
  pull_interval: {PULL_INTERVAL}
",
            netns.path().display(),
            lapi.url(),
            key_file.display()
        ),
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let mut command = in_netns(netns, daemon);
    command
        .args(["run", "--log-format", "json", "--config"])
        .arg(&config)
        .args(["--metrics-addr", "127.0.0.1:9464", "--control-socket"])
        .arg(dir.join("sentinel.sock"))
        .arg("--state-dir")
        .arg(dir.join("state"));
    spawn(command, dir, "Sentinel")
}

fn start_bouncer(
    bouncer: &Path,
    netns: &Netns,
    lapi: &Lapi,
    key: &str,
    dir: &Path,
) -> Result<Child> {
    let config = dir.join("crowdsec-firewall-bouncer.yaml");
    // The package's configuration, with the LAPI, the key and the interval filled in, in the
    // foreground, logging to its output.
    let text = format!(
        "mode: nftables
pid_dir: {dir}
update_frequency: {PULL_INTERVAL}
daemonize: false
log_mode: stdout
log_level: info
api_url: {url}/
api_key: {key}
insecure_skip_verify: false
disable_ipv6: false
deny_action: DROP
deny_log: false
supported_decisions_types:
  - ban
blacklists_ipv4: crowdsec-blacklists
blacklists_ipv6: crowdsec6-blacklists
nftables:
  ipv4:
    enabled: true
    set-only: false
    table: crowdsec
    chain: crowdsec-chain
  ipv6:
    enabled: true
    set-only: false
    table: crowdsec6
    chain: crowdsec6-chain
prometheus:
  enabled: false
  listen_addr: 127.0.0.1
  listen_port: 60601
",
        dir = dir.display(),
        url = lapi.url(),
    );
    write_private(&config, &text)?;
    let mut command = in_netns(netns, bouncer);
    command.arg("-c").arg(&config);
    spawn(command, dir, "crowdsec-firewall-bouncer")
}

/// `program` run in `netns` (nsenter execs it: the child is the program itself).
fn in_netns(netns: &Netns, program: &Path) -> Command {
    let mut command = Command::new("nsenter");
    command
        .arg(format!("--net={}", netns.path().display()))
        .arg(program);
    command
}

fn spawn(mut command: Command, dir: &Path, what: &str) -> Result<Child> {
    let output = dir.join("output.log");
    let log =
        File::create(&output).with_context(|| format!("cannot create {}", output.display()))?;
    command
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| format!("cannot start {what}"))
}

/// A credential or a configuration holding one: root-only.
fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, format!("{}\n", text.trim_end()))
        .with_context(|| format!("cannot write {}", path.display()))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot chmod {}", path.display()))
}

/// `count` addresses from the `first`-th on, none adjacent to another.
fn addresses(first: usize, count: usize) -> impl Iterator<Item = Ipv4Addr> {
    let base = u32::from(FIRST_ADDRESS);
    (first..first + count).map(move |index| Ipv4Addr::from(base + 2 * index as u32))
}

/// Bans of an hour, in `cscli decisions import`'s JSON.
fn write_decisions(path: &Path, addresses: impl Iterator<Item = Ipv4Addr>) -> Result<()> {
    let decisions: Vec<Value> = addresses
        .map(|address| {
            json!({"duration": "1h", "scope": "ip", "type": "ban", "value": address.to_string()})
        })
        .collect();
    fs::write(path, Value::Array(decisions).to_string())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Sentinel's set holds exactly the decisions imported, and the one it started with.
fn check_sentinel_set(netns: &Netns, size: usize) -> Result<()> {
    let mut held: Vec<String> = netns
        .sentinel_set("banned_v4")
        .into_iter()
        .map(|element: SetElement| element.net)
        .collect();
    held.sort();
    let mut expected: Vec<String> = addresses(0, ROUNDS * size)
        .chain([READY])
        .map(|address| address.to_string())
        .collect();
    expected.sort();
    ensure!(
        held == expected,
        "Sentinel's set differs from the {} decisions imported: {} elements",
        expected.len(),
        held.len()
    );
    Ok(())
}

/// `nft -f` adding `size` elements to a set like Sentinel's, in a namespace of its own; each
/// round's file holds the next `size` addresses.
fn floor(size: usize, dir: &Path) -> Result<FloorFigures> {
    let netns = Netns::new("bench-fleet-floor");
    netns.nft(
        &["-f", "-"],
        "add table inet floor\nadd set inet floor banned_v4 { type ipv4_addr; flags interval, \
         timeout; }\n",
    );
    let mut figures = FloorFigures {
        wall: Vec::new(),
        cpu: Vec::new(),
    };
    for round in 0..ROUNDS {
        let elements: Vec<String> = addresses(round * size, size)
            .map(|address| format!("{address} timeout 3600s"))
            .collect();
        let file = dir.join(format!("floor-{size}-{round}.nft"));
        fs::write(
            &file,
            format!(
                "add element inet floor banned_v4 {{ {} }}\n",
                elements.join(", ")
            ),
        )
        .with_context(|| format!("cannot write {}", file.display()))?;
        let before = children_cpu_seconds();
        let started = Instant::now();
        let status = netns
            .command("nft")
            .arg("-f")
            .arg(&file)
            .status()
            .context("cannot run nft")?;
        let wall = started.elapsed().as_secs_f64();
        ensure!(status.success(), "nft -f {}: {status}", file.display());
        figures.wall.push(wall);
        figures.cpu.push(children_cpu_seconds() - before);
    }
    let held = netns.set_elements("inet", "floor", "banned_v4").len();
    ensure!(
        held == ROUNDS * size,
        "the floor's set holds {held} elements, not {}",
        ROUNDS * size
    );
    Ok(figures)
}

/// User plus system time of this process's waited-for children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let seconds = |time: libc::timeval| time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
    seconds(usage.ru_utime) + seconds(usage.ru_stime)
}
