//! Loading the eBPF object and attaching its programs, each independently: a program the
//! kernel refuses is logged and reported, and the others keep running.

use aya::{Ebpf, EbpfLoader, programs::RawTracePoint};
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
    /// The raw tracepoint it attaches to.
    tracepoint: &'static str,
    /// Kernel BTF fields the program reads; without them it is not attached.
    needs: &'static [&'static str],
}

const CGROUP_ID_FIELDS: [&str; 2] = ["cgroup.kn", "kernfs_node.id"];

const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        name: "exec",
        program: "sentinel_exec",
        tracepoint: "sched_process_exec",
        needs: &[
            "task_struct.real_parent",
            "task_struct.tgid",
            "linux_binprm.filename",
        ],
    },
    ProbeSpec {
        name: "tcp_state",
        program: "sentinel_tcp",
        tracepoint: "inet_sock_set_state",
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
        tracepoint: "mark_victim",
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
        tracepoint: "signal_generate",
        needs: &["task_struct.pid"],
    },
    ProbeSpec {
        name: "cgroup_mkdir",
        program: "sentinel_cgmk",
        tracepoint: "cgroup_mkdir",
        needs: &[
            "cgroup.root",
            "cgroup_root.hierarchy_id",
            CGROUP_ID_FIELDS[0],
            CGROUP_ID_FIELDS[1],
        ],
    },
    ProbeSpec {
        name: "cgroup_rmdir",
        program: "sentinel_cgrm",
        tracepoint: "cgroup_rmdir",
        needs: &[
            "cgroup.root",
            "cgroup_root.hierarchy_id",
            CGROUP_ID_FIELDS[0],
            CGROUP_ID_FIELDS[1],
        ],
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
                Ok(()) => info!(
                    probe = spec.name,
                    tracepoint = spec.tracepoint,
                    "probe attached"
                ),
                Err(reason) => warn!(
                    probe = spec.name,
                    tracepoint = spec.tracepoint,
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
    let program: &mut RawTracePoint = ebpf
        .program_mut(spec.program)
        .ok_or_else(|| format!("program {} missing from the eBPF object", spec.program))?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load()
        .map_err(|e| format!("the verifier refused it: {e}"))?;
    let tracepoint = if fault == Some(spec.name) {
        "sentinel_fault_injected"
    } else {
        spec.tracepoint
    };
    program
        .attach(tracepoint)
        .map_err(|e| format!("attaching to {tracepoint} failed: {e}"))?;
    Ok(())
}
