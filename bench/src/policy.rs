//! Policy section: 500 and then 5,000 policed services (or the sizes asked for), one cgroup each, one policy per 100
//! of them, applied at the daemon's start and reloaded, then `/metrics` scraped, each next to
//! its floor measured in the same guest (see `sentinel-policy-bench`). It runs in the vm-test
//! guest, whose cgroup v2 hierarchy has the controllers that build hosts (hybrid cgroups) lack;
//! the guest program prints `BENCH key=value` lines.

use std::{collections::HashMap, fmt, str::FromStr, time::Duration};

use anyhow::{Context, Result};
use serde_json::{Value, json};

use crate::{Driver, summary::Summary};

const GUEST_PROGRAM: &str = "sentinel-policy-bench";
/// The guest boots in seconds; 5,000 services take many minutes under emulation.
const VM_TIMEOUT: Duration = Duration::from_secs(1800);
/// Targets from the issue: apply and reload within 1.5x their floor, a scrape within 2x the
/// encoding of its body from memory.
const APPLY_TARGET_RATIO: f64 = 1.5;
const SCRAPE_TARGET_RATIO: f64 = 2.0;

/// Where the policed services' cgroups are (the guest program's second argument).
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Layout {
    /// Each service a cgroup at the top of the hierarchy.
    TopLevel,
    /// Every service in one slice.
    Slice,
}

impl Layout {
    fn argument(self) -> &'static str {
        match self {
            Self::TopLevel => "top-level",
            Self::Slice => "slice",
        }
    }
}

pub fn bench(
    driver: &dyn Driver,
    sizes: &[u32],
    layout: Layout,
    summary: &mut Summary,
) -> Result<()> {
    let mut raw = serde_json::Map::new();
    for &services in sizes {
        crate::step(&format!(
            "bench: policy of {services} services ({}), in a VM",
            layout.argument()
        ));
        let output = driver.run_vm_job(
            &format!("policy-bench-{services}"),
            &format!("{GUEST_PROGRAM} {services} {}", layout.argument()),
            VM_TIMEOUT,
        )?;
        let results = PolicyResults::parse(&output)?;
        println!("\n{results}");
        results.summarize(summary);
        raw.insert(services.to_string(), results.to_json());
    }
    summary.record("policy_vm", raw.into());
    Ok(())
}

/// What the guest reported in its `BENCH key=value` lines; times in milliseconds.
struct PolicyResults {
    cpu_model: String,
    controllers: String,
    /// `top-level` or `slice` (see [`Layout`]).
    layout: String,
    cgroups: u32,
    policies: u32,
    applied_cgroups: u32,
    /// Rounds of apply, reload and their floors; each of those figures is the median.
    rounds: u32,
    /// Each round's figure, comma-separated, in the order measured.
    apply_rounds: String,
    reload_rounds: String,
    floor_apply_rounds: String,
    floor_apply_job_rounds: String,
    floor_walk_rounds: String,
    floor_watches_rounds: String,
    floor_reload_rounds: String,
    floor_reload_watched_rounds: String,
    apply_log: f64,
    apply_observed: f64,
    reload_log: f64,
    reload_observed: f64,
    scrapes: u32,
    scrape_median: f64,
    scrape_p99: f64,
    scrape_bytes: u64,
    rss_kib: u64,
    peak_rss_kib: u64,
    idle_cpu_percent: f64,
    /// `name:percent` pairs, busiest thread first.
    idle_cpu_by_thread: String,
    /// `name:milliseconds` pairs: the daemon's CPU from the reload's SIGHUP until its limits
    /// were seen.
    reload_cpu_ms_by_thread: String,
    cpu_ms_per_scrape: f64,
    floor_apply: f64,
    /// The writes plus what giving back and watching need: each original read through the
    /// descriptor written, and an inotify watch per cgroup.
    floor_apply_job: f64,
    /// Finding the cgroups as the daemon does at start: the hierarchy listed, each
    /// subdirectory's link count read.
    floor_walk: f64,
    /// An inotify watch added on every cgroup, alone.
    floor_watches: f64,
    floor_reload: f64,
    /// The reload's writes while every cgroup is watched for drift, as the daemon's are.
    floor_reload_watched: f64,
    floor_stats_pass: f64,
    /// `metrics.resource_refresh` in the daemon's configuration, seconds.
    resource_refresh: f64,
    floor_encode_median: f64,
    floor_encode_p99: f64,
}

impl PolicyResults {
    fn parse(output: &[String]) -> Result<Self> {
        let values: HashMap<&str, &str> = output
            .iter()
            .filter_map(|line| line.strip_prefix("BENCH ")?.split_once('='))
            .map(|(key, value)| (key, value.trim()))
            .collect();
        let text = |key: &str| {
            values.get(key).copied().with_context(|| {
                format!(
                    "{GUEST_PROGRAM} did not report {key}; its output:\n{}",
                    output.join("\n")
                )
            })
        };
        fn number<T: FromStr>(key: &str, text: &str) -> Result<T> {
            text.parse()
                .ok()
                .with_context(|| format!("{GUEST_PROGRAM} reported {key}={text}, not a number"))
        }
        let value = |key: &str| number::<f64>(key, text(key)?);
        let count = |key: &str| number::<u32>(key, text(key)?);
        let kib = |key: &str| number::<u64>(key, text(key)?);
        Ok(Self {
            cpu_model: text("cpu_model")?.to_owned(),
            controllers: text("controllers")?.replace(',', ", "),
            layout: text("layout")?.to_owned(),
            cgroups: count("cgroups")?,
            policies: count("policies")?,
            applied_cgroups: count("applied_cgroups")?,
            rounds: count("rounds")?,
            apply_rounds: text("apply_log_rounds_ms")?.to_owned(),
            reload_rounds: text("reload_log_rounds_ms")?.to_owned(),
            floor_apply_rounds: text("floor_apply_rounds_ms")?.to_owned(),
            floor_apply_job_rounds: text("floor_apply_job_rounds_ms")?.to_owned(),
            floor_walk_rounds: text("floor_walk_rounds_ms")?.to_owned(),
            floor_watches_rounds: text("floor_watches_rounds_ms")?.to_owned(),
            floor_reload_rounds: text("floor_reload_rounds_ms")?.to_owned(),
            floor_reload_watched_rounds: text("floor_reload_watched_rounds_ms")?.to_owned(),
            apply_log: value("apply_log_ms")?,
            apply_observed: value("apply_observed_ms")?,
            reload_log: value("reload_log_ms")?,
            reload_observed: value("reload_observed_ms")?,
            scrapes: count("scrapes")?,
            scrape_median: value("scrape_median_ms")?,
            scrape_p99: value("scrape_p99_ms")?,
            scrape_bytes: kib("scrape_bytes")?,
            rss_kib: kib("rss_kib")?,
            peak_rss_kib: kib("peak_rss_kib")?,
            idle_cpu_percent: value("idle_cpu_percent")?,
            idle_cpu_by_thread: text("idle_cpu_by_thread")?.to_owned(),
            reload_cpu_ms_by_thread: text("reload_cpu_ms_by_thread")?.to_owned(),
            cpu_ms_per_scrape: value("cpu_ms_per_scrape")?,
            floor_apply: value("floor_apply_ms")?,
            floor_apply_job: value("floor_apply_job_ms")?,
            floor_walk: value("floor_walk_ms")?,
            floor_watches: value("floor_watches_ms")?,
            floor_reload: value("floor_reload_ms")?,
            floor_reload_watched: value("floor_reload_watched_ms")?,
            floor_stats_pass: value("floor_stats_pass_ms")?,
            resource_refresh: value("resource_refresh_s")?,
            floor_encode_median: value("floor_encode_median_ms")?,
            floor_encode_p99: value("floor_encode_p99_ms")?,
        })
    }

    /// The least an idle daemon that exports these services' figures can use: one stats pass
    /// every `resource_refresh`, % of a core.
    fn idle_floor(&self) -> f64 {
        self.floor_stats_pass / (self.resource_refresh * 1000.0) * 100.0
    }

    /// Everything apply must do in the kernel, with no work of its own: find the cgroups, and
    /// for each, read the originals, write the limits and add a watch.
    fn floor_apply_whole(&self) -> f64 {
        self.floor_walk + self.floor_apply_job
    }

    /// What reading the originals adds to the writes: the job's floor less the writes and the
    /// watches, each measured alone.
    fn floor_originals(&self) -> f64 {
        self.floor_apply_job - self.floor_apply - self.floor_watches
    }

    fn summarize(&self, summary: &mut Summary) {
        let section = match self.layout.as_str() {
            "slice" => format!("{} policed services in one slice, VM", self.cgroups),
            _ => format!("{} policed services, VM", self.cgroups),
        };
        let floor = "the same cgroupfs writes";
        summary.compare(
            &section,
            "apply at start",
            "ms",
            self.apply_log,
            floor,
            self.floor_apply,
        );
        summary.compare(
            &section,
            "apply at start",
            "ms",
            self.apply_log,
            "writes + originals read + inotify watches",
            self.floor_apply_job,
        );
        summary.compare(
            &section,
            "apply at start",
            "ms",
            self.apply_log,
            "walk + writes + originals + watches",
            self.floor_apply_whole(),
        );
        summary.compare(
            &section,
            "reload",
            "ms",
            self.reload_log,
            floor,
            self.floor_reload,
        );
        summary.compare(
            &section,
            "reload",
            "ms",
            self.reload_log,
            "writes to watched cgroups",
            self.floor_reload_watched,
        );
        summary.compare(
            &section,
            "idle CPU",
            "% of a core",
            self.idle_cpu_percent,
            "a stats pass every resource_refresh",
            self.idle_floor(),
        );
        let encode = "same body from memory";
        summary.compare(
            &section,
            "/metrics p50",
            "ms",
            self.scrape_median,
            encode,
            self.floor_encode_median,
        );
        summary.compare(
            &section,
            "/metrics p99",
            "ms",
            self.scrape_p99,
            encode,
            self.floor_encode_p99,
        );
    }

    fn to_json(&self) -> Value {
        json!({
            "cpu_model": self.cpu_model,
            "layout": self.layout,
            "cgroups": self.cgroups,
            "policies": self.policies,
            "applied_cgroups": self.applied_cgroups,
            "rounds": self.rounds,
            "apply_log_rounds_ms": self.apply_rounds,
            "reload_log_rounds_ms": self.reload_rounds,
            "floor_apply_rounds_ms": self.floor_apply_rounds,
            "floor_apply_with_originals_and_watches_rounds_ms": self.floor_apply_job_rounds,
            "floor_walk_rounds_ms": self.floor_walk_rounds,
            "floor_watches_rounds_ms": self.floor_watches_rounds,
            "floor_reload_rounds_ms": self.floor_reload_rounds,
            "floor_reload_watched_ms": self.floor_reload_watched,
            "floor_reload_watched_rounds_ms": self.floor_reload_watched_rounds,
            "apply_log_ms": self.apply_log,
            "apply_observed_ms": self.apply_observed,
            "reload_log_ms": self.reload_log,
            "reload_observed_ms": self.reload_observed,
            "scrapes": self.scrapes,
            "scrape_p50_ms": self.scrape_median,
            "scrape_p99_ms": self.scrape_p99,
            "response_bytes": self.scrape_bytes,
            "rss_kib": self.rss_kib,
            "peak_rss_kib": self.peak_rss_kib,
            "idle_cpu_percent_of_a_core": self.idle_cpu_percent,
            "idle_cpu_by_thread": self.idle_cpu_by_thread,
            "reload_cpu_ms_by_thread": self.reload_cpu_ms_by_thread,
            "cpu_ms_per_scrape": self.cpu_ms_per_scrape,
            "floor_apply_ms": self.floor_apply,
            "floor_apply_with_originals_and_watches_ms": self.floor_apply_job,
            "floor_walk_ms": self.floor_walk,
            "floor_watches_ms": self.floor_watches,
            "floor_apply_whole_job_ms": self.floor_apply_whole(),
            "floor_reload_ms": self.floor_reload,
            "floor_stats_pass_ms": self.floor_stats_pass,
            "resource_refresh_s": self.resource_refresh,
            "floor_idle_cpu_percent_of_a_core": self.idle_floor(),
            "floor_encode_p50_ms": self.floor_encode_median,
            "floor_encode_p99_ms": self.floor_encode_p99,
        })
    }
}

impl fmt::Display for PolicyResults {
    fn fmt(&self, out: &mut fmt::Formatter) -> fmt::Result {
        let rows = [
            (
                format!("Cgroups ({} policies, one per 100)", self.policies),
                format!(
                    "{} ({} applied per the log)",
                    self.cgroups, self.applied_cgroups
                ),
                String::new(),
            ),
            (
                format!(
                    "Apply at start, the daemon's log (`took_ms`), median of {} rounds ({} ms; \
                     floor {} ms)",
                    self.rounds, self.apply_rounds, self.floor_apply_rounds
                ),
                format!("{} ms", self.apply_log),
                ratio(self.apply_log, self.floor_apply, APPLY_TARGET_RATIO),
            ),
            (
                format!(
                    "Apply at start against the writes plus reading each original through the \
                     same descriptor and an inotify watch per cgroup (what giving back and drift \
                     need; {} ms)",
                    self.floor_apply_job_rounds
                ),
                format!("{} ms", self.apply_log),
                format!(
                    "{} ms: {:.2}x",
                    self.floor_apply_job,
                    self.apply_log / self.floor_apply_job
                ),
            ),
            (
                format!(
                    "Apply at start against the whole job with no work of its own: the walk \
                     that finds the cgroups ({} ms) added to the floor above",
                    self.floor_walk_rounds
                ),
                format!("{} ms", self.apply_log),
                format!(
                    "{:.1} ms: {:.2}x",
                    self.floor_apply_whole(),
                    self.apply_log / self.floor_apply_whole()
                ),
            ),
            (
                format!(
                    "What the job adds to the writes, each part alone: the walk, reading the \
                     originals (the job's floor less the writes and the watches), the watches \
                     ({} ms)",
                    self.floor_watches_rounds
                ),
                format!(
                    "{} + {:.1} + {} ms",
                    self.floor_walk,
                    self.floor_originals(),
                    self.floor_watches
                ),
                format!(
                    "{:.2}x the writes",
                    self.floor_apply_whole() / self.floor_apply
                ),
            ),
            (
                "Apply at start, observed from the daemon's launch (eBPF load included) until \
                 its log says so (every `memory.max` is then checked)"
                    .to_owned(),
                format!("{} ms", self.apply_observed),
                String::new(),
            ),
            (
                format!(
                    "Reload of every `memory.max`, the daemon's log (`took_ms`), median ({} ms; \
                     floor {} ms)",
                    self.reload_rounds, self.floor_reload_rounds
                ),
                format!("{} ms", self.reload_log),
                ratio(self.reload_log, self.floor_reload, APPLY_TARGET_RATIO),
            ),
            (
                format!(
                    "Reload against the same writes while every cgroup is watched for drift, as \
                     the daemon's are ({} ms)",
                    self.floor_reload_watched_rounds
                ),
                format!("{} ms", self.reload_log),
                format!(
                    "{} ms: {:.2}x",
                    self.floor_reload_watched,
                    self.reload_log / self.floor_reload_watched
                ),
            ),
            (
                "Reload, observed from the file's rewrite and SIGHUP until the daemon's log says \
                 so (every `memory.max` is then checked)"
                    .to_owned(),
                format!("{} ms", self.reload_observed),
                String::new(),
            ),
            (
                format!(
                    "`/metrics` median ({} sequential GETs, OpenMetrics)",
                    self.scrapes
                ),
                format!("{} ms", self.scrape_median),
                ratio(
                    self.scrape_median,
                    self.floor_encode_median,
                    SCRAPE_TARGET_RATIO,
                ),
            ),
            (
                "`/metrics` p99".to_owned(),
                format!("{} ms", self.scrape_p99),
                ratio(self.scrape_p99, self.floor_encode_p99, SCRAPE_TARGET_RATIO),
            ),
            (
                "`/metrics` response size".to_owned(),
                format!("{} bytes", self.scrape_bytes),
                String::new(),
            ),
            (
                "Daemon RSS after the scrapes (peak since start)".to_owned(),
                format!(
                    "{:.1} MiB ({:.1} MiB)",
                    self.rss_kib as f64 / 1024.0,
                    self.peak_rss_kib as f64 / 1024.0
                ),
                String::new(),
            ),
            (
                "Daemon CPU while idle / per scrape".to_owned(),
                format!(
                    "{:.2} % of a core / {:.1} ms",
                    self.idle_cpu_percent, self.cpu_ms_per_scrape
                ),
                String::new(),
            ),
            (
                format!(
                    "Idle CPU against a stats pass every `resource_refresh` ({} s)",
                    self.resource_refresh
                ),
                format!("{:.2} % of a core", self.idle_cpu_percent),
                format!(
                    "floor {:.2} %: {:.2}x",
                    self.idle_floor(),
                    self.idle_cpu_percent / self.idle_floor()
                ),
            ),
            (
                "Idle CPU by thread, % of a core".to_owned(),
                self.idle_cpu_by_thread.replace(',', ", "),
                String::new(),
            ),
            (
                "Reload CPU by thread, ms".to_owned(),
                self.reload_cpu_ms_by_thread.replace(',', ", "),
                String::new(),
            ),
            (
                "Floor of a stats pass: one read of the 4 files per service".to_owned(),
                format!("{} ms", self.floor_stats_pass),
                String::new(),
            ),
        ];
        writeln!(
            out,
            "| Policy of {} services | Result | Against the floor |",
            self.cgroups
        )?;
        writeln!(out, "|---|---|---|")?;
        for (measure, result, target) in rows {
            writeln!(out, "| {measure} | {result} | {target} |")?;
        }
        let guest = if self.cpu_model.contains("TCG") {
            "a QEMU/TCG guest (software emulation, much slower than hardware)"
        } else {
            "a QEMU/KVM guest"
        };
        writeln!(
            out,
            "\nMeasured in {guest}, CPU \"{}\"; cgroup v2 controllers enabled for the services: \
             {} (this host runs hybrid cgroups without them). Floors, with the daemon stopped: \
             apply writes memory.max, memory.high, cpu.max and pids.max of every cgroup; reload \
             writes every memory.max; the scrape floor encodes the scraped body from memory.",
            self.cpu_model, self.controllers
        )
    }
}

/// `value` over `floor`, against the target ratio.
fn ratio(value: f64, floor: f64, target: f64) -> String {
    let ratio = value / floor;
    let met = if ratio <= target { "met" } else { "NOT MET" };
    format!("floor {floor} ms: {ratio:.2}x (≤ {target}x: {met})")
}
