//! Policy section: a policy of 500 services, one cgroup each, applied at the daemon's start
//! and reloaded, then `/metrics` scraped with 500 services. It runs in the vm-test guest,
//! whose cgroup v2 hierarchy has the controllers that build hosts (hybrid cgroups) lack; the
//! guest program is `sentinel-policy-bench` of the tests package, which prints
//! `BENCH key=value` lines.

use std::{collections::HashMap, fmt, str::FromStr, time::Duration};

use anyhow::{Context, Result};

use crate::vm;

const GUEST_PROGRAM: &str = "sentinel-policy-bench";
/// The guest boots in seconds and the bench takes a minute or two under emulation.
const VM_TIMEOUT: Duration = Duration::from_secs(900);
const APPLY_TARGET_MS: f64 = 200.0;
const SCRAPE_P99_TARGET_MS: f64 = 10.0;

pub fn bench() -> Result<()> {
    crate::step("bench: policy of 500 services, in a VM");
    let output = vm::run_job("policy-bench", GUEST_PROGRAM, VM_TIMEOUT)?;
    let results = PolicyResults::parse(&output)?;
    crate::step("bench: policy results");
    println!("\n{results}");
    Ok(())
}

/// What the guest reported in its `BENCH key=value` lines; times in milliseconds.
struct PolicyResults {
    cpu_model: String,
    controllers: String,
    cgroups: u32,
    applied_cgroups: u32,
    apply_log: f64,
    apply_observed: f64,
    reload_log: f64,
    reload_observed: f64,
    scrapes: u32,
    scrape_median: f64,
    scrape_p99: f64,
    scrape_bytes: u64,
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
        Ok(Self {
            cpu_model: text("cpu_model")?.to_owned(),
            controllers: text("controllers")?.replace(',', ", "),
            cgroups: count("cgroups")?,
            applied_cgroups: count("applied_cgroups")?,
            apply_log: value("apply_log_ms")?,
            apply_observed: value("apply_observed_ms")?,
            reload_log: value("reload_log_ms")?,
            reload_observed: value("reload_observed_ms")?,
            scrapes: count("scrapes")?,
            scrape_median: value("scrape_median_ms")?,
            scrape_p99: value("scrape_p99_ms")?,
            scrape_bytes: number("scrape_bytes", text("scrape_bytes")?)?,
        })
    }
}

impl fmt::Display for PolicyResults {
    fn fmt(&self, out: &mut fmt::Formatter) -> fmt::Result {
        let rows = [
            (
                "Cgroups, one policy each".to_owned(),
                format!(
                    "{} ({} applied per the log)",
                    self.cgroups, self.applied_cgroups
                ),
                String::new(),
            ),
            (
                "Apply at start, the daemon's log (`took_ms`)".to_owned(),
                format!("{} ms", self.apply_log),
                verdict(self.apply_log, APPLY_TARGET_MS),
            ),
            (
                "Apply at start, observed from the daemon's launch (eBPF load included) until \
                 every `memory.max` shows its limit"
                    .to_owned(),
                format!("{} ms", self.apply_observed),
                String::new(),
            ),
            (
                "Reload of every `memory.max`, the daemon's log (`took_ms`)".to_owned(),
                format!("{} ms", self.reload_log),
                String::new(),
            ),
            (
                "Reload, observed from the file's rewrite and SIGHUP until every `memory.max` \
                 shows its new limit"
                    .to_owned(),
                format!("{} ms", self.reload_observed),
                String::new(),
            ),
            (
                format!(
                    "`/metrics` scrape median ({} sequential GETs, text format)",
                    self.scrapes
                ),
                format!("{} ms", self.scrape_median),
                String::new(),
            ),
            (
                "`/metrics` scrape p99".to_owned(),
                format!("{} ms", self.scrape_p99),
                verdict(self.scrape_p99, SCRAPE_P99_TARGET_MS),
            ),
            (
                "`/metrics` response size".to_owned(),
                format!("{} bytes", self.scrape_bytes),
                String::new(),
            ),
        ];
        writeln!(
            out,
            "| Policy of {} services | Result | Target |",
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
             {} (this host runs hybrid cgroups without them).",
            self.cpu_model, self.controllers
        )
    }
}

fn verdict(value_ms: f64, target_ms: f64) -> String {
    let met = if value_ms <= target_ms {
        "met"
    } else {
        "NOT MET"
    };
    format!("≤ {target_ms} ms: {met}")
}
