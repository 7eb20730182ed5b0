//! Measurements the bench and its guest program share: a process's CPU and memory, and
//! latency percentiles.

use std::{collections::BTreeMap, fs, time::Duration};

use anyhow::{Context, Result};

#[derive(Debug, Clone, Copy)]
pub struct ProcessUsage {
    /// User plus system time since the process started.
    pub cpu_seconds: f64,
    pub rss_kib: u64,
    /// Peak resident set size.
    pub hwm_kib: u64,
}

pub fn process_usage(pid: u32) -> Result<ProcessUsage> {
    let status_path = format!("/proc/{pid}/status");
    let status =
        fs::read_to_string(&status_path).with_context(|| format!("cannot read {status_path}"))?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|line| line.strip_prefix(field))
            .and_then(|value| value.trim().trim_end_matches("kB").trim().parse().ok())
            .with_context(|| format!("{status_path} has no {field}"))
    };
    let cpu_seconds = cpu_seconds(&format!("/proc/{pid}/stat"))?.1;
    Ok(ProcessUsage {
        cpu_seconds,
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

/// CPU seconds used so far by each of the process's threads, by thread name (threads that
/// share a name are added up).
pub fn thread_cpu(pid: u32) -> Result<BTreeMap<String, f64>> {
    let tasks = format!("/proc/{pid}/task");
    let mut by_name = BTreeMap::new();
    for task in fs::read_dir(&tasks).with_context(|| format!("cannot list {tasks}"))? {
        let stat = task
            .with_context(|| format!("cannot list {tasks}"))?
            .path()
            .join("stat");
        // A thread that ended since the listing has no stat left to read.
        let Ok((name, seconds)) = cpu_seconds(&stat.to_string_lossy()) else {
            continue;
        };
        *by_name.entry(name).or_default() += seconds;
    }
    Ok(by_name)
}

/// The command name and user plus system CPU seconds in a `/proc/.../stat` file.
fn cpu_seconds(stat_path: &str) -> Result<(String, f64)> {
    let stat = fs::read_to_string(stat_path).with_context(|| format!("cannot read {stat_path}"))?;
    // The command name (field 2) may hold spaces; utime and stime are fields 14 and 15, the
    // 12th and 13th after its closing parenthesis.
    let (name, fields) = stat
        .split_once('(')
        .and_then(|(_, rest)| rest.rsplit_once(')'))
        .with_context(|| format!("cannot find the command name in {stat_path}: {stat}"))?;
    let ticks: Vec<f64> = fields
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|field| field.parse().ok())
        .collect();
    let [utime, stime] = ticks[..] else {
        anyhow::bail!("cannot parse utime and stime in {stat_path}: {stat}");
    };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok((name.to_owned(), (utime + stime) / ticks_per_second))
}

/// The `fraction` percentile of `durations` (nearest rank), in milliseconds.
pub fn percentile_ms(durations: &[Duration], fraction: f64) -> f64 {
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}
