//! Loading the eBPF object and attaching its programs, each independently: a program the
//! kernel refuses is logged and reported, and the others keep running.

use aya::{
    Ebpf, EbpfLoader,
    programs::{RawTracePoint, UProbe, uprobe::UProbeScope},
};
use tracing::{info, warn};

use crate::{Error, kernel::ResolvedOffsets};

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

#[derive(Clone, Copy)]
enum AttachPoint {
    RawTracepoint(&'static str),
    /// A function of a shared library, in every process that maps it. The library is found
    /// the way the dynamic loader finds it (the ld.so cache), for every sshd flavour alike.
    Uprobe {
        library: &'static str,
        function: &'static str,
    },
}

impl std::fmt::Display for AttachPoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::RawTracepoint(name) => write!(f, "tracepoint {name}"),
            Self::Uprobe { library, function } => write!(f, "{library}:{function}"),
        }
    }
}

/// Resolved through the ld.so cache, as the dynamic loader resolves sshd's `libpam.so.0`.
const LIBPAM: &str = "libpam";

const CGROUP_ID_FIELDS: [&str; 2] = ["cgroup.kn", "kernfs_node.id"];
const CGROUP_LIFECYCLE_FIELDS: [&str; 4] = [
    "cgroup.root",
    "cgroup_root.hierarchy_id",
    CGROUP_ID_FIELDS[0],
    CGROUP_ID_FIELDS[1],
];

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
        name: "ssh_pam_rhost",
        program: "sentinel_pam_rh",
        points: &[AttachPoint::Uprobe {
            library: LIBPAM,
            function: "pam_set_item",
        }],
        needs: &[],
    },
    ProbeSpec {
        name: "ssh_pam_call",
        program: "sentinel_pam_in",
        points: &[
            AttachPoint::Uprobe {
                library: LIBPAM,
                function: "pam_authenticate",
            },
            AttachPoint::Uprobe {
                library: LIBPAM,
                function: "pam_open_session",
            },
        ],
        needs: &[],
    },
    ProbeSpec {
        name: "ssh_auth_result",
        program: "sentinel_pam_rc",
        points: &[AttachPoint::Uprobe {
            library: LIBPAM,
            function: "pam_authenticate",
        }],
        needs: &[],
    },
    ProbeSpec {
        name: "ssh_session_open",
        program: "sentinel_pam_so",
        points: &[AttachPoint::Uprobe {
            library: LIBPAM,
            function: "pam_open_session",
        }],
        needs: &[],
    },
];

#[derive(Debug, Clone)]
pub struct ProbeStatus {
    pub name: &'static str,
    pub attached: bool,
}

/// The loaded object; dropping it detaches every program.
pub struct Probes {
    pub ebpf: Ebpf,
    pub statuses: Vec<ProbeStatus>,
}

pub fn load(resolved: &ResolvedOffsets) -> Result<Probes, Error> {
    let mut ebpf = EbpfLoader::new()
        .override_global("OFFSETS", &resolved.offsets, true)
        .load(aya::include_bytes_aligned!(concat!(
            env!("OUT_DIR"),
            "/sentinel"
        )))?;
    let fault = std::env::var(FAULT_INJECTION_ENV).ok();
    let statuses = PROBES
        .iter()
        .filter(|spec| {
            // The signal hook only stands in for kernels whose mark_victim lacks the task.
            spec.name != "oom_kill_signal" || resolved.offsets.mark_victim_has_task == 0
        })
        .map(|spec| {
            let result = attach(&mut ebpf, spec, resolved, fault.as_deref());
            match &result {
                Ok(()) => info!(probe = spec.name, "probe attached"),
                Err(reason) => warn!(
                    probe = spec.name,
                    "probe not attached: {reason}; its events will be missing"
                ),
            }
            ProbeStatus {
                name: spec.name,
                attached: result.is_ok(),
            }
        })
        .collect();
    Ok(Probes { ebpf, statuses })
}

fn attach(
    ebpf: &mut Ebpf,
    spec: &ProbeSpec,
    resolved: &ResolvedOffsets,
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
            (true, AttachPoint::Uprobe { library, .. }) => AttachPoint::Uprobe {
                library,
                function: "sentinel_fault_injected",
            },
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
            AttachPoint::Uprobe { library, function } => {
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
