//! Per-cgroup resource figures from the cgroup v2 interface files, for `/metrics`.

use super::cgroupfs::CgroupFs;

/// Figures of one cgroup; a file that is absent (controller not enabled) leaves its fields
/// `None` or empty.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CgroupStats {
    pub memory_current_bytes: Option<u64>,
    /// `None` also when the limit is `max` (unlimited).
    pub memory_max_bytes: Option<u64>,
    pub memory_high_bytes: Option<u64>,
    pub cpu_usage_seconds: Option<f64>,
    pub cpu_throttled_seconds: Option<f64>,
    pub cpu_throttled_periods: Option<u64>,
    pub pids_current: Option<u64>,
    pub pids_max: Option<u64>,
    /// `memory.events`: (event, count) for high, max, oom, oom_kill.
    pub memory_events: Vec<(&'static str, u64)>,
    /// Pressure stall totals: (resource, some|full, seconds).
    pub pressure_stall_seconds: Vec<(&'static str, &'static str, f64)>,
}

const MEMORY_EVENTS: [&str; 4] = ["high", "max", "oom", "oom_kill"];
const PRESSURE_RESOURCES: [&str; 3] = ["cpu", "memory", "io"];

pub fn read_stats(fs: &CgroupFs, path: &str) -> CgroupStats {
    let read = |file: &str| fs.read(path, file).ok();
    let cpu_stat = read("cpu.stat").unwrap_or_default();
    let memory_events = read("memory.events").unwrap_or_default();
    CgroupStats {
        memory_current_bytes: read("memory.current").and_then(|v| v.parse().ok()),
        memory_max_bytes: read("memory.max").and_then(|v| parse_limit(&v)),
        memory_high_bytes: read("memory.high").and_then(|v| parse_limit(&v)),
        cpu_usage_seconds: flat_key(&cpu_stat, "usage_usec").map(micros_to_seconds),
        cpu_throttled_seconds: flat_key(&cpu_stat, "throttled_usec").map(micros_to_seconds),
        cpu_throttled_periods: flat_key(&cpu_stat, "nr_throttled"),
        pids_current: read("pids.current").and_then(|v| v.parse().ok()),
        pids_max: read("pids.max").and_then(|v| parse_limit(&v)),
        memory_events: MEMORY_EVENTS
            .iter()
            .filter_map(|event| Some((*event, flat_key(&memory_events, event)?)))
            .collect(),
        pressure_stall_seconds: PRESSURE_RESOURCES
            .iter()
            .flat_map(|resource| {
                let text = read(&format!("{resource}.pressure")).unwrap_or_default();
                pressure_totals(&text)
                    .into_iter()
                    .map(move |(scope, micros)| (*resource, scope, micros_to_seconds(micros)))
            })
            .collect(),
    }
}

/// A limit file's value: a number, or `max` for none.
pub fn parse_limit(value: &str) -> Option<u64> {
    match value.trim() {
        "max" => None,
        number => number.parse().ok(),
    }
}

/// The value of `key` in a flat keyed file (`key value` per line).
pub fn flat_key(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| {
        let (name, value) = line.split_once(' ')?;
        (name == key).then(|| value.trim().parse().ok())?
    })
}

/// `total=` of the `some` and `full` lines of a PSI file, in microseconds.
fn pressure_totals(text: &str) -> Vec<(&'static str, u64)> {
    text.lines()
        .filter_map(|line| {
            let scope = match line.split_whitespace().next()? {
                "some" => "some",
                "full" => "full",
                _ => return None,
            };
            let total = line
                .split_whitespace()
                .find_map(|field| field.strip_prefix("total="))?
                .parse()
                .ok()?;
            Some((scope, total))
        })
        .collect()
}

fn micros_to_seconds(micros: u64) -> f64 {
    micros as f64 / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flat_keyed_files() {
        let cpu_stat = "usage_usec 2500000\nuser_usec 1\nnr_throttled 7\nthrottled_usec 1500000\n";
        assert_eq!(flat_key(cpu_stat, "usage_usec"), Some(2_500_000));
        assert_eq!(flat_key(cpu_stat, "nr_throttled"), Some(7));
        assert_eq!(flat_key(cpu_stat, "missing"), None);
    }

    #[test]
    fn parses_limits() {
        assert_eq!(parse_limit("max"), None);
        assert_eq!(parse_limit("67108864\n"), Some(67_108_864));
    }

    #[test]
    fn parses_pressure_totals() {
        let psi = "some avg10=0.00 avg60=0.00 avg300=0.00 total=1234\n\
                   full avg10=0.00 avg60=0.00 avg300=0.00 total=99\n";
        assert_eq!(pressure_totals(psi), vec![("some", 1234), ("full", 99)]);
    }
}
