//! The policy benchmark, run as root where cgroup v2 has the memory, cpu and pids controllers
//! (`cargo xtask bench --only policy` runs it in the VM): 500 cgroups, one policy each.
//! Measures the time the daemon takes to apply them from its start and to reload them after
//! every `memory.max` changed, and the latency of `/metrics` scrapes with 500 services.
//!
//! Prints its results as `BENCH key=value` lines on stdout.

use std::{
    fmt::Write as _,
    fs,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use sentinel_tests::{
    Daemon, NO_FIREWALL, TestCgroup, cgroup2_mount, eventually, free_port, http_get,
};

const SERVICES: usize = 500;
const SCRAPES: usize = 200;
const MEMORY_MAX_AT_START: u64 = 256 << 20;
const MEMORY_MAX_AFTER_RELOAD: u64 = 192 << 20;
/// Under software emulation the daemon's start (loading the eBPF programs) takes seconds.
const PATIENCE: Duration = Duration::from_secs(120);

fn main() -> Result<()> {
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
    let cgroups: Vec<TestCgroup> = (0..SERVICES)
        .map(|index| TestCgroup::new(&format!("bench-svc-{index:03}")))
        .collect();

    let started = Instant::now();
    let mut daemon =
        Daemon::spawn_with_config(free_port(), &config(&cgroups, MEMORY_MAX_AT_START), &[]);
    let apply_observed = wait_for_memory_max(&cgroups, MEMORY_MAX_AT_START, started)?;
    let applied = log_record(&daemon, "policies applied")?;

    let reload_started = Instant::now();
    fs::write(
        daemon.config_path(),
        config(&cgroups, MEMORY_MAX_AFTER_RELOAD),
    )
    .context("cannot rewrite the daemon's configuration")?;
    daemon.signal(libc::SIGHUP);
    let reload_observed = wait_for_memory_max(&cgroups, MEMORY_MAX_AFTER_RELOAD, reload_started)?;
    let reloaded = log_record(&daemon, "policy reloaded")?;

    ensure!(
        eventually(PATIENCE, || http_get(daemon.addr, "/metrics", None).is_ok()),
        "the daemon does not serve /metrics; its log:\n{}",
        daemon.log()
    );
    let mut latencies = Vec::with_capacity(SCRAPES);
    let mut scrape_bytes = 0;
    for _ in 0..SCRAPES {
        let sent = Instant::now();
        let body = http_get(daemon.addr, "/metrics", None).context("GET /metrics failed")?;
        latencies.push(sent.elapsed());
        scrape_bytes = body.len();
    }
    latencies.sort();

    daemon.signal(libc::SIGTERM);
    ensure!(
        daemon.wait_exit(Duration::from_secs(30)).is_some(),
        "the daemon did not stop within 30 s of SIGTERM"
    );

    let results = [
        ("cpu_model", cpu_model),
        (
            "controllers",
            controllers.split_whitespace().collect::<Vec<_>>().join(","),
        ),
        ("cgroups", SERVICES.to_string()),
        ("applied_cgroups", field(&applied, "cgroups")?.to_string()),
        ("apply_log_ms", field(&applied, "took_ms")?.to_string()),
        ("apply_observed_ms", milliseconds(apply_observed)),
        ("reload_log_ms", field(&reloaded, "took_ms")?.to_string()),
        ("reload_observed_ms", milliseconds(reload_observed)),
        ("scrapes", SCRAPES.to_string()),
        ("scrape_median_ms", milliseconds(latencies[SCRAPES / 2])),
        ("scrape_p99_ms", milliseconds(latencies[SCRAPES * 99 / 100])),
        ("scrape_bytes", scrape_bytes.to_string()),
    ];
    for (key, value) in results {
        println!("BENCH {key}={value}");
    }
    Ok(())
}

/// One policy per cgroup, each naming its cgroup.
fn config(cgroups: &[TestCgroup], memory_max: u64) -> String {
    let mut config = format!("{NO_FIREWALL}policies:\n");
    for cgroup in cgroups {
        let service = cgroup.service();
        write!(
            config,
            "  - name: {service}\n    cgroup: {service}\n    memory.max: {memory_max}\n    \
             memory.high: 128M\n    cpu.max: 50%\n    pids.max: 100\n"
        )
        .expect("writing to a String cannot fail");
    }
    config
}

/// Time from `since` until every cgroup's memory.max reads `value`. A cgroup that shows it
/// keeps it, so each is polled until it does, in turn.
fn wait_for_memory_max(cgroups: &[TestCgroup], value: u64, since: Instant) -> Result<Duration> {
    let wanted = value.to_string();
    for cgroup in cgroups {
        let memory_max = cgroup.path().join("memory.max");
        loop {
            let current = fs::read_to_string(&memory_max)
                .with_context(|| format!("cannot read {}", memory_max.display()))?;
            if current.trim() == wanted {
                break;
            }
            ensure!(
                since.elapsed() < PATIENCE,
                "{} still reads {} instead of {wanted} after {} s",
                memory_max.display(),
                current.trim(),
                PATIENCE.as_secs()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    Ok(since.elapsed())
}

/// The daemon's first JSON log record with this message, once it is written.
fn log_record(daemon: &Daemon, message: &str) -> Result<serde_json::Value> {
    let mut record = None;
    eventually(Duration::from_secs(10), || {
        record = daemon
            .log_records(&[("message", message)])
            .into_iter()
            .next();
        record.is_some()
    });
    record.with_context(|| format!("no {message:?} record in the daemon's log"))
}

fn field(record: &serde_json::Value, name: &str) -> Result<u64> {
    record[name]
        .as_u64()
        .with_context(|| format!("log record without a numeric {name:?}: {record}"))
}

fn milliseconds(duration: Duration) -> String {
    format!("{:.2}", duration.as_secs_f64() * 1000.0)
}
