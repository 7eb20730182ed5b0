//! Measurements the bench and its guest program share: a process's CPU and memory, and
//! latency percentiles.

use std::{fs, time::Duration};

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
    let stat_path = format!("/proc/{pid}/stat");
    let stat =
        fs::read_to_string(&stat_path).with_context(|| format!("cannot read {stat_path}"))?;
    // The command name (field 2) may hold spaces; utime and stime are fields 14 and 15, the
    // 12th and 13th after its closing parenthesis.
    let ticks: Vec<f64> = stat
        .rsplit_once(')')
        .map(|(_, fields)| fields.split_whitespace().skip(11).take(2))
        .into_iter()
        .flatten()
        .filter_map(|field| field.parse().ok())
        .collect();
    let [utime, stime] = ticks[..] else {
        anyhow::bail!("cannot parse utime and stime in {stat_path}: {stat}");
    };
    // SAFETY: sysconf has no preconditions.
    let ticks_per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    Ok(ProcessUsage {
        cpu_seconds: (utime + stime) / ticks_per_second,
        rss_kib: kib("VmRSS:")?,
        hwm_kib: kib("VmHWM:")?,
    })
}

/// The `fraction` percentile of `durations` (nearest rank), in milliseconds.
pub fn percentile_ms(durations: &[Duration], fraction: f64) -> f64 {
    let mut sorted = durations.to_vec();
    sorted.sort_unstable();
    let rank = ((sorted.len() as f64 * fraction).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1].as_secs_f64() * 1000.0
}
