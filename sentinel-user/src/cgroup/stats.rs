//! Per-cgroup resource figures from the cgroup v2 interface files, for `/metrics`. A refresh
//! task reads them in the background (`policy::resources`); a scrape only encodes its snapshot.

use std::{
    collections::{HashMap, HashSet},
    fs::File,
    path::PathBuf,
};

use sentinel_common::{CgroupFigures, FIGURES_CPU, FIGURES_MEMORY, FIGURES_PIDS};
use tracing::warn;

use super::{
    CgroupPath,
    cgroupfs::{CgroupFs, read_interface_file},
};
use crate::kernel::{CgroupIterator, MAX_WALKS, Walked};

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

/// Reads the figures of policed cgroups: the basic ones of every cgroup at once from the
/// kernel's cgroup iterator where it could be attached, else from each cgroup's interface
/// files with one open, one read and one close each, into a buffer kept across files and
/// passes; `resource_detail: full` adds its files either way.
#[derive(Debug)]
pub struct StatsReader {
    fs: CgroupFs,
    detail: ResourceDetail,
    buffer: Vec<u8>,
    kernel: Option<KernelFigures>,
    /// How many times a pass read a cgroup from its files, not from the kernel's records.
    from_files: u64,
}

impl StatsReader {
    pub fn new(fs: CgroupFs, detail: ResourceDetail, iterator: Option<CgroupIterator>) -> Self {
        Self {
            fs,
            detail,
            buffer: Vec::new(),
            kernel: iterator.map(KernelFigures::new),
            from_files: 0,
        }
    }

    /// How many times a pass read a cgroup from its interface files since the start: every
    /// cgroup at every pass without the kernel's cgroup iterator, else those it had no record
    /// of (made after the walks, or past their bound).
    pub fn from_files(&self) -> u64 {
        self.from_files
    }

    /// The figures that `detail` exports of each cgroup of `cgroups` (its path and id), in
    /// order.
    pub fn read_all<'a>(
        &mut self,
        cgroups: impl Iterator<Item = (&'a CgroupPath, u64)> + Clone,
    ) -> Vec<CgroupStats> {
        let paths = cgroups.clone().map(|(path, _)| path);
        // With nothing policed, nothing is walked.
        let Some(mut kernel) = self.kernel.take_if(|_| paths.clone().next().is_some()) else {
            return paths.map(|path| self.read(path)).collect();
        };
        if !kernel.iterator.flushes_statistics() {
            self.flush_cpu_totals(paths.clone());
        }
        let read = match kernel.walk() {
            // A cgroup the walk missed (made meanwhile) is read from its files.
            Ok(()) => cgroups
                .map(|(path, id)| match kernel.records.figures(id) {
                    Some((mut stats, throttled_periods)) => {
                        if self.detail == ResourceDetail::Full {
                            let mut dir = self.fs.dir(path);
                            let detail = self.detail_figures(&mut dir, throttled_periods);
                            stats.detail = Some(Box::new(detail));
                        }
                        stats
                    }
                    None => self.read(path),
                })
                .collect(),
            Err(error) => {
                if !kernel.failing {
                    warn!(
                        "cannot walk the kernel's cgroup iterator ({error}); reading the \
                         interface files until it works again"
                    );
                }
                kernel.failing = true;
                paths.map(|path| self.read(path)).collect()
            }
        };
        self.kernel = Some(kernel);
        read
    }

    /// CPU time is summed into a cgroup's figure when the kernel flushes its statistics, which
    /// reading `cpu.stat` does for the cgroup's whole subtree: so where the walks cannot flush
    /// (a kernel without the flush kfunc), the `cpu.stat` of each top-level cgroup above
    /// `paths` is read before them.
    fn flush_cpu_totals<'a>(&mut self, paths: impl Iterator<Item = &'a CgroupPath>) {
        let mut flushed = HashSet::new();
        for path in paths {
            let top = top_level(path);
            if flushed.insert(top) {
                self.file(&mut self.fs.dir(top), "cpu.stat");
            }
        }
    }

    /// The figures of the cgroup at `path` that `detail` exports, from its interface files.
    fn read(&mut self, path: &str) -> CgroupStats {
        self.from_files += 1;
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
        if self.detail == ResourceDetail::Full {
            stats.detail = Some(Box::new(self.detail_figures(&mut dir, throttled_periods)));
        }
        stats
    }

    /// What `resource_detail: full` adds: the throttled periods (from `cpu.stat`, read with
    /// the basic figures), and the other files of the cgroup at `dir`.
    fn detail_figures(&mut self, dir: &mut PathBuf, throttled_periods: Option<u64>) -> DetailStats {
        let mut detail = DetailStats {
            cpu_throttled_periods: throttled_periods,
            memory_high_bytes: self.file(dir, "memory.high").and_then(parse_limit),
            pids_max: self.file(dir, "pids.max").and_then(parse_limit),
            ..DetailStats::default()
        };
        if let Some(events) = self.file(dir, "memory.events") {
            detail.memory_events = MEMORY_EVENTS
                .iter()
                .filter_map(|event| Some((*event, flat_key(events, event)?)))
                .collect();
        }
        for (resource, file) in PRESSURE_FILES {
            if let Some(text) = self.file(dir, file) {
                detail.pressure_stall_seconds.extend(
                    pressure_totals(text)
                        .into_iter()
                        .map(|(scope, micros)| (resource, scope, micros_to_seconds(micros))),
                );
            }
        }
        detail
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

/// Passes after which the table of records starts afresh, so that the records of removed
/// cgroups go: every 5 minutes at the default refresh.
const PASSES_PER_TABLE: u32 = 30;

/// The basic figures of every cgroup from the walks of the kernel's cgroup iterator.
#[derive(Debug)]
struct KernelFigures {
    iterator: CgroupIterator,
    /// The last pass's output, kept for its capacity.
    output: Vec<u8>,
    records: Records,
    /// Passes left before the table starts afresh; 0 after a failed or bounded pass, whose
    /// records may not all have come in.
    passes_left: u32,
    /// The last walk failed: its warning is not repeated until one works.
    failing: bool,
    /// The last pass's walks stopped at their bound: its warning is not repeated until one
    /// does not.
    bounded: bool,
}

impl KernelFigures {
    fn new(iterator: CgroupIterator) -> Self {
        // SAFETY: sysconf without preconditions.
        let page_size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        Self {
            iterator,
            output: Vec::new(),
            records: Records::new(u64::try_from(page_size).unwrap_or(4096)),
            passes_left: 0,
            failing: false,
            bounded: false,
        }
    }

    /// Walks every cgroup, into `records`: the changed ones, or every one when the table
    /// starts afresh.
    fn walk(&mut self) -> std::io::Result<()> {
        let left = std::mem::take(&mut self.passes_left);
        let mut afresh = left == 0;
        let mut walked = self.iterator.read_all(&mut self.output, afresh)?;
        if walked == Walked::Bounded && !afresh {
            // The cgroups past the bound may have changed unseen: the table starts afresh,
            // with only the cgroups the walks reach.
            afresh = true;
            walked = self.iterator.read_all(&mut self.output, afresh)?;
        }
        if walked == Walked::Bounded && !self.bounded {
            warn!(
                "more cgroups changed than {MAX_WALKS} walks of the kernel's cgroup iterator \
                 cover; the policed cgroups past them are read from their files"
            );
        }
        self.bounded = walked == Walked::Bounded;
        self.records.begin_pass(&self.output, afresh);
        self.passes_left = match (self.bounded, afresh) {
            (true, _) => 0,
            (false, true) => PASSES_PER_TABLE - 1,
            (false, false) => left - 1,
        };
        self.failing = false;
        Ok(())
    }
}

/// The last record of each cgroup, by cgroup id.
#[derive(Debug)]
struct Records {
    records: HashMap<u64, CgroupFigures>,
    page_size: u64,
}

impl Records {
    fn new(page_size: u64) -> Self {
        Self {
            records: HashMap::new(),
            page_size,
        }
    }

    /// Takes a pass's `output`, the records as the program wrote them: those of the cgroups
    /// that changed, or of every cgroup `afresh`.
    fn begin_pass(&mut self, output: &[u8], afresh: bool) {
        if afresh {
            self.records.clear();
        }
        self.records.extend(
            output
                .chunks_exact(size_of::<CgroupFigures>())
                // SAFETY: each chunk holds one record as the program wrote it, plain data.
                .map(|chunk| unsafe { chunk.as_ptr().cast::<CgroupFigures>().read_unaligned() })
                .map(|record| (record.cgroup_id, record)),
        );
    }

    /// The figures of the cgroup `id`, and its throttled periods, or `None` without a record
    /// of it (made after the walks).
    fn figures(&self, id: u64) -> Option<(CgroupStats, Option<u64>)> {
        let record = self.records.get(&id)?;
        let throttled_periods =
            (record.present & FIGURES_CPU != 0).then_some(u64::from(record.cpu_throttled_periods));
        Some((file_figures(*record, self.page_size), throttled_periods))
    }
}

/// A record's figures as the interface files show them: bytes, not pages; microseconds, not
/// nanoseconds; no memory limit when it is the kernel's largest page count, `LONG_MAX /
/// PAGE_SIZE`, which `memory.max` shows as `max`.
fn file_figures(record: CgroupFigures, page_size: u64) -> CgroupStats {
    let mut stats = CgroupStats::default().with(Figure::CpuUsage, record.cpu_usage_ns / 1000);
    if record.present & FIGURES_MEMORY != 0 {
        stats.set(Figure::MemoryCurrent, Some(record.memory_pages * page_size));
        let unlimited = i64::MAX as u64 / page_size;
        stats.set(
            Figure::MemoryMax,
            (record.memory_max_pages != unlimited).then(|| record.memory_max_pages * page_size),
        );
    }
    if record.present & FIGURES_PIDS != 0 {
        stats.set(Figure::PidsCurrent, Some(record.pids));
    }
    if record.present & FIGURES_CPU != 0 {
        stats.set(Figure::CpuThrottled, Some(record.cpu_throttled_ns / 1000));
    }
    stats
}

/// The top-level cgroup `path` is in (`/a` for `/a/b`).
fn top_level(path: &str) -> &str {
    let below_root = path.trim_start_matches('/');
    let end = below_root.find('/').unwrap_or(below_root.len());
    &path[..path.len() - below_root.len() + end]
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
            StatsReader::new(CgroupFs::new(self.0.clone()), detail, None).read("/svc")
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
        let padding = "x".repeat(crate::cgroup::cgroupfs::FIRST_READ * 40);
        let cpu_stat = format!("{padding} 0\nusage_usec 42\n");
        let stats = FakeCgroup::new(&[("cpu.stat", &cpu_stat)]).read(ResourceDetail::Basic);
        assert_eq!(stats.seconds(Figure::CpuUsage), Some(0.000_042));
    }

    #[test]
    fn a_kernel_record_reads_as_the_files_would() {
        let record = CgroupFigures {
            cgroup_id: 7,
            present: FIGURES_MEMORY | FIGURES_PIDS | FIGURES_CPU,
            cpu_throttled_periods: 0,
            memory_pages: 256,
            memory_max_pages: 16384,
            pids: 3,
            cpu_usage_ns: 2_500_000_999,
            cpu_throttled_ns: 1_500_000_999,
        };
        let expected = CgroupStats::default()
            .with(Figure::MemoryCurrent, 1_048_576)
            .with(Figure::MemoryMax, 64 << 20)
            .with(Figure::CpuUsage, 2_500_000)
            .with(Figure::CpuThrottled, 1_500_000)
            .with(Figure::PidsCurrent, 3);
        assert_eq!(file_figures(record, 4096), expected);
        // `memory.max` reads `max`: no limit figure.
        let unlimited = CgroupFigures {
            memory_max_pages: i64::MAX as u64 / 4096,
            ..record
        };
        let mut no_limit = expected.clone();
        no_limit.set(Figure::MemoryMax, None);
        assert_eq!(file_figures(unlimited, 4096), no_limit);
        // Without its controllers a cgroup has only its CPU usage, as its files.
        let bare = CgroupFigures {
            present: 0,
            ..record
        };
        assert_eq!(
            file_figures(bare, 4096),
            CgroupStats::default().with(Figure::CpuUsage, 2_500_000)
        );
    }

    /// What the iterator program writes for `records`.
    fn output(records: &[CgroupFigures]) -> Vec<u8> {
        records
            .iter()
            .flat_map(|record| {
                // SAFETY: plain data, read as bytes.
                unsafe {
                    std::slice::from_raw_parts(
                        (record as *const CgroupFigures).cast::<u8>(),
                        size_of::<CgroupFigures>(),
                    )
                }
                .to_vec()
            })
            .collect()
    }

    fn pages(cgroup_id: u64, memory_pages: u64) -> CgroupFigures {
        CgroupFigures {
            cgroup_id,
            present: FIGURES_MEMORY,
            memory_pages,
            ..CgroupFigures::default()
        }
    }

    #[test]
    fn a_cgroup_keeps_its_last_record_until_the_table_starts_afresh() {
        let memory = |records: &Records, id| {
            records
                .figures(id)
                .and_then(|(stats, _)| stats.get(Figure::MemoryCurrent))
        };
        let mut records = Records::new(4096);
        records.begin_pass(&output(&[pages(1, 9), pages(7, 2)]), true);
        assert_eq!(memory(&records, 7), Some(8192));
        // Unchanged, so not written again: the last record stands.
        records.begin_pass(&output(&[pages(1, 10)]), false);
        assert_eq!(memory(&records, 7), Some(8192));
        // Changed: the new record.
        records.begin_pass(&output(&[pages(7, 4)]), false);
        assert_eq!(memory(&records, 7), Some(16384));
        // The service restarts: a new cgroup, a new id, written as new.
        records.begin_pass(&output(&[pages(8, 3)]), false);
        assert_eq!(memory(&records, 8), Some(12288));
        // Made after the walks: no record, so its files are read instead.
        assert_eq!(records.figures(9), None);
        // Afresh, the records of removed cgroups (and any not written) are gone.
        records.begin_pass(&output(&[pages(1, 9), pages(8, 3)]), true);
        assert_eq!(records.figures(7), None);
        assert_eq!(memory(&records, 8), Some(12288));
    }

    #[test]
    fn a_cgroup_is_flushed_through_its_top_level_cgroup() {
        assert_eq!(top_level("/web"), "/web");
        assert_eq!(top_level("/system.slice/web.service"), "/system.slice");
        assert_eq!(top_level("/a/b/c"), "/a");
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
