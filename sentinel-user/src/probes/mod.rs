//! Loading the eBPF object and attaching its programs, each independently: a program the
//! kernel refuses is logged and reported, and the others keep running.

mod ssh;

use std::{borrow::Cow, path::Path};

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, UProbe, uprobe::UProbeScope},
};
use prometheus_client::{
    metrics::{counter::Counter, family::Family, gauge::Gauge},
    registry::Registry,
};
use sentinel_common::{EventRecords, ScanTarget};
use tokio::sync::watch;
use tracing::{info, warn};

pub use self::ssh::{DEFAULT_SSHD_PATHS, SshFiles};
use crate::{
    Error,
    kernel::{CgroupIterator, ResolvedOffsets, link_statistics_flush},
};

/// Set to a probe's name to make its attachment fail, so that tests can prove a failed probe
/// does not take the others down.
pub const FAULT_INJECTION_ENV: &str = "SENTINEL_FAULT_INJECT_PROBE";

struct ProbeSpec {
    /// The `program` label of `sentinel_probe_attached`.
    name: &'static str,
    /// The eBPF function in `sentinel-ebpf`.
    program: &'static str,
    /// Where it attaches; every point must attach for the probe to count as attached.
    points: &'static [AttachPoint],
    /// Kernel BTF fields the program reads; without them it is not attached.
    needs: &'static [&'static str],
}

impl ProbeSpec {
    fn uses_libpam(&self) -> bool {
        self.points
            .iter()
            .any(|point| matches!(point, AttachPoint::Libpam(_)))
    }
}

#[derive(Clone, Copy)]
enum AttachPoint {
    RawTracepoint(&'static str),
    /// A function of libpam, in every process that maps it (see `ssh`).
    Libpam(&'static str),
}

impl std::fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RawTracepoint(name) => write!(f, "tracepoint {name}"),
            Self::Libpam(function) => write!(f, "libpam:{function}"),
        }
    }
}

/// What the SSH programs read to tell the real sshd (see `ssh`).
const SSHD_FIELDS: [&str; 4] = [
    "task_struct.mm",
    "mm_struct.exe_file",
    "file.f_inode",
    "inode.i_ino",
];

const CGROUP_ID_FIELDS: [&str; 2] = ["cgroup.kn", "kernfs_node.id"];

/// What the cgroup iterator reads, and the name that makes its attachment fail in tests.
const CGROUP_FIGURES_FIELDS: [&str; 12] = [
    CGROUP_ID_FIELDS[0],
    CGROUP_ID_FIELDS[1],
    "cgroup.subsys",
    "cgroup.bstat.cputime.sum_exec_runtime",
    "mem_cgroup.memory.usage",
    "mem_cgroup.memory.max",
    "pids_cgroup.counter",
    "task_group.cfs_bandwidth.throttled_time",
    "task_group.cfs_bandwidth.nr_throttled",
    "cgroup_subsys_id.memory_cgrp_id",
    "cgroup_subsys_id.pids_cgrp_id",
    "cgroup_subsys_id.cpu_cgrp_id",
];
const CGROUP_FIGURES: &str = "cgroup_figures";
const CGROUP_LIFECYCLE_FIELDS: [&str; 4] = [
    "cgroup.root",
    "cgroup_root.hierarchy_id",
    CGROUP_ID_FIELDS[0],
    CGROUP_ID_FIELDS[1],
];

/// Closed-port hits; only attached when `port_scan` is configured.
const PORT_SCAN_PROBE: &str = "port_scan";

const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "exec",
        program: "sentinel_exec",
        points: &[AttachPoint::RawTracepoint("sched_process_exec")],
        needs: &[
            "task_struct.real_parent",
            "task_struct.tgid",
            "linux_binprm.filename",
        ],
    },
    ProbeSpec {
        name: "tcp_state",
        program: "sentinel_tcp",
        points: &[AttachPoint::RawTracepoint("inet_sock_set_state")],
        needs: &[
            "sock.sk_cgrp_data.cgroup",
            "sock.__sk_common.skc_family",
            "sock.__sk_common.skc_num",
            "sock.__sk_common.skc_dport",
            "sock.__sk_common.skc_daddr",
            "sock.__sk_common.skc_rcv_saddr",
            "sock.__sk_common.skc_v6_daddr",
            "sock.__sk_common.skc_v6_rcv_saddr",
            CGROUP_ID_FIELDS[0],
            CGROUP_ID_FIELDS[1],
        ],
    },
    ProbeSpec {
        name: "oom_kill",
        program: "sentinel_oom",
        points: &[AttachPoint::RawTracepoint("mark_victim")],
        needs: &[
            "btf_trace_mark_victim",
            "task_struct.tgid",
            "task_struct.comm",
            "task_struct.cgroups",
            "css_set.dfl_cgrp",
            CGROUP_ID_FIELDS[0],
            CGROUP_ID_FIELDS[1],
        ],
    },
    ProbeSpec {
        name: "oom_kill_signal",
        program: "sentinel_kill",
        points: &[AttachPoint::RawTracepoint("signal_generate")],
        needs: &["task_struct.pid"],
    },
    ProbeSpec {
        name: "cgroup_mkdir",
        program: "sentinel_cgmk",
        points: &[AttachPoint::RawTracepoint("cgroup_mkdir")],
        needs: &CGROUP_LIFECYCLE_FIELDS,
    },
    ProbeSpec {
        name: "cgroup_rmdir",
        program: "sentinel_cgrm",
        points: &[AttachPoint::RawTracepoint("cgroup_rmdir")],
        needs: &CGROUP_LIFECYCLE_FIELDS,
    },
    ProbeSpec {
        name: PORT_SCAN_PROBE,
        program: "sentinel_scan",
        points: &[AttachPoint::RawTracepoint("tcp_send_reset")],
        needs: &[
            crate::kernel::TCP_SEND_RESET_REASON,
            "sk_buff.head",
            "sk_buff.network_header",
            "sk_buff.transport_header",
            "sk_buff.dev",
            "net_device.nd_net.net",
            "net.ns.inum",
        ],
    },
    ProbeSpec {
        name: "ssh_pam_rhost",
        program: "sentinel_pam_rh",
        points: &[AttachPoint::Libpam("pam_set_item")],
        needs: &SSHD_FIELDS,
    },
    ProbeSpec {
        name: "ssh_pam_call",
        program: "sentinel_pam_in",
        points: &[
            AttachPoint::Libpam("pam_authenticate"),
            AttachPoint::Libpam("pam_open_session"),
        ],
        needs: &SSHD_FIELDS,
    },
    ProbeSpec {
        name: "ssh_auth_result",
        program: "sentinel_pam_rc",
        points: &[AttachPoint::Libpam("pam_authenticate")],
        needs: &SSHD_FIELDS,
    },
    ProbeSpec {
        name: "ssh_session_open",
        program: "sentinel_pam_so",
        points: &[AttachPoint::Libpam("pam_open_session")],
        needs: &SSHD_FIELDS,
    },
    ProbeSpec {
        name: "ssh_preauth_end",
        program: "sentinel_sshd_exit",
        points: &[AttachPoint::RawTracepoint("sched_process_exit")],
        needs: &[],
    },
];

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ProbeStatus {
    pub name: Cow<'static, str>,
    pub attached: bool,
    /// Whether this host has what the probe watches: the SSH probes are not wanted where
    /// there is no libpam (no sshd to guard), and their alert must stay quiet there.
    pub wanted: bool,
    /// Why it is not attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

type Labels = Vec<(&'static str, String)>;

/// The loaded object; dropping it detaches every program.
pub struct Probes {
    pub ebpf: Ebpf,
    statuses: watch::Sender<Vec<ProbeStatus>>,
    offsets: ResolvedOffsets,
    /// libpam's path and the inode its uprobes are attached to.
    /// Whether the cgroup iterator's first walk of a pass sums up the kernel's CPU figures.
    statistics_flush: bool,
    libpam: Option<(std::path::PathBuf, Option<u64>)>,
    attached: Family<Labels, Gauge>,
    wanted: Family<Labels, Gauge>,
    reattached: Counter,
}

/// The eBPF object, as built.
pub(crate) static OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sentinel"));

/// An eBPF loader without the kernel BTF that making one parses.
pub struct Loader(EbpfLoader<'static>);

impl Loader {
    /// Makes the loader. aya parses the kernel's BTF here (about 18 MB at its peak) for CO-RE
    /// relocations, which Rust eBPF objects do not have: the daemon hands the programs their
    /// offsets instead. So the parse is dropped at once, and the daemon makes the loader first,
    /// while it holds little else, to keep its peak memory low.
    pub fn without_kernel_btf() -> Self {
        let mut loader = EbpfLoader::new();
        loader.btf(None);
        crate::kernel::release_freed_memory();
        Self(loader)
    }
}

/// Loads the object with the kernel's offsets, the per-event `records` the daemon reads and
/// the network namespace whose closed ports are watched (`None`: no port-scan detection).
pub fn load(
    Loader(mut loader): Loader,
    resolved: ResolvedOffsets,
    records: EventRecords,
    scan: Option<ScanTarget>,
) -> Result<Probes, Error> {
    if records == EventRecords::default() {
        // Only exec and TCP records go to EVENTS: unread, it needs no room. Its pages are
        // mapped into the daemon, so its size is resident memory.
        loader.map_max_entries("EVENTS", page_size());
    }
    if scan.is_none() {
        loader.map_max_entries("SCAN_EVENTS", page_size());
    }
    let mut object = OBJECT.to_vec();
    let statistics_flush = link_statistics_flush(&mut object, resolved.statistics_flush);
    let mut ebpf = loader
        .override_global("OFFSETS", &resolved.offsets, true)
        .override_global("RECORDS", &records, true)
        .override_global("SCAN_TARGET", &scan.unwrap_or_default(), true)
        .load(&object)?;
    drop(object);
    crate::kernel::release_freed_memory();
    let libpam = ssh::find_libpam();
    if libpam.is_none() {
        warn!("libpam is not in the dynamic loader's cache (ldconfig -p): no SSH detection");
    }
    let libpam_inode = libpam.as_deref().and_then(ssh::inode);
    let fault = std::env::var(FAULT_INJECTION_ENV).ok();
    let statuses = PROBES
        .iter()
        .filter(|spec| {
            // The signal hook only stands in for kernels whose mark_victim lacks the task.
            (spec.name != "oom_kill_signal" || resolved.offsets.mark_victim_has_task == 0)
                && (spec.name != PORT_SCAN_PROBE || scan.is_some())
        })
        .map(|spec| {
            let result = attach(
                &mut ebpf,
                spec,
                &resolved,
                libpam.as_deref(),
                fault.as_deref(),
            );
            match &result {
                Ok(()) => info!(probe = spec.name, "probe attached"),
                Err(reason) => warn!(
                    probe = spec.name,
                    "probe not attached: {reason}; its events will be missing"
                ),
            }
            ProbeStatus {
                name: Cow::Borrowed(spec.name),
                attached: result.is_ok(),
                wanted: libpam.is_some() || !spec.uses_libpam(),
                reason: result.err(),
            }
        })
        .collect::<Vec<_>>();
    let attached = Family::<Labels, Gauge>::default();
    let wanted = Family::<Labels, Gauge>::default();
    for status in &statuses {
        set_gauges(&attached, &wanted, status);
    }
    Ok(Probes {
        ebpf,
        statuses: watch::Sender::new(statuses),
        offsets: resolved,
        statistics_flush,
        libpam: libpam.map(|path| (path, libpam_inode)),
        attached,
        wanted,
        reattached: Counter::default(),
    })
}

/// `sentinel_probe_attached` and `sentinel_probe_wanted` of one probe.
fn set_gauges(
    attached: &Family<Labels, Gauge>,
    wanted: &Family<Labels, Gauge>,
    status: &ProbeStatus,
) {
    let program = vec![("program", status.name.to_string())];
    attached
        .get_or_create(&program)
        .set(i64::from(status.attached));
    wanted.get_or_create(&program).set(i64::from(status.wanted));
}

/// The smallest ring buffer the kernel makes.
fn page_size() -> u32 {
    // SAFETY: sysconf without preconditions.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    u32::try_from(size).unwrap_or(4096)
}

impl Probes {
    /// The cgroup iterator, attached to the hierarchy under `root`, for the resource figures;
    /// reported as the `cgroup_figures` probe, wanted where the kernel has cgroup iterators.
    /// `None`: the interface files have to be read instead, as the log says.
    pub fn cgroup_iterator(&mut self, root: &Path) -> Option<CgroupIterator> {
        let result = self.attach_cgroup_iterator(root);
        match &result {
            Ok(iterator) => info!(
                probe = CGROUP_FIGURES,
                "probe attached: resource figures come from the kernel's cgroup iterator, one \
                 walk per 512 cgroups; {}",
                if iterator.flushes_statistics() {
                    "the first walk of a pass sums up CPU time in the kernel"
                } else {
                    "CPU time is summed up by reading each top-level cgroup's cpu.stat"
                }
            ),
            Err(error) => warn!(
                probe = CGROUP_FIGURES,
                "{error}; resource figures are read from each service's interface files"
            ),
        }
        let status = ProbeStatus {
            name: Cow::Borrowed(CGROUP_FIGURES),
            attached: result.is_ok(),
            wanted: self.offsets.cgroup_iterator.is_some(),
            reason: result.as_ref().err().map(ToString::to_string),
        };
        set_gauges(&self.attached, &self.wanted, &status);
        self.statuses.send_modify(|statuses| statuses.push(status));
        result.ok()
    }

    fn attach_cgroup_iterator(&mut self, root: &Path) -> Result<CgroupIterator, Error> {
        let unavailable = |reason: String| Error::CgroupIterator(reason);
        if std::env::var(FAULT_INJECTION_ENV).is_ok_and(|fault| fault == CGROUP_FIGURES) {
            return Err(unavailable(
                "its attachment was made to fail (fault injection)".into(),
            ));
        }
        if let Some(field) = CGROUP_FIGURES_FIELDS
            .iter()
            .find(|field| self.offsets.missing.iter().any(|missing| missing == *field))
        {
            return Err(unavailable(format!("this kernel's BTF has no {field}")));
        }
        let function = self.offsets.cgroup_iterator.ok_or_else(|| {
            unavailable(format!(
                "this kernel has no {}",
                crate::kernel::CGROUP_ITERATOR_FUNCTION
            ))
        })?;
        let walk_state = self
            .ebpf
            .take_map("FIGURES_WALK")
            .ok_or_else(|| unavailable("the eBPF object has no FIGURES_WALK".into()))?
            .try_into()
            .map_err(|error: aya::maps::MapError| unavailable(error.to_string()))?;
        let program = self
            .ebpf
            .program_mut("sentinel_figures")
            .ok_or_else(|| unavailable("the eBPF object has no sentinel_figures".into()))?
            .try_into()
            .map_err(|error: aya::programs::ProgramError| unavailable(error.to_string()))?;
        CgroupIterator::attach(program, walk_state, function, root, self.statistics_flush)
    }

    /// Each probe, attached or not and why; republished when libpam's probes are re-attached.
    pub fn subscribe(&self) -> watch::Receiver<Vec<ProbeStatus>> {
        self.statuses.subscribe()
    }

    pub fn register_metrics(&self, registry: &mut Registry) {
        registry.register(
            "sentinel_probe_attached",
            "Whether an eBPF program is attached (1) or failed to attach (0)",
            self.attached.clone(),
        );
        registry.register(
            "sentinel_probe_wanted",
            "Whether this host has what the program watches (0: the SSH programs where there \
             is no libpam); the probe alert covers only wanted programs",
            self.wanted.clone(),
        );
        registry.register(
            "sentinel_probe_reattachments",
            "Times the libpam uprobes were attached again because the library was replaced",
            self.reattached.clone(),
        );
    }

    /// Attaches the libpam programs again when the library's file was replaced (a package
    /// upgrade writes a new file and renames it over the old one): uprobes belong to an inode,
    /// and processes started after the upgrade map the new one. The old attachments stay for
    /// the processes still mapping the old library.
    /// The libpam the SSH programs are attached to, when there is one.
    pub fn libpam_path(&self) -> Option<&std::path::PathBuf> {
        self.libpam.as_ref().map(|(path, _)| path)
    }

    pub fn follow_libpam(&mut self) {
        let Some((path, attached_inode)) = &self.libpam else {
            return;
        };
        let inode = ssh::inode(path);
        if inode.is_none() || inode == *attached_inode {
            return;
        }
        let path = path.clone();
        let fault = std::env::var(FAULT_INJECTION_ENV).ok();
        for spec in PROBES.iter().filter(|spec| {
            spec.points
                .iter()
                .any(|point| matches!(point, AttachPoint::Libpam(_)))
        }) {
            let result = attach(
                &mut self.ebpf,
                spec,
                &self.offsets,
                Some(&path),
                fault.as_deref(),
            );
            if let Err(reason) = &result {
                warn!(
                    probe = spec.name,
                    "probe not attached to the new libpam: {reason}"
                );
            }
            self.attached
                .get_or_create(&vec![("program", spec.name.to_string())])
                .set(i64::from(result.is_ok()));
            self.statuses.send_modify(|statuses| {
                if let Some(status) = statuses.iter_mut().find(|status| status.name == spec.name) {
                    status.attached = result.is_ok();
                    status.reason = result.err();
                }
            });
        }
        info!(library = %path.display(), "libpam was replaced; its probes are attached to the new file");
        self.reattached.inc();
        // A failed attempt is not retried until the file changes again; the gauge shows it.
        self.libpam = Some((path, inode));
    }
}

fn attach(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    resolved: &ResolvedOffsets,
    libpam: Option<&Path>,
    fault: Option<&str>,
) -> Result<(), String> {
    if let Some(field) = spec
        .needs
        .iter()
        .find(|f| resolved.missing.iter().any(|m| m == *f))
    {
        return Err(format!("this kernel's BTF has no {field}"));
    }
    let program = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", spec.program))?;
    for point in spec.points {
        // A fault-injected probe attaches to a point that does not exist.
        let point = match (fault == Some(spec.name), *point) {
            (false, point) => point,
            (true, AttachPoint::RawTracepoint(_)) => {
                AttachPoint::RawTracepoint("sentinel_fault_injected")
            }
            (true, AttachPoint::Libpam(_)) => AttachPoint::Libpam("sentinel_fault_injected"),
        };
        match point {
            AttachPoint::RawTracepoint(tracepoint) => {
                let program: &mut RawTracePoint = program.try_into().map_err(|e| format!("{e}"))?;
                if program.fd().is_err() {
                    program
                        .load()
                        .map_err(|e| format!("the verifier refused it: {e}"))?;
                }
                program
                    .attach(tracepoint)
                    .map_err(|e| format!("attaching to {point} failed: {e}"))?;
            }
            AttachPoint::Libpam(function) => {
                let library = libpam.ok_or("libpam is not in the dynamic loader's cache")?;
                let program: &mut UProbe = program.try_into().map_err(|e| format!("{e}"))?;
                if program.fd().is_err() {
                    program
                        .load()
                        .map_err(|e| format!("the verifier refused it: {e}"))?;
                }
                program
                    .attach(function, library, UProbeScope::AllProcesses)
                    .map_err(|e| format!("attaching to {point} failed: {e}"))?;
            }
        }
    }
    Ok(())
}
