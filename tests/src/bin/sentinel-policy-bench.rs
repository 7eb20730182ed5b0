//! The policy benchmark, run as root where cgroup v2 has the memory, cpu and pids controllers
//! (`cargo xtask bench` runs it in the VM): N cgroups (the first argument, 500 by default),
//! one policy per 100 of them, each at the top of the hierarchy (`top-level`, the second
//! argument's default) or all in one slice (`slice`). Measures the time the daemon takes to
//! apply them from its start and to reload them after every `memory.max` changed, `/metrics`
//! scrapes, and the daemon's memory and CPU; then the floor of each, with the daemon stopped:
//! the same cgroupfs writes done directly (apply, reload), the rest of what the daemon must do
//! at apply (find the cgroups, read their originals, watch them), one read of the files the
//! daemon's stats pass reads, and the scraped body encoded from memory.
//!
//! Apply, reload and their floors are measured in [`ROUNDS`] alternating rounds, and each is
//! reported as its median: under emulation the same writes take up to twice as long from one
//! minute to the next, and one round of each would compare the daemon and its floor at
//! different moments.
//!
//! Prints its results as `BENCH key=value` lines on stdout.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    io::{Read, Write},
    os::{
        fd::{AsRawFd, FromRawFd},
        unix::{
            ffi::OsStrExt,
            fs::{FileExt, MetadataExt},
        },
    },
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use sentinel_tests::{
    Daemon, NO_FIREWALL, TestCgroup, cgroup2_mount, eventually,
    floor::encode_from_memory,
    free_port, http_get, http_get_into,
    measure::{percentile_ms, process_usage, thread_cpu},
};

const DEFAULT_SERVICES: usize = 500;
/// Cgroups each policy selects, by a glob on their names.
const SERVICES_PER_POLICY: usize = 100;
const SCRAPES: usize = 200;
/// Rounds of the daemon's apply and reload, each followed by their floors.
const ROUNDS: usize = 3;
const MEMORY_MAX_AT_START: u64 = 256 << 20;
const MEMORY_MAX_AFTER_RELOAD: u64 = 192 << 20;
/// The limits every policy sets, as the daemon writes them to the cgroup files.
const LIMITS: [(&str, &str); 3] = [
    ("memory.high", "134217728"),
    ("cpu.max", "50000 100000"),
    ("pids.max", "100"),
];
/// The files the daemon's stats pass reads per service (`resource_detail: basic`).
/// What a new cgroup's limit files hold, written back before each of the daemon's rounds.
const DEFAULTS: [(&str, &str); 4] = [
    ("memory.max", "max"),
    ("memory.high", "max"),
    ("cpu.max", "max 100000"),
    ("pids.max", "max"),
];
const STATS_FILES: [&str; 4] = ["memory.current", "memory.max", "cpu.stat", "pids.current"];
/// `metrics.resource_refresh` (its default): the idle daemon reads every service's stats files
/// this often.
const RESOURCE_REFRESH_SECONDS: u64 = 10;
/// How long the daemon's idle CPU is measured: six stats passes, so that where the window
/// falls between two passes moves the figure by a sixth at most.
const IDLE_WINDOW: Duration = Duration::from_secs(6 * RESOURCE_REFRESH_SECONDS);
/// Under software emulation the daemon's start (loading the eBPF programs) takes seconds, and
/// thousands of cgroups take minutes.
const PATIENCE: Duration = Duration::from_secs(600);
/// Past this, the daemon is taken to hang: what each of its threads waits on is printed, and
/// the bench fails (a stuck scrape would otherwise wait out 200 read timeouts).
const HANG_GUARD: Duration = Duration::from_secs(1500);

fn main() -> Result<()> {
    let services = match std::env::args().nth(1) {
        Some(count) => count
            .parse()
            .with_context(|| format!("the number of services, {count:?}, is not a number"))?,
        None => DEFAULT_SERVICES,
    };
    let cpu_model = fs::read_to_string("/proc/cpuinfo")
        .context("cannot read /proc/cpuinfo")?
        .lines()
        .find_map(|line| line.strip_prefix("model name")?.split_once(':'))
        .map_or_else(
            || "unknown".to_owned(),
            |(_, model)| model.trim().to_owned(),
        );
    let controllers = fs::read_to_string(cgroup2_mount().join("cgroup.subtree_control"))
        .context("cannot read cgroup.subtree_control at the cgroup2 root")?;
    let slice = match std::env::args().nth(2).as_deref() {
        None | Some("top-level") => None,
        Some("slice") => Some(TestCgroup::new("bench-slice")),
        Some(other) => anyhow::bail!("the layout {other:?} is neither top-level nor slice"),
    };
    let cgroups: Vec<TestCgroup> = (0..services)
        .map(|index| {
            let name = format!("bench-{:03}-{index:05}", index / SERVICES_PER_POLICY);
            match &slice {
                Some(slice) => slice.child(&name),
                None => TestCgroup::new(&name),
            }
        })
        .collect();

    let mut rounds = Rounds::default();
    let (daemon, reload_cpu) = rounds.daemon(&cgroups, slice.as_ref())?;
    ensure!(
        eventually(PATIENCE, || http_get(daemon.addr, "/metrics", None).is_ok()),
        "the daemon does not serve /metrics; its log:\n{}",
        daemon.log()
    );
    let idle_start = process_usage(daemon.pid())?.cpu_seconds;
    let threads_before = thread_cpu(daemon.pid())?;
    std::thread::sleep(IDLE_WINDOW);
    let threads_after = thread_cpu(daemon.pid())?;
    let idle_end = process_usage(daemon.pid())?.cpu_seconds;
    let mut latencies = Vec::with_capacity(SCRAPES);
    let mut response = Vec::new();
    let mut body_start = 0;
    for _ in 0..SCRAPES {
        let sent = Instant::now();
        body_start = http_get_into(daemon.addr, "/metrics", Some(OPENMETRICS), &mut response)
            .context("GET /metrics failed")?;
        latencies.push(sent.elapsed());
    }
    let body = String::from_utf8(response.split_off(body_start))
        .context("the /metrics body is not UTF-8")?;
    let usage = process_usage(daemon.pid())?;

    stop(daemon)?;
    rounds.floors(&cgroups)?;
    for _ in 1..ROUNDS {
        let (daemon, _) = rounds.daemon(&cgroups, slice.as_ref())?;
        stop(daemon)?;
        rounds.floors(&cgroups)?;
    }
    let stats_floor = timed(|| read_stats_files(&cgroups))?;
    let (encode_floor, _) = encode_from_memory(&body, SCRAPES);

    let results = [
        ("cpu_model", cpu_model),
        (
            "controllers",
            controllers.split_whitespace().collect::<Vec<_>>().join(","),
        ),
        ("cgroups", services.to_string()),
        (
            "layout",
            if slice.is_some() {
                "slice"
            } else {
                "top-level"
            }
            .to_owned(),
        ),
        (
            "policies",
            services.div_ceil(SERVICES_PER_POLICY).to_string(),
        ),
        ("applied_cgroups", rounds.applied_cgroups.to_string()),
        ("rounds", ROUNDS.to_string()),
        ("apply_log_ms", median(&rounds.apply)),
        ("apply_log_rounds_ms", listed(&rounds.apply)),
        ("apply_observed_ms", median(&rounds.apply_observed)),
        ("reload_log_ms", median(&rounds.reload)),
        ("reload_log_rounds_ms", listed(&rounds.reload)),
        ("reload_observed_ms", median(&rounds.reload_observed)),
        ("scrapes", SCRAPES.to_string()),
        ("scrape_median_ms", percentile(&latencies, 0.5)),
        ("scrape_p99_ms", percentile(&latencies, 0.99)),
        ("scrape_bytes", body.len().to_string()),
        ("rss_kib", usage.rss_kib.to_string()),
        ("peak_rss_kib", usage.hwm_kib.to_string()),
        (
            "idle_cpu_percent",
            format!(
                "{:.3}",
                (idle_end - idle_start) / IDLE_WINDOW.as_secs_f64() * 100.0
            ),
        ),
        (
            "idle_cpu_by_thread",
            by_thread(&threads_before, &threads_after, |seconds| {
                seconds / IDLE_WINDOW.as_secs_f64() * 100.0
            }),
        ),
        ("reload_cpu_ms_by_thread", reload_cpu),
        (
            "cpu_ms_per_scrape",
            format!(
                "{:.3}",
                (usage.cpu_seconds - idle_end) / SCRAPES as f64 * 1000.0
            ),
        ),
        ("floor_apply_ms", median(&rounds.floor_apply)),
        ("floor_apply_rounds_ms", listed(&rounds.floor_apply)),
        ("floor_apply_job_ms", median(&rounds.floor_apply_job)),
        ("floor_apply_job_rounds_ms", listed(&rounds.floor_apply_job)),
        ("floor_walk_ms", median(&rounds.floor_walk)),
        ("floor_walk_rounds_ms", listed(&rounds.floor_walk)),
        ("floor_watches_ms", median(&rounds.floor_watches)),
        ("floor_watches_rounds_ms", listed(&rounds.floor_watches)),
        ("floor_reload_ms", median(&rounds.floor_reload)),
        ("floor_reload_rounds_ms", listed(&rounds.floor_reload)),
        (
            "floor_reload_watched_ms",
            median(&rounds.floor_reload_watched),
        ),
        (
            "floor_reload_watched_rounds_ms",
            listed(&rounds.floor_reload_watched),
        ),
        ("floor_stats_pass_ms", milliseconds(stats_floor)),
        ("resource_refresh_s", RESOURCE_REFRESH_SECONDS.to_string()),
        ("floor_encode_median_ms", percentile(&encode_floor, 0.5)),
        ("floor_encode_p99_ms", percentile(&encode_floor, 0.99)),
    ];
    for (key, value) in results {
        println!("BENCH {key}={value}");
    }
    Ok(())
}

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";

/// One policy per `SERVICES_PER_POLICY` cgroups, each selecting them by a glob on their names
/// (in `slice`, when they are there).
fn config(services: usize, slice: Option<&TestCgroup>, memory_max: u64) -> String {
    let (parent, prefix) = match slice {
        Some(slice) => (format!("{}/", slice.service()), ""),
        None => (String::new(), "sentinel-test-"),
    };
    let mut config = format!(
        "{NO_FIREWALL}metrics:\n  resource_refresh: {RESOURCE_REFRESH_SECONDS}s\n\
         services:\n  max_labels: 10000\npolicies:\n"
    );
    for policy in 0..services.div_ceil(SERVICES_PER_POLICY) {
        write!(
            config,
            "  - name: bench-{policy:03}\n    cgroup: {parent}{prefix}bench-{policy:03}-*\n    \
             memory.max: {memory_max}\n    memory.high: 128M\n    cpu.max: 50%\n    \
             pids.max: 100\n"
        )
        .expect("writing to a String cannot fail");
    }
    config
}

/// After [`HANG_GUARD`], prints where each of the daemon's threads is (state, wait channel,
/// kernel stack) and the end of its log, and ends the bench with a failure.
fn watch_for_a_hang(pid: u32, log: std::path::PathBuf) {
    std::thread::spawn(move || {
        std::thread::sleep(HANG_GUARD);
        eprintln!(
            "the bench did not finish in {} s; the daemon's threads:",
            HANG_GUARD.as_secs()
        );
        let tasks = fs::read_dir(format!("/proc/{pid}/task"))
            .into_iter()
            .flatten();
        for task in tasks.flatten() {
            let read = |file: &str| fs::read_to_string(task.path().join(file)).unwrap_or_default();
            let stat = read("stat");
            let state = stat.rsplit_once(") ").map_or("?", |(_, rest)| &rest[..1]);
            eprintln!(
                "{} {} state {state} wchan {}\n{}",
                task.file_name().to_string_lossy(),
                read("comm").trim(),
                read("wchan"),
                read("stack")
            );
        }
        let log = fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(40).collect();
        eprintln!("the end of its log:");
        for line in tail.iter().rev() {
            eprintln!("{line}");
        }
        std::process::exit(1);
    });
}

/// Apply, reload and their floors, one figure per round, in milliseconds.
#[derive(Default)]
struct Rounds {
    applied_cgroups: u64,
    apply: Vec<f64>,
    apply_observed: Vec<f64>,
    reload: Vec<f64>,
    reload_observed: Vec<f64>,
    floor_apply: Vec<f64>,
    floor_apply_job: Vec<f64>,
    floor_walk: Vec<f64>,
    floor_watches: Vec<f64>,
    floor_reload: Vec<f64>,
    floor_reload_watched: Vec<f64>,
}

impl Rounds {
    /// Starts the daemon on cgroups at their defaults, with state of its own (so that it takes
    /// them as new), and reloads its policy once applied. Returns it running, with its CPU by
    /// thread during the reload.
    fn daemon(
        &mut self,
        cgroups: &[TestCgroup],
        slice: Option<&TestCgroup>,
    ) -> Result<(Daemon, String)> {
        for cgroup in cgroups {
            for (file, default) in DEFAULTS {
                let path = cgroup.path().join(file);
                // In a slice, the files come with the controllers the daemon enables.
                if path.exists() {
                    fs::write(&path, default)
                        .with_context(|| format!("cannot reset {}", path.display()))?;
                }
            }
        }
        let services = cgroups.len();
        let started = Instant::now();
        let daemon = Daemon::spawn_with_config(
            free_port(),
            &config(services, slice, MEMORY_MAX_AT_START),
            &[],
        );
        watch_for_a_hang(daemon.pid(), daemon.log_path());
        let (applied, apply_observed) = log_record(&daemon, "policies applied", started)?;
        check_memory_max(cgroups, MEMORY_MAX_AT_START)?;

        let threads_before_reload = thread_cpu(daemon.pid())?;
        let reload_started = Instant::now();
        fs::write(
            daemon.config_path(),
            config(services, slice, MEMORY_MAX_AFTER_RELOAD),
        )
        .context("cannot rewrite the daemon's configuration")?;
        daemon.signal(libc::SIGHUP);
        let (reloaded, reload_observed) = log_record(&daemon, "policy reloaded", reload_started)?;
        check_memory_max(cgroups, MEMORY_MAX_AFTER_RELOAD)?;
        let threads_after_reload = thread_cpu(daemon.pid())?;

        self.applied_cgroups = field(&applied, "cgroups")?;
        self.apply.push(field(&applied, "took_ms")? as f64);
        self.apply_observed
            .push(apply_observed.as_secs_f64() * 1000.0);
        self.reload.push(field(&reloaded, "took_ms")? as f64);
        self.reload_observed
            .push(reload_observed.as_secs_f64() * 1000.0);
        let reload_cpu = by_thread(&threads_before_reload, &threads_after_reload, |seconds| {
            seconds * 1000.0
        });
        Ok((daemon, reload_cpu))
    }

    /// The floors of apply and reload, on the same cgroups, with the daemon gone.
    fn floors(&mut self, cgroups: &[TestCgroup]) -> Result<()> {
        let apply = timed(|| write_limits(cgroups, MEMORY_MAX_AT_START, true))?;
        let apply_job = timed(|| swap_and_watch(cgroups, MEMORY_MAX_AT_START))?;
        let walk = timed(|| {
            let found = walk_hierarchy(&cgroup2_mount());
            ensure!(
                found >= cgroups.len(),
                "the walk found {found} cgroups, fewer than the {} made",
                cgroups.len()
            );
            Ok(())
        })?;
        let reload = timed(|| write_limits(cgroups, MEMORY_MAX_AFTER_RELOAD, false))?;
        let (watches, reload_watched) = write_watched(cgroups, MEMORY_MAX_AT_START)?;
        self.floor_apply.push(apply.as_secs_f64() * 1000.0);
        self.floor_apply_job.push(apply_job.as_secs_f64() * 1000.0);
        self.floor_walk.push(walk.as_secs_f64() * 1000.0);
        self.floor_watches.push(watches.as_secs_f64() * 1000.0);
        self.floor_reload.push(reload.as_secs_f64() * 1000.0);
        self.floor_reload_watched
            .push(reload_watched.as_secs_f64() * 1000.0);
        Ok(())
    }
}

fn stop(mut daemon: Daemon) -> Result<()> {
    daemon.signal(libc::SIGTERM);
    ensure!(
        daemon.wait_exit(Duration::from_secs(60)).is_some(),
        "the daemon did not stop within 60 s of SIGTERM"
    );
    Ok(())
}

fn median(figures: &[f64]) -> String {
    let mut sorted = figures.to_vec();
    sorted.sort_by(f64::total_cmp);
    format!("{:.2}", sorted[sorted.len() / 2])
}

fn listed(figures: &[f64]) -> String {
    figures
        .iter()
        .map(|figure| format!("{figure:.0}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// What the daemon writes to each cgroup, written directly: every limit at start, only
/// `memory.max` on reload. Each file is opened for writing only: no `O_CREAT` or `O_TRUNC`,
/// which cost the kernel a locked lookup and a truncation the file ignores.
fn write_limits(cgroups: &[TestCgroup], memory_max: u64, every_limit: bool) -> Result<()> {
    let memory_max = memory_max.to_string();
    for cgroup in cgroups {
        let write = |file: &str, value: &str| {
            let path = cgroup.path().join(file);
            fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|mut opened| opened.write_all(value.as_bytes()))
                .with_context(|| format!("cannot write {}", path.display()))
        };
        write("memory.max", &memory_max)?;
        if every_limit {
            for (file, value) in LIMITS {
                write(file, value)?;
            }
        }
    }
    Ok(())
}

/// The least an enforcer that can give limits back and see them changed must do at apply:
/// each limit file opened once, its original read and the limit written through the same
/// descriptor, and an inotify watch on each cgroup's directory.
fn swap_and_watch(cgroups: &[TestCgroup], memory_max: u64) -> Result<()> {
    let inotify = inotify()?;
    let memory_max = memory_max.to_string();
    let mut original = [0u8; 64];
    for cgroup in cgroups {
        for (file, value) in std::iter::once(("memory.max", memory_max.as_str())).chain(LIMITS) {
            let path = cgroup.path().join(file);
            fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .and_then(|mut opened| {
                    // Limit files are a few bytes: one read holds the whole original.
                    let read = opened.read(&mut original)?;
                    std::str::from_utf8(&original[..read]).map_err(std::io::Error::other)?;
                    opened.write_all_at(value.as_bytes(), 0)
                })
                .with_context(|| format!("cannot swap {}", path.display()))?;
        }
        watch(&inotify, cgroup)?;
    }
    Ok(())
}

/// How long an inotify watch on every cgroup takes to add, and then the reload's writes while
/// each cgroup is watched, as the daemon's are (the kernel queues a notice of each).
fn write_watched(cgroups: &[TestCgroup], memory_max: u64) -> Result<(Duration, Duration)> {
    let inotify = inotify()?;
    let watches = timed(|| {
        cgroups
            .iter()
            .try_for_each(|cgroup| watch(&inotify, cgroup))
    })?;
    Ok((watches, timed(|| write_limits(cgroups, memory_max, false))?))
}

/// How many cgroups are below `root`, found as the daemon finds them when it starts: each
/// directory listed, and each subdirectory's link count read to know whether it has children
/// to list (a cgroup directory's count is 2 plus its child cgroups). Not the daemon's own
/// walk, which also names each cgroup: the floor does only what any walk must.
fn walk_hierarchy(root: &std::path::Path) -> usize {
    let mut found = 0;
    let mut pending = vec![root.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            found += 1;
            if entry.metadata().is_ok_and(|meta| meta.nlink() > 2) {
                pending.push(entry.path());
            }
        }
    }
    found
}

fn inotify() -> Result<std::os::fd::OwnedFd> {
    // SAFETY: inotify_init1 takes flags only; the descriptor is owned below.
    let inotify = unsafe { libc::inotify_init1(libc::IN_CLOEXEC) };
    ensure!(
        inotify >= 0,
        "inotify_init1: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: the descriptor was just made and nothing else owns it.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(inotify) })
}

/// An inotify watch on the cgroup's directory for writes to its files, as the daemon's.
fn watch(inotify: &std::os::fd::OwnedFd, cgroup: &TestCgroup) -> Result<()> {
    let dir = std::ffi::CString::new(cgroup.path().as_os_str().as_bytes())
        .context("a cgroup path holds a NUL byte")?;
    // SAFETY: both arguments are valid for the call.
    let watch =
        unsafe { libc::inotify_add_watch(inotify.as_raw_fd(), dir.as_ptr(), libc::IN_MODIFY) };
    ensure!(
        watch >= 0,
        "inotify_add_watch: {}",
        std::io::Error::last_os_error()
    );
    Ok(())
}

/// One read of each file the daemon's stats pass reads.
fn read_stats_files(cgroups: &[TestCgroup]) -> Result<()> {
    let mut buffer = [0u8; 4096];
    for cgroup in cgroups {
        for file in STATS_FILES {
            let path = cgroup.path().join(file);
            fs::File::open(&path)
                .and_then(|mut opened| opened.read(&mut buffer))
                .with_context(|| format!("cannot read {}", path.display()))?;
        }
    }
    Ok(())
}

/// Each thread's CPU between two readings, busiest first, as `name:figure` pairs (`figure`
/// scales the seconds): where the time goes.
fn by_thread(
    before: &BTreeMap<String, f64>,
    after: &BTreeMap<String, f64>,
    figure: impl Fn(f64) -> f64,
) -> String {
    let mut shares: Vec<(&str, f64)> = after
        .iter()
        .map(|(name, seconds)| {
            let used = seconds - before.get(name).copied().unwrap_or(0.0);
            (name.as_str(), figure(used))
        })
        .filter(|(_, figure)| *figure > 0.0)
        .collect();
    shares.sort_by(|a, b| b.1.total_cmp(&a.1));
    shares
        .iter()
        .map(|(name, figure)| format!("{name}:{figure:.2}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn percentile(durations: &[Duration], fraction: f64) -> String {
    format!("{:.2}", percentile_ms(durations, fraction))
}

fn timed(work: impl FnOnce() -> Result<()>) -> Result<Duration> {
    let started = Instant::now();
    work()?;
    Ok(started.elapsed())
}

/// Every cgroup's `memory.max` reads `value` (in a slice, the file exists only once the daemon
/// has enabled the controller there).
fn check_memory_max(cgroups: &[TestCgroup], value: u64) -> Result<()> {
    let wanted = value.to_string();
    for cgroup in cgroups {
        let memory_max = cgroup.path().join("memory.max");
        let current = fs::read_to_string(&memory_max)
            .with_context(|| format!("cannot read {}", memory_max.display()))?;
        ensure!(
            current.trim() == wanted,
            "{} reads {} instead of {wanted} once the daemon logged its pass",
            memory_max.display(),
            current.trim()
        );
    }
    Ok(())
}

/// The daemon's first JSON log record with this message, and the time from `since` until it
/// was seen. The log is watched, not the cgroups: reading thousands of cgroup files while the
/// daemon writes them would slow the pass measured.
fn log_record(
    daemon: &Daemon,
    message: &str,
    since: Instant,
) -> Result<(serde_json::Value, Duration)> {
    let mut record = None;
    eventually(PATIENCE, || {
        record = daemon
            .log_records(&[("message", message)])
            .into_iter()
            .next();
        record.is_some()
    });
    let seen = since.elapsed();
    let record = record.with_context(|| {
        format!(
            "no {message:?} record in the daemon's log after {} s; its log:\n{}",
            PATIENCE.as_secs(),
            daemon.log()
        )
    })?;
    Ok((record, seen))
}

fn field(record: &serde_json::Value, name: &str) -> Result<u64> {
    record[name]
        .as_u64()
        .with_context(|| format!("log record without a numeric {name:?}: {record}"))
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}
