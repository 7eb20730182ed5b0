//! Scale on this host: 5,000 cgroups, one exec in each, so that the kernel keeps counters for
//! each and the daemon attributes them to 5,000 services. This host's cgroup2 hierarchy has no
//! controllers, so no policy applies here (the VM section measures that); what grows here is
//! the kernel counters' collection and the encoding. Measured: `/metrics` p50 and p99 over 200
//! sequential scrapes, the response's size, the daemon's memory and its CPU while idle and per
//! scrape. The floor: the same body encoded from memory, in this process, with the same
//! library.

use std::{
    fs::{self, File},
    io::Write,
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sentinel_tests::{
    cgroup2_mount, eventually, floor::encode_from_memory, free_port, http_get, http_get_into,
    measure::percentile_ms,
};
use serde_json::json;

use crate::{
    interrupt,
    summary::Summary,
    system::{ProcessUsage, process_usage},
};

const SECTION: &str = "5,000 attributed cgroups, this host";
const SERVICES: usize = 5_000;
const SCRAPES: usize = 200;
/// The parent of the bench's cgroups, below the cgroup2 root; also their `service` prefix.
const PARENT: &str = "sentinel-bench-scale";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0";
/// How long the daemon's idle CPU is measured, with every service attributed.
const IDLE_WINDOW: Duration = Duration::from_secs(30);
/// Far beyond the daemon's start and 5,000 execs being counted, even on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(120);
/// Targets from the issue, shown next to the floor.
const SCRAPE_P99_TARGET_MS: f64 = 25.0;
const RSS_TARGET_MIB: f64 = 30.0;

pub fn bench(daemon: &Path, out_dir: &Path, summary: &mut Summary) -> Result<()> {
    crate::step("bench: 5,000 attributed cgroups on this host");
    let dir = out_dir.join("scale");
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let config = dir.join("sentinel.yaml");
    fs::write(
        &config,
        "services:\n  max_labels: 10000\nssh_guard:\n  enabled: false\n",
    )
    .with_context(|| format!("cannot write {}", config.display()))?;
    let daemon = ScaleDaemon::start(daemon, &config, &dir)?;
    let cgroups = Cgroups::create(SERVICES)?;
    cgroups.exec_in_each()?;
    let mut body = String::new();
    let attributed = eventually(PATIENCE, || {
        body = daemon.scrape().unwrap_or_default();
        counted_services(&body) == SERVICES
    });
    ensure!(
        attributed,
        "the daemon counted an exec in {} of the {SERVICES} cgroups after {} s",
        counted_services(&body),
        PATIENCE.as_secs()
    );
    interrupt::check()?;

    println!("[bench] idle for {} s", IDLE_WINDOW.as_secs());
    let idle_start = daemon.usage()?;
    std::thread::sleep(IDLE_WINDOW);
    let idle_end = daemon.usage()?;
    let idle_percent =
        (idle_end.cpu_seconds - idle_start.cpu_seconds) / IDLE_WINDOW.as_secs_f64() * 100.0;

    let mut latencies = Vec::with_capacity(SCRAPES);
    let mut response = Vec::new();
    let mut body_start = 0;
    for _ in 0..SCRAPES {
        let sent = Instant::now();
        body_start = http_get_into(daemon.addr, "/metrics", Some(OPENMETRICS), &mut response)
            .context("GET /metrics failed")?;
        latencies.push(sent.elapsed());
    }
    body = String::from_utf8(response.split_off(body_start))
        .context("the /metrics body is not UTF-8")?;
    let scraped = daemon.usage()?;
    let cpu_per_scrape_ms = (scraped.cpu_seconds - idle_end.cpu_seconds) / SCRAPES as f64 * 1000.0;
    let (floor, floor_bytes) = encode_from_memory(&body, SCRAPES);
    drop(daemon);
    drop(cgroups);

    let (p50, p99) = (
        percentile_ms(&latencies, 0.5),
        percentile_ms(&latencies, 0.99),
    );
    let (floor_p50, floor_p99) = (percentile_ms(&floor, 0.5), percentile_ms(&floor, 0.99));
    let peak_mib = scraped.hwm_kib as f64 / 1024.0;
    println!(
        "[bench] /metrics with {SERVICES} services: p50 {p50:.2} ms, p99 {p99:.2} ms, {} bytes; \
         the same body from memory: p50 {floor_p50:.2} ms, p99 {floor_p99:.2} ms, {floor_bytes} \
         bytes; daemon RSS {:.1} MiB (peak {peak_mib:.1} MiB), idle CPU {idle_percent:.2} % of \
         a core, {cpu_per_scrape_ms:.2} ms CPU per scrape",
        body.len(),
        scraped.rss_kib as f64 / 1024.0,
    );
    summary.compare(
        SECTION,
        "/metrics p50",
        "ms",
        p50,
        "same body from memory",
        floor_p50,
    );
    summary.compare(
        SECTION,
        "/metrics p99",
        "ms",
        p99,
        "same body from memory",
        floor_p99,
    );
    summary.compare(
        SECTION,
        "/metrics p99",
        "ms",
        p99,
        "target",
        SCRAPE_P99_TARGET_MS,
    );
    summary.compare(
        SECTION,
        "daemon peak RSS",
        "MiB",
        peak_mib,
        "target",
        RSS_TARGET_MIB,
    );
    summary.record(
        "scale_host",
        json!({
            "services": SERVICES,
            "scrapes": SCRAPES,
            "scrape_p50_ms": p50,
            "scrape_p99_ms": p99,
            "response_bytes": body.len(),
            "floor_encode_p50_ms": floor_p50,
            "floor_encode_p99_ms": floor_p99,
            "floor_body_bytes": floor_bytes,
            "rss_mib": scraped.rss_kib as f64 / 1024.0,
            "peak_rss_mib": peak_mib,
            "idle_cpu_percent_of_a_core": idle_percent,
            "cpu_ms_per_scrape": cpu_per_scrape_ms,
        }),
    );
    Ok(())
}

/// Services whose `sentinel_exec_total` counted the bench's exec.
fn counted_services(openmetrics: &str) -> usize {
    let prefix = format!("sentinel_exec_total{{service=\"{PARENT}/");
    openmetrics
        .lines()
        .filter(|line| line.starts_with(&prefix) && !line.ends_with(" 0"))
        .count()
}

/// The daemon, stopped and reaped on drop.
struct ScaleDaemon {
    child: Child,
    addr: std::net::SocketAddr,
}

impl ScaleDaemon {
    fn start(daemon: &Path, config: &Path, dir: &Path) -> Result<Self> {
        let log_path = dir.join("sentinel.log");
        let log = File::create(&log_path)
            .with_context(|| format!("cannot create {}", log_path.display()))?;
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let child = Command::new(daemon)
            .args(["run", "--log-format", "json", "--config"])
            .arg(config)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .arg("--control-socket")
            .arg(dir.join("sentinel.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("cannot start {}", daemon.display()))?;
        let mut started = Self { child, addr };
        if !eventually(PATIENCE, || started.scrape().is_ok()) {
            let status = started.child.try_wait()?;
            bail!(
                "the daemon did not serve /metrics (exit status {status:?}); its log is {}",
                log_path.display()
            );
        }
        Ok(started)
    }

    fn scrape(&self) -> Result<String> {
        http_get(self.addr, "/metrics", Some(OPENMETRICS)).context("GET /metrics failed")
    }

    fn usage(&self) -> Result<ProcessUsage> {
        process_usage(self.child.id())
    }
}

impl Drop for ScaleDaemon {
    fn drop(&mut self) {
        // SAFETY: plain syscall on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

/// `PARENT` and its children, removed on drop.
struct Cgroups {
    parent: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroups {
    fn create(count: usize) -> Result<Self> {
        let parent = cgroup2_mount().join(PARENT);
        if parent.exists() {
            // Left by a bench that was killed: its cgroups are empty and can go.
            remove_tree(&parent)?;
        }
        fs::create_dir(&parent)
            .with_context(|| format!("cannot create cgroup {}", parent.display()))?;
        let mut cgroups = Self {
            parent,
            children: Vec::with_capacity(count),
        };
        for index in 0..count {
            let child = cgroups.parent.join(format!("svc-{index:04}"));
            fs::create_dir(&child)
                .with_context(|| format!("cannot create cgroup {}", child.display()))?;
            cgroups.children.push(child);
        }
        Ok(cgroups)
    }

    /// Runs `/bin/true` once in each cgroup, so that the kernel counts one exec for each.
    fn exec_in_each(&self) -> Result<()> {
        for child in &self.children {
            interrupt::check()?;
            let mut procs = File::options()
                .write(true)
                .open(child.join("cgroup.procs"))
                .with_context(|| format!("cannot open {}/cgroup.procs", child.display()))?;
            let mut command = Command::new("/bin/true");
            // SAFETY: only a write(2) on an already open descriptor runs between fork and exec.
            unsafe {
                command.pre_exec(move || procs.write_all(b"0"));
            }
            let status = command.status().context("cannot run /bin/true")?;
            ensure!(
                status.success(),
                "/bin/true in {}: {status}",
                child.display()
            );
        }
        Ok(())
    }
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        if let Err(error) = remove_tree(&self.parent) {
            eprintln!("[bench] WARNING: {error:#}");
        }
    }
}

/// Removes an empty cgroup and its empty children.
fn remove_tree(parent: &Path) -> Result<()> {
    for entry in
        fs::read_dir(parent).with_context(|| format!("cannot list {}", parent.display()))?
    {
        let entry = entry?;
        if entry.file_type()?.is_dir() {
            fs::remove_dir(entry.path())
                .with_context(|| format!("cannot remove cgroup {}", entry.path().display()))?;
        }
    }
    fs::remove_dir(parent).with_context(|| format!("cannot remove cgroup {}", parent.display()))
}
