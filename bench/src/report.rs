//! Statistics over the runs, and the Markdown report an operator can paste into a README.

use std::{
    fmt::{self, Display, Formatter},
    time::Duration,
};

use serde_json::json;

use super::{
    LOOP_TRACEPOINTS,
    summary::Summary,
    system::{Machine, ProgramCost},
    tools::{ALLOWED_EXECUTABLES, Tool, ToolRun},
    workload::LoopTimes,
};

/// Sentinel's overhead targets, in percent.
const EXEC_TARGET: f64 = 1.0;
const CONNECT_TARGET: f64 = 2.0;

/// One number of a run, e.g. the exec loop's wall time per iteration.
type Measure = fn(&LoopTimes) -> f64;

const EXEC_WALL: Measure = |times| times.exec.wall;
const EXEC_CPU: Measure = |times| times.exec.cpu;
const CONNECT_WALL: Measure = |times| times.connect.wall;
const CONNECT_CPU: Measure = |times| times.connect.cpu;

/// Every run of one tool, each with its ratios to the baseline runs around it.
pub struct ToolResults {
    pub tool: Tool,
    pub runs: Vec<ToolRun>,
    ratios: Vec<LoopTimes>,
}

impl ToolResults {
    pub fn new(tool: Tool) -> Self {
        Self {
            tool,
            runs: Vec::new(),
            ratios: Vec::new(),
        }
    }

    /// Records `run`, measured between the baseline runs `before` and `after`; comparing with
    /// their mean cancels slow drift of the machine. Returns the run's ratios.
    pub fn push(&mut self, run: ToolRun, before: LoopTimes, after: LoopTimes) -> LoopTimes {
        let baseline = before.zip_with(after, |before, after| (before + after) / 2.0);
        let ratios = run.times.zip_with(baseline, |run, baseline| run / baseline);
        self.ratios.push(ratios);
        self.runs.push(run);
        ratios
    }

    /// The median of the runs' ratios for `measure`.
    fn overhead(&self, measure: Measure) -> f64 {
        median_of(&self.ratios, measure)
    }

    /// The 25th to 75th percentile of the runs' ratios for `measure`.
    fn spread(&self, measure: Measure) -> String {
        let ratios: Vec<f64> = self.ratios.iter().map(measure).collect();
        format!(
            "{:.3}x–{:.3}x",
            percentile(&ratios, 0.25),
            percentile(&ratios, 0.75)
        )
    }

    fn times(&self) -> Vec<LoopTimes> {
        self.runs.iter().map(|run| run.times).collect()
    }
}

pub struct Report<'a> {
    pub machine: &'a Machine,
    pub iterations: u32,
    pub baselines: &'a [LoopTimes],
    pub results: &'a [ToolResults],
    /// Tools that could not run here, and why.
    pub unavailable: &'a [(Tool, String)],
    pub elapsed: Duration,
}

impl Display for Report<'_> {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        let machine = self.machine;
        let pairs = self.results.first().map_or(0, |results| results.runs.len());
        writeln!(f, "## Overhead benchmark (`cargo xtask bench`)\n")?;
        writeln!(
            f,
            "{machine}. {} execs and {} TCP connects per run; {pairs} runs per tool, \
             alternating with {} baseline runs; {:.1} minutes in all.\n",
            self.iterations,
            self.iterations,
            self.baselines.len(),
            self.elapsed.as_secs_f64() / 60.0,
        )?;
        self.write_overhead_table(f)?;
        writeln!(f)?;
        self.write_cost_table(f)?;
        writeln!(f)?;
        self.write_notes(f)?;
        writeln!(f)?;
        self.write_program_table(f)
    }
}

impl Report<'_> {
    fn write_overhead_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| Tool | µs per exec (wall / CPU) | exec overhead (wall) | exec overhead (CPU) \
             | µs per connect (wall / CPU) | connect overhead (wall) | connect overhead (CPU) |"
        )?;
        writeln!(f, "|---|--:|--:|--:|--:|--:|--:|")?;
        let microseconds = |times: &[LoopTimes], wall: Measure, cpu: Measure| {
            format!(
                "{:.1} / {:.1}",
                median_of(times, wall),
                median_of(times, cpu)
            )
        };
        writeln!(
            f,
            "| baseline (nothing attached) | {} | — | — | {} | — | — |",
            microseconds(self.baselines, EXEC_WALL, EXEC_CPU),
            microseconds(self.baselines, CONNECT_WALL, CONNECT_CPU),
        )?;
        for results in self.results {
            let times = results.times();
            writeln!(
                f,
                "| {} | {} | {} | {} | {} | {} | {} |",
                results.tool.label(),
                microseconds(&times, EXEC_WALL, EXEC_CPU),
                overhead(results.overhead(EXEC_WALL)),
                overhead(results.overhead(EXEC_CPU)),
                microseconds(&times, CONNECT_WALL, CONNECT_CPU),
                overhead(results.overhead(CONNECT_WALL)),
                overhead(results.overhead(CONNECT_CPU)),
            )?;
        }
        for (tool, _) in self.unavailable {
            writeln!(
                f,
                "| {} | not run (see below) | — | — | — | — | — |",
                tool.label()
            )?;
        }
        Ok(())
    }

    fn write_cost_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| Tool | execs seen | connects seen | events lost | tool CPU per run | tool RSS (peak) |"
        )?;
        writeln!(f, "|---|--:|--:|--:|--:|--:|")?;
        for results in self.results {
            let runs = &results.runs;
            let expected = u64::from(self.iterations) * runs.len() as u64;
            let total =
                |count: fn(&ToolRun) -> Option<u64>| runs.iter().map(count).sum::<Option<u64>>();
            let seen = |count| {
                total(count)
                    .map_or_else(|| "—".to_owned(), |seen: u64| format!("{seen}/{expected}"))
            };
            let lost: Option<u64> = total(|run| run.seen.lost);
            let cpu: Vec<f64> = runs.iter().map(|run| run.usage.cpu_seconds).collect();
            let rss = runs.iter().map(|run| run.usage.rss_kib).max().unwrap_or(0);
            let hwm = runs.iter().map(|run| run.usage.hwm_kib).max().unwrap_or(0);
            writeln!(
                f,
                "| {} | {} | {} | {} | {:.2} s | {:.1} MiB ({:.1} MiB) |",
                results.tool.label(),
                seen(|run| run.seen.execs),
                seen(|run| run.seen.connects),
                lost.map_or_else(|| "—".to_owned(), |lost| lost.to_string()),
                median(&cpu),
                mebibytes(rss),
                mebibytes(hwm),
            )?;
        }
        Ok(())
    }

    fn write_notes(&self, f: &mut Formatter<'_>) -> fmt::Result {
        if let Some(sentinel) = self.results.iter().find(|r| r.tool == Tool::Sentinel) {
            writeln!(
                f,
                "- Sentinel's targets (reported, not asserted): exec ≤ +{EXEC_TARGET} %: {}; \
                 connect ≤ +{CONNECT_TARGET} %: {}.",
                verdicts(sentinel, EXEC_WALL, EXEC_CPU, EXEC_TARGET),
                verdicts(sentinel, CONNECT_WALL, CONNECT_CPU, CONNECT_TARGET),
            )?;
        }
        writeln!(
            f,
            "- Overhead: median over the runs of (tool run) / (mean of the baseline runs just \
             before and after it). Wall: elapsed time. CPU: user + system time of the loop and \
             the programs it starts, which leaves out waiting for CPUs held by other processes \
             but still counts the eBPF programs (they run in the loop's context). Spread of the \
             ratios (25th–75th percentile):"
        )?;
        for results in self.results {
            writeln!(
                f,
                "  {}: exec {} (CPU {}), connect {} (CPU {})",
                results.tool.label(),
                results.spread(EXEC_WALL),
                results.spread(EXEC_CPU),
                results.spread(CONNECT_WALL),
                results.spread(CONNECT_CPU),
            )?;
        }
        writeln!(
            f,
            "- Exec loop: spawn and wait for a static program that exits at once. Connect loop: \
             connect and accept on 127.0.0.1; the client closes with SO_LINGER 0 (RST, no \
             TIME_WAIT). Both run in a cgroup of their own."
        )?;
        if let Some(contained) = self
            .results
            .iter()
            .find(|results| results.tool == Tool::SentinelContained)
        {
            let violations: Option<u64> =
                contained.runs.iter().map(|run| run.seen.violations).sum();
            writeln!(
                f,
                "- {}: the same daemon with a policy containing the loops' cgroup: `exec.allow` \
                 of {ALLOWED_EXECUTABLES} files (the exec loop's program and the first others \
                 of /usr/bin by name), `on_violation: alert`. Violations counted during its \
                 loops: {} (`sentinel_exec_violations_total`); after each run's loops, one exec \
                 of an unlisted copy of the program counted exactly one, so the policy was in \
                 force.",
                contained.tool.label(),
                violations.map_or_else(|| "—".to_owned(), |count| count.to_string()),
            )?;
        }
        writeln!(
            f,
            "- Seen, against the loops' iterations: Sentinel's `sentinel_exec_total` and \
             `sentinel_tcp_connects_total` for that cgroup, with lost the sum of \
             `sentinel_events_lost_total`; bpftrace's counts for the loops' command names, or \
             their lines in its output. Tool CPU: the tool's user + system time during the loops."
        )?;
        writeln!(
            f,
            "- kernel.bpf_stats_enabled=1 during all runs, so every tool's programs pay the \
             same accounting cost."
        )?;
        for (tool, reason) in self.unavailable {
            writeln!(f, "- {} could not run here: {reason}", tool.label())?;
        }
        Ok(())
    }

    fn write_program_table(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(f, "eBPF programs' own cost (kernel BPF statistics):\n")?;
        writeln!(
            f,
            "| Tool | Program | Attached to | runs per iteration | ns per run | ns per iteration |"
        )?;
        writeln!(f, "|---|---|---|--:|--:|--:|")?;
        for results in self.results {
            let iterations = f64::from(self.iterations) * results.runs.len() as f64;
            for program in program_totals(&results.runs) {
                let per_run = if program.run_count == 0 {
                    "—".to_owned()
                } else {
                    format!(
                        "{:.0}",
                        program.run_time_ns as f64 / program.run_count as f64
                    )
                };
                writeln!(
                    f,
                    "| {} | {} | {} | {:.2} | {per_run} | {:.0} |",
                    results.tool.label(),
                    program.name,
                    program.target,
                    program.run_count as f64 / iterations,
                    program.run_time_ns as f64 / iterations,
                )?;
            }
        }
        Ok(())
    }
}

impl Report<'_> {
    /// Sentinel's figures over the floor (nothing attached) and over each peer, and the raw
    /// figures of every tool.
    pub fn summarize(&self, summary: &mut Summary) {
        const SECTION: &str = "exec and connect loops";
        let iterations = f64::from(self.iterations);
        let figures = |results: &ToolResults| {
            let times = results.times();
            let runs = &results.runs;
            let per_iteration = iterations * runs.len() as f64;
            let kernel_ns = |tracepoint: &str| {
                program_totals(runs)
                    .iter()
                    .filter(|program| program.target.contains(tracepoint))
                    .map(|program| program.run_time_ns as f64)
                    .sum::<f64>()
                    / per_iteration
            };
            let cpu: Vec<f64> = runs.iter().map(|run| run.usage.cpu_seconds).collect();
            ToolFigures {
                exec_us: median_of(&times, EXEC_WALL),
                connect_us: median_of(&times, CONNECT_WALL),
                exec_overhead: results.overhead(EXEC_WALL),
                connect_overhead: results.overhead(CONNECT_WALL),
                kernel_ns_per_exec: kernel_ns(LOOP_TRACEPOINTS[0]),
                kernel_ns_per_connect: kernel_ns(LOOP_TRACEPOINTS[1]),
                cpu_seconds_per_run: median(&cpu),
                peak_rss_mib: mebibytes(
                    runs.iter().map(|run| run.usage.hwm_kib).max().unwrap_or(0),
                ),
            }
        };
        let floor_exec = median_of(self.baselines, EXEC_WALL);
        let floor_connect = median_of(self.baselines, CONNECT_WALL);
        let mut raw = serde_json::Map::new();
        raw.insert("iterations".into(), json!(self.iterations));
        raw.insert(
            "nothing_attached".into(),
            json!({ "exec_us": floor_exec, "connect_us": floor_connect }),
        );
        let Some(sentinel) = self.results.iter().find(|r| r.tool == Tool::Sentinel) else {
            return;
        };
        let ours = figures(sentinel);
        summary.compare(
            SECTION,
            "µs per exec (wall, median)",
            "µs",
            ours.exec_us,
            "nothing attached",
            floor_exec,
        );
        summary.compare(
            SECTION,
            "µs per connect (wall, median)",
            "µs",
            ours.connect_us,
            "nothing attached",
            floor_connect,
        );
        let find = |tool: Tool| self.results.iter().find(|results| results.tool == tool);
        if let Some(contained) = find(Tool::SentinelContained) {
            let contained = figures(contained);
            let mut floors = vec![("Sentinel, count only", figures(sentinel))];
            if let Some(count) = find(Tool::BpftraceCount) {
                floors.push((count.tool.label(), figures(count)));
            }
            for (floor, theirs) in floors {
                summary.compare(
                    SECTION,
                    "kernel cost per exec, exec.allow of 50 (BPF stats)",
                    "ns",
                    contained.kernel_ns_per_exec,
                    floor,
                    theirs.kernel_ns_per_exec,
                );
                summary.compare(
                    SECTION,
                    "µs per exec, exec.allow of 50 (wall, median)",
                    "µs",
                    contained.exec_us,
                    floor,
                    theirs.exec_us,
                );
            }
        }
        for results in self.results {
            let theirs = figures(results);
            raw.insert(results.tool.label().into(), theirs.to_json());
            if results.tool.is_sentinel() {
                continue;
            }
            let peer = results.tool.label();
            summary.compare(
                SECTION,
                "kernel cost per exec (BPF stats)",
                "ns",
                ours.kernel_ns_per_exec,
                peer,
                theirs.kernel_ns_per_exec,
            );
            summary.compare(
                SECTION,
                "kernel cost per connect (BPF stats)",
                "ns",
                ours.kernel_ns_per_connect,
                peer,
                theirs.kernel_ns_per_connect,
            );
            summary.compare(
                SECTION,
                "tool CPU per run",
                "s",
                ours.cpu_seconds_per_run,
                peer,
                theirs.cpu_seconds_per_run,
            );
            summary.compare(
                SECTION,
                "tool peak RSS",
                "MiB",
                ours.peak_rss_mib,
                peer,
                theirs.peak_rss_mib,
            );
        }
        summary.record("overhead", raw.into());
    }
}

/// One tool's figures for the summary and the results file.
struct ToolFigures {
    exec_us: f64,
    connect_us: f64,
    exec_overhead: f64,
    connect_overhead: f64,
    kernel_ns_per_exec: f64,
    kernel_ns_per_connect: f64,
    cpu_seconds_per_run: f64,
    peak_rss_mib: f64,
}

impl ToolFigures {
    fn to_json(&self) -> serde_json::Value {
        json!({
            "exec_us": self.exec_us,
            "connect_us": self.connect_us,
            "exec_overhead_ratio": self.exec_overhead,
            "connect_overhead_ratio": self.connect_overhead,
            "kernel_ns_per_exec": self.kernel_ns_per_exec,
            "kernel_ns_per_connect": self.kernel_ns_per_connect,
            "cpu_seconds_per_run": self.cpu_seconds_per_run,
            "peak_rss_mib": self.peak_rss_mib,
        })
    }
}

/// Each program's counts summed over the runs (every run loads the programs afresh).
fn program_totals(runs: &[ToolRun]) -> Vec<ProgramCost> {
    let mut totals: Vec<ProgramCost> = Vec::new();
    for program in runs.iter().flat_map(|run| &run.programs) {
        match totals
            .iter_mut()
            .find(|total| total.name == program.name && total.target == program.target)
        {
            Some(total) => {
                total.run_count += program.run_count;
                total.run_time_ns += program.run_time_ns;
            }
            None => totals.push(program.clone()),
        }
    }
    totals
}

fn median_of(values: &[LoopTimes], measure: Measure) -> f64 {
    let values: Vec<f64> = values.iter().map(measure).collect();
    median(&values)
}

pub(super) fn median(values: &[f64]) -> f64 {
    percentile(values, 0.5)
}

/// Linear interpolation between the nearest ranks; NaN for no values.
fn percentile(values: &[f64], fraction: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let Some(last) = sorted.len().checked_sub(1) else {
        return f64::NAN;
    };
    let rank = fraction * last as f64;
    let (low, high) = (rank.floor() as usize, rank.ceil() as usize);
    sorted[low] + (sorted[high] - sorted[low]) * (rank - low as f64)
}

/// "+0.8 % (1.008x)"
fn overhead(ratio: f64) -> String {
    format!("{:+.1} % ({ratio:.3}x)", (ratio - 1.0) * 100.0)
}

/// "wall +1.4 % (NOT met), CPU +0.6 % (met)"
fn verdicts(results: &ToolResults, wall: Measure, cpu: Measure, target: f64) -> String {
    let verdict = |measure| {
        let percent = (results.overhead(measure) - 1.0) * 100.0;
        let met = if percent <= target { "met" } else { "NOT met" };
        format!("{percent:+.1} % ({met})")
    };
    format!("wall {}, CPU {}", verdict(wall), verdict(cpu))
}

pub(super) fn mebibytes(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_between_ranks() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(percentile(&[1.0, 2.0, 3.0, 4.0, 5.0], 0.25), 2.0);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn overhead_reads_as_percent_and_factor() {
        assert_eq!(overhead(1.008), "+0.8 % (1.008x)");
        assert_eq!(overhead(0.995), "-0.5 % (0.995x)");
    }
}
