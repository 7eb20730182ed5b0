//! Per-cgroup resource figures from the cgroup v2 interface files, for `/metrics`. A refresh
//! task reads them in the background (`policy::resources`); a scrape only encodes its snapshot.

use std::{fs::File, path::PathBuf};

use super::cgroupfs::{CgroupFs, read_interface_file};

/// Which resource series `/metrics` carries per policed service, and so which files are read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ResourceDetail {
    /// What operators alert and plot on: memory use and limit, CPU use and throttled time,
    /// task count (`memory.current`, `memory.max`, `cpu.stat`, `pids.current`).
    #[default]
    Basic,
    /// Also `memory.high`, `pids.max`, throttled periods, `memory.events` and pressure stall
    /// times (`memory.high`, `pids.max`, `memory.events`, `{cpu,memory,io}.pressure`).
    Full,
}

/// A figure every detail reads, as the kernel counts it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Figure {
    /// `memory.current`, bytes.
    MemoryCurrent,
    /// `memory.max`, bytes; not read when the limit is `max` (unlimited).
    MemoryMax,
    /// `cpu.stat` `usage_usec`, microseconds.
    CpuUsage,
    /// `cpu.stat` `throttled_usec`, microseconds.
    CpuThrottled,
    /// `pids.current`, tasks.
    PidsCurrent,
}

const FIGURES: usize = 5;

/// Figures of one cgroup; a file that is absent (controller not enabled) or not read at this
/// detail leaves its figures out. Thousands of cgroups are held twice while a pass replaces
/// the last one's figures, so each takes 56 bytes, the rest boxed apart.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct CgroupStats {
    /// Bit `figure as usize` is set when `values[figure as usize]` was read.
    read: u8,
    values: [u64; FIGURES],
    /// With `resource_detail: full` only.
    pub detail: Option<Box<DetailStats>>,
}

impl CgroupStats {
    pub fn get(&self, figure: Figure) -> Option<u64> {
        let index = figure as usize;
        (self.read & (1 << index) != 0).then_some(self.values[index])
    }

    /// A figure counted in microseconds, in seconds.
    pub fn seconds(&self, figure: Figure) -> Option<f64> {
        self.get(figure).map(micros_to_seconds)
    }

    pub fn set(&mut self, figure: Figure, value: Option<u64>) {
        let index = figure as usize;
        match value {
            Some(value) => {
                self.read |= 1 << index;
                self.values[index] = value;
            }
            None => {
                self.read &= !(1 << index);
                self.values[index] = 0;
            }
        }
    }

    /// These figures, and `figure` set to `value`.
    pub fn with(mut self, figure: Figure, value: u64) -> Self {
        self.set(figure, Some(value));
        self
    }
}

/// What `resource_detail: full` adds.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct DetailStats {
    /// `None` also when the limit is `max` (unlimited).
    pub memory_high_bytes: Option<u64>,
    pub pids_max: Option<u64>,
    pub cpu_throttled_periods: Option<u64>,
    /// `memory.events`: (event, count) for high, max, oom, oom_kill.
    pub memory_events: Vec<(&'static str, u64)>,
    /// Pressure stall totals: (resource, some|full, seconds).
    pub pressure_stall_seconds: Vec<(&'static str, &'static str, f64)>,
}

const MEMORY_EVENTS: [&str; 4] = ["high", "max", "oom", "oom_kill"];
const PRESSURE_FILES: [(&str, &str); 3] = [
    ("cpu", "cpu.pressure"),
    ("memory", "memory.pressure"),
    ("io", "io.pressure"),
];

/// Reads cgroups' interface files with one open, one read and one close each, into a buffer
/// kept across files and passes.
#[derive(Debug)]
pub struct StatsReader {
    fs: CgroupFs,
    detail: ResourceDetail,
    buffer: Vec<u8>,
}

impl StatsReader {
    pub fn new(fs: CgroupFs, detail: ResourceDetail) -> Self {
        Self {
            fs,
            detail,
            buffer: Vec::new(),
        }
    }

    /// The figures of the cgroup at `path` that `detail` exports.
    pub fn read(&mut self, path: &str) -> CgroupStats {
        let mut dir = self.fs.dir(path);
        let mut stats = CgroupStats::default();
        let memory_current = self.file(&mut dir, "memory.current").and_then(parse_number);
        stats.set(Figure::MemoryCurrent, memory_current);
        let memory_max = self.file(&mut dir, "memory.max").and_then(parse_limit);
        stats.set(Figure::MemoryMax, memory_max);
        let pids_current = self.file(&mut dir, "pids.current").and_then(parse_number);
        stats.set(Figure::PidsCurrent, pids_current);
        let mut throttled_periods = None;
        if let Some(cpu_stat) = self.file(&mut dir, "cpu.stat") {
            stats.set(Figure::CpuUsage, flat_key(cpu_stat, "usage_usec"));
            stats.set(Figure::CpuThrottled, flat_key(cpu_stat, "throttled_usec"));
            throttled_periods = flat_key(cpu_stat, "nr_throttled");
        }
        if self.detail == ResourceDetail::Basic {
            return stats;
        }
        let mut detail = DetailStats {
            cpu_throttled_periods: throttled_periods,
            memory_high_bytes: self.file(&mut dir, "memory.high").and_then(parse_limit),
            pids_max: self.file(&mut dir, "pids.max").and_then(parse_limit),
            ..DetailStats::default()
        };
        if let Some(events) = self.file(&mut dir, "memory.events") {
            detail.memory_events = MEMORY_EVENTS
                .iter()
                .filter_map(|event| Some((*event, flat_key(events, event)?)))
                .collect();
        }
        for (resource, file) in PRESSURE_FILES {
            if let Some(text) = self.file(&mut dir, file) {
                detail.pressure_stall_seconds.extend(
                    pressure_totals(text)
                        .into_iter()
                        .map(|(scope, micros)| (resource, scope, micros_to_seconds(micros))),
                );
            }
        }
        stats.detail = Some(Box::new(detail));
        stats
    }

    /// The whole text of `dir/name`, or `None` when it cannot be read. `dir` is lent to hold
    /// the file's path, and given back as it was.
    fn file(&mut self, dir: &mut PathBuf, name: &str) -> Option<&str> {
        dir.push(name);
        let opened = File::open(&*dir);
        dir.pop();
        read_interface_file(&mut opened.ok()?, &mut self.buffer).ok()
    }
}

fn parse_number(text: &str) -> Option<u64> {
    text.trim().parse().ok()
}

/// A limit file's value: a number, or `max` for none.
fn parse_limit(value: &str) -> Option<u64> {
    match value.trim() {
        "max" => None,
        number => number.parse().ok(),
    }
}

/// The value of `key` in a flat keyed file (`key value` per line).
fn flat_key(text: &str, key: &str) -> Option<u64> {
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
    use std::path::PathBuf;

    use super::*;

    /// A cgroup directory in a temp dir, with plain files standing in for interface files.
    struct FakeCgroup(PathBuf);

    impl FakeCgroup {
        fn new(files: &[(&str, &str)]) -> Self {
            let root = std::env::temp_dir().join(format!(
                "sentinel-stats-{}-{:?}",
                std::process::id(),
                std::thread::current().id()
            ));
            std::fs::create_dir_all(root.join("svc")).unwrap();
            for (name, text) in files {
                std::fs::write(root.join("svc").join(name), text).unwrap();
            }
            Self(root)
        }

        fn read(&self, detail: ResourceDetail) -> CgroupStats {
            StatsReader::new(CgroupFs::new(self.0.clone()), detail).read("/svc")
        }
    }

    impl Drop for FakeCgroup {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const FILES: [(&str, &str); 9] = [
        ("memory.current", "1048576\n"),
        ("memory.max", "max\n"),
        ("memory.high", "4194304\n"),
        ("pids.current", "3\n"),
        ("pids.max", "32\n"),
        (
            "cpu.stat",
            "usage_usec 2500000\nuser_usec 1\nnr_throttled 7\nthrottled_usec 1500000\n",
        ),
        ("memory.events", "low 0\nhigh 2\nmax 1\noom 0\noom_kill 0\n"),
        (
            "cpu.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=250000\n",
        ),
        (
            "io.pressure",
            "some avg10=0.00 avg60=0.00 avg300=0.00 total=1\n\
             full avg10=0.00 avg60=0.00 avg300=0.00 total=2\n",
        ),
    ];

    /// The basic figures of `FILES`.
    fn basic() -> CgroupStats {
        CgroupStats::default()
            .with(Figure::MemoryCurrent, 1_048_576)
            .with(Figure::CpuUsage, 2_500_000)
            .with(Figure::CpuThrottled, 1_500_000)
            .with(Figure::PidsCurrent, 3)
    }

    #[test]
    fn basic_detail_reads_only_what_it_exports() {
        let stats = FakeCgroup::new(&FILES).read(ResourceDetail::Basic);
        assert_eq!(stats, basic());
        // memory.max is `max`: no figure.
        assert_eq!(stats.get(Figure::MemoryMax), None);
        assert_eq!(stats.seconds(Figure::CpuUsage), Some(2.5));
    }

    #[test]
    fn full_detail_reads_every_file_and_skips_absent_ones() {
        // memory.pressure is absent: its figures are left out, the others stay.
        assert_eq!(
            FakeCgroup::new(&FILES).read(ResourceDetail::Full),
            CgroupStats {
                detail: Some(Box::new(DetailStats {
                    memory_high_bytes: Some(4_194_304),
                    cpu_throttled_periods: Some(7),
                    pids_max: Some(32),
                    memory_events: vec![("high", 2), ("max", 1), ("oom", 0), ("oom_kill", 0)],
                    pressure_stall_seconds: vec![
                        ("cpu", "some", 0.25),
                        ("io", "some", 0.000_001),
                        ("io", "full", 0.000_002),
                    ],
                })),
                ..basic()
            }
        );
    }

    #[test]
    fn a_figure_read_as_zero_is_there_and_one_not_read_is_not() {
        let mut stats = CgroupStats::default().with(Figure::PidsCurrent, 0);
        assert_ne!(stats, CgroupStats::default());
        assert_eq!(stats.get(Figure::PidsCurrent), Some(0));
        assert_eq!(stats.get(Figure::MemoryCurrent), None);
        stats.set(Figure::PidsCurrent, None);
        assert_eq!(stats, CgroupStats::default());
        assert_eq!(std::mem::size_of::<CgroupStats>(), 56);
    }

    #[test]
    fn a_file_larger_than_one_read_is_read_whole() {
        let padding = "x".repeat(crate::cgroup::cgroupfs::READ_CHUNK * 2);
        let cpu_stat = format!("{padding} 0\nusage_usec 42\n");
        let stats = FakeCgroup::new(&[("cpu.stat", &cpu_stat)]).read(ResourceDetail::Basic);
        assert_eq!(stats.seconds(Figure::CpuUsage), Some(0.000_042));
    }

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
