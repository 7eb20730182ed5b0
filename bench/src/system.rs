//! Host state the bench reads or changes: sysctls, tracefs, and /proc.

use std::{
    collections::BTreeSet,
    fmt::{self, Display, Formatter},
    fs,
    path::Path,
    process::Command,
    thread::available_parallelism,
};

use anyhow::{Context, Result};
use serde_json::Value;

use crate::host::{command_output, run};

const TRACEFS: &str = "/sys/kernel/tracing";

/// A sysctl set to 1 while alive (`kernel.bpf_stats_enabled`, so the kernel times every BPF
/// program run; `net.netfilter.nf_log_all_netns`, so a `log` rule in a namespace other than the
/// first reaches the kernel log); the previous value comes back on drop.
pub struct Sysctl {
    name: &'static str,
    previous: String,
}

impl Sysctl {
    pub const BPF_STATS: &'static str = "kernel.bpf_stats_enabled";
    pub const NF_LOG_ALL_NETNS: &'static str = "net.netfilter.nf_log_all_netns";

    pub fn enable(name: &'static str) -> Result<Self> {
        let path = Self::path(name);
        let previous = fs::read_to_string(&path)
            .with_context(|| format!("cannot read {path}"))?
            .trim()
            .to_owned();
        fs::write(&path, "1").with_context(|| format!("cannot write 1 to {path}"))?;
        println!("[bench] {name}=1 (was {previous}; restored at the end)");
        Ok(Self { name, previous })
    }

    fn path(name: &str) -> String {
        format!("/proc/sys/{}", name.replace('.', "/"))
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        match fs::write(Self::path(self.name), &self.previous) {
            Ok(()) => println!("[bench] {}={} restored", self.name, self.previous),
            Err(error) => eprintln!(
                "[bench] WARNING: could not restore {}={}: {error}",
                self.name, self.previous
            ),
        }
    }
}

/// tracefs, mounted by the bench because bpftrace and BCC find tracepoints there; unmounted
/// on drop.
pub struct TracefsMount;

impl TracefsMount {
    /// `None` when tracefs is already mounted (and then stays so).
    pub fn mount_if_missing() -> Result<Option<Self>> {
        if Path::new(TRACEFS).join("events").is_dir() {
            return Ok(None);
        }
        run(Command::new("mount").args(["-t", "tracefs", "tracefs", TRACEFS]))
            .context("mounting tracefs failed")?;
        println!("[bench] mounted tracefs on {TRACEFS} (unmounted at the end)");
        Ok(Some(Self))
    }
}

impl Drop for TracefsMount {
    fn drop(&mut self) {
        if let Err(error) = run(Command::new("umount").arg(TRACEFS)) {
            eprintln!("[bench] WARNING: {error:#}");
        }
    }
}

/// Kernels built without CONFIG_KPROBES have no kprobe_events file in tracefs.
pub fn kernel_has_kprobes() -> bool {
    Path::new(TRACEFS).join("kprobe_events").exists()
}

pub use sentinel_tests::measure::{ProcessUsage, process_usage};

/// A BPF program attached by a process, from `bpftool perf show`.
#[derive(Debug, Clone)]
pub struct Attachment {
    pub pid: u32,
    pub program_id: u64,
    /// Tracepoint or kernel function.
    pub target: String,
}

/// Every tracepoint, raw tracepoint and kprobe attachment on the host.
pub fn attachments() -> Result<Vec<Attachment>> {
    let listing = bpftool(&["perf", "show"])?;
    Ok(listing
        .iter()
        .filter_map(|entry| {
            let target = entry["tracepoint"].as_str().or(entry["func"].as_str())?;
            Some(Attachment {
                pid: u32::try_from(entry["pid"].as_u64()?).ok()?,
                program_id: entry["prog_id"].as_u64()?,
                target: target.to_owned(),
            })
        })
        .collect())
}

/// The kernel's accounting of one program since it was loaded.
#[derive(Debug, Clone)]
pub struct ProgramCost {
    pub name: String,
    /// Where it is attached, or its program type where `bpftool perf show` does not say.
    pub target: String,
    pub run_count: u64,
    pub run_time_ns: u64,
}

/// Every BPF program `pid` holds, with the kernel's accounting since each was loaded.
pub fn program_costs(pid: u32) -> Result<Vec<ProgramCost>> {
    let attached = attachments()?;
    let programs = bpftool(&["prog", "show"])?;
    program_ids(pid)?
        .into_iter()
        .map(|id| {
            let program = programs
                .iter()
                .find(|program| program["id"].as_u64() == Some(id))
                .with_context(|| {
                    format!("program {id} of pid {pid} is not in `bpftool prog show`")
                })?;
            // `bpftool perf show` leaves out some links (Sentinel's uprobes, for one).
            let target = attached
                .iter()
                .find(|attachment| attachment.program_id == id)
                .map_or_else(
                    || format!("({} program)", program["type"].as_str().unwrap_or("?")),
                    |attachment| attachment.target.clone(),
                );
            // bpftool leaves the statistics out while they are zero.
            Ok(ProgramCost {
                name: program["name"].as_str().unwrap_or("?").to_owned(),
                target,
                run_count: program["run_cnt"].as_u64().unwrap_or(0),
                run_time_ns: program["run_time_ns"].as_u64().unwrap_or(0),
            })
        })
        .collect()
}

/// The programs behind `pid`'s descriptors: the fdinfo of a program or link names its program.
fn program_ids(pid: u32) -> Result<BTreeSet<u64>> {
    let dir = format!("/proc/{pid}/fdinfo");
    let mut ids = BTreeSet::new();
    for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {dir}"))? {
        // A descriptor closed since the listing has nothing to say.
        let Ok(info) = fs::read_to_string(entry?.path()) else {
            continue;
        };
        ids.extend(
            info.lines()
                .filter_map(|line| line.strip_prefix("prog_id:"))
                .filter_map(|id| id.trim().parse::<u64>().ok()),
        );
    }
    Ok(ids)
}

fn bpftool(args: &[&str]) -> Result<Vec<Value>> {
    let output = command_output(Command::new("bpftool").args(args).arg("--json"))?;
    let parsed: Value = serde_json::from_str(&output)
        .with_context(|| format!("`bpftool {}` printed invalid JSON", args.join(" ")))?;
    parsed
        .as_array()
        .cloned()
        .with_context(|| format!("`bpftool {}` did not print a JSON array", args.join(" ")))
}

/// What the reports say about the machine.
pub struct Machine {
    pub kernel: String,
    pub cpus: usize,
    pub cpu_model: String,
    pub os: String,
    pub virtual_machine: bool,
}

impl Machine {
    pub fn read() -> Result<Self> {
        let kernel = fs::read_to_string("/proc/sys/kernel/osrelease")
            .context("cannot read the kernel release")?
            .trim()
            .to_owned();
        let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
        let cpuinfo_field = |name: &str| {
            cpuinfo.lines().find_map(|line| {
                let (key, value) = line.split_once(':')?;
                (key.trim() == name).then(|| value.trim().to_owned())
            })
        };
        let os_release = fs::read_to_string("/etc/os-release").unwrap_or_default();
        let os = os_release
            .lines()
            .find_map(|line| line.strip_prefix("PRETTY_NAME="))
            .map_or_else(
                || "unknown OS".to_owned(),
                |name| name.trim_matches('"').to_owned(),
            );
        Ok(Self {
            kernel,
            cpus: available_parallelism().map_or(1, usize::from),
            cpu_model: cpuinfo_field("model name").unwrap_or_else(|| "unknown CPU".to_owned()),
            os,
            virtual_machine: cpuinfo_field("flags")
                .is_some_and(|flags| flags.split(' ').any(|flag| flag == "hypervisor")),
        })
    }
}

/// "Linux 6.1.0, 2 vCPUs (CPU model), virtual machine, Debian GNU/Linux 12 (bookworm)"
impl Display for Machine {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Linux {}, {} vCPUs ({}){}, {}",
            self.kernel,
            self.cpus,
            self.cpu_model,
            if self.virtual_machine {
                ", virtual machine"
            } else {
                ""
            },
            self.os
        )
    }
}
