//! What Sentinel needs from the running kernel: privileges, BTF and struct offsets.

mod batch;
mod btf;
mod iterator;

pub use batch::PerCpuBatchReader;
pub use btf::Btf;
pub use iterator::{CgroupIterator, MAX_WALKS, Walked, link_statistics_flush};
use sentinel_common::KernelOffsets;
use tracing::{info, warn};

use crate::Error;

/// Fails with a clear error when this process cannot load tracing eBPF programs.
pub fn check_privileges() -> Result<(), Error> {
    if nix::unistd::geteuid().is_root() {
        return Ok(());
    }
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_PERFMON: u32 = 38;
    const CAP_BPF: u32 = 39;
    let status = std::fs::read_to_string("/proc/self/status")?;
    let effective = status
        .lines()
        .find_map(|line| line.strip_prefix("CapEff:"))
        .and_then(|hex| u64::from_str_radix(hex.trim(), 16).ok())
        .unwrap_or(0);
    let has = |cap: u32| effective & (1 << cap) != 0;
    if has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON)) {
        Ok(())
    } else {
        Err(Error::NotPrivileged)
    }
}

/// Kernels before 5.11 charge eBPF memory to RLIMIT_MEMLOCK; later ones to the memory cgroup,
/// so a failure here only matters on old kernels.
pub fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &unlimited) } != 0 {
        warn!(
            "could not raise RLIMIT_MEMLOCK ({}); fine on kernels >= 5.11",
            std::io::Error::last_os_error()
        );
    }
}

/// Raises the soft limit on open files to the hard limit, so that the daemon does not depend
/// on its unit file for it: the soft limit is often 1024 (kept low for select(2) users), and
/// Sentinel needs descriptors for its eBPF objects, connections, cgroup files, pidfds and nft.
pub fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        warn!(
            "cannot read the open-file limit: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    if limit.rlim_cur >= limit.rlim_max {
        info!(
            limit = limit.rlim_cur,
            "the open-file limit is already at its hard limit"
        );
        return;
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        rlim_max: limit.rlim_max,
    };
    // SAFETY: plain syscall with a valid pointer.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } == 0 {
        info!(
            from = limit.rlim_cur,
            to = limit.rlim_max,
            "raised the open-file limit to its hard limit"
        );
    } else {
        warn!(
            limit = limit.rlim_cur,
            "cannot raise the open-file limit: {}",
            std::io::Error::last_os_error()
        );
    }
}

/// Hands memory freed by start-up work back to the kernel, so the daemon's resident size
/// reflects what it keeps, not what it once parsed.
pub fn release_freed_memory() {
    // SAFETY: glibc call without preconditions.
    unsafe { libc::malloc_trim(0) };
}

/// What `resolve_offsets` reports missing on kernels whose `tcp_send_reset` has no reason.
pub const TCP_SEND_RESET_REASON: &str = "tcp_send_reset's reason argument";

/// The kernel function a cgroup iterator program attaches to.
pub const CGROUP_ITERATOR_FUNCTION: &str = "bpf_iter_cgroup";

/// The kfuncs that sum up a cgroup subtree's statistics: from Linux 6.16, and before.
const STATISTICS_FLUSH_FUNCTIONS: [&str; 2] = ["css_rstat_flush", "cgroup_rstat_flush"];

/// Struct offsets for the eBPF programs, and the `type.member` names this kernel lacks.
pub struct ResolvedOffsets {
    pub offsets: KernelOffsets,
    pub missing: Vec<String>,
    /// The type id of the kernel function cgroup iterators attach to (Linux 6.1 and later).
    pub cgroup_iterator: Option<u32>,
    /// The type id of the kernel's cgroup statistics flush, a kfunc (Linux 6.1 and later).
    pub statistics_flush: Option<u32>,
}

pub fn resolve_offsets(btf: &Btf) -> ResolvedOffsets {
    let mut missing = Vec::new();
    let mut field = |ty: &str, path: &str| {
        btf.member_offset(ty, path).unwrap_or_else(|_| {
            missing.push(format!("{ty}.{path}"));
            0
        })
    };
    let mut offsets = KernelOffsets {
        ready: 1,
        mark_victim_has_task: 0,
        task_pid: field("task_struct", "pid"),
        task_tgid: field("task_struct", "tgid"),
        task_real_parent: field("task_struct", "real_parent"),
        task_comm: field("task_struct", "comm"),
        task_cgroups: field("task_struct", "cgroups"),
        css_set_dfl_cgrp: field("css_set", "dfl_cgrp"),
        cgroup_kn: field("cgroup", "kn"),
        cgroup_root: field("cgroup", "root"),
        cgroup_root_hierarchy_id: field("cgroup_root", "hierarchy_id"),
        kernfs_node_id: field("kernfs_node", "id"),
        binprm_filename: field("linux_binprm", "filename"),
        sock_family: field("sock", "__sk_common.skc_family"),
        sock_num: field("sock", "__sk_common.skc_num"),
        sock_dport: field("sock", "__sk_common.skc_dport"),
        sock_daddr: field("sock", "__sk_common.skc_daddr"),
        sock_rcv_saddr: field("sock", "__sk_common.skc_rcv_saddr"),
        sock_v6_daddr: field("sock", "__sk_common.skc_v6_daddr"),
        sock_v6_rcv_saddr: field("sock", "__sk_common.skc_v6_rcv_saddr"),
        sock_cgroup: field("sock", "sk_cgrp_data.cgroup"),
        task_mm: field("task_struct", "mm"),
        mm_exe_file: field("mm_struct", "exe_file"),
        file_inode: field("file", "f_inode"),
        inode_ino: field("inode", "i_ino"),
        binprm_file: field("linux_binprm", "file"),
        inode_sb: field("inode", "i_sb"),
        super_block_dev: field("super_block", "s_dev"),
        skb_head: field("sk_buff", "head"),
        skb_network_header: field("sk_buff", "network_header"),
        skb_transport_header: field("sk_buff", "transport_header"),
        skb_dev: field("sk_buff", "dev"),
        net_device_net: field("net_device", "nd_net.net"),
        net_inum: field("net", "ns.inum"),
        cgroup_subsys: field("cgroup", "subsys"),
        cgroup_cpu_usage: field("cgroup", "bstat.cputime.sum_exec_runtime"),
        // Filled in below.
        ..KernelOffsets::default()
    };
    // A controller's figures, from the `cgroup_subsys_state` the cgroup points at, which is
    // a member of the controller's own struct.
    let mut from_state =
        |ty: &str, path: &str| match (btf.member_offset(ty, "css"), btf.member_offset(ty, path)) {
            (Ok(state), Ok(figure)) if figure >= state => figure - state,
            _ => {
                missing.push(format!("{ty}.{path}"));
                0
            }
        };
    offsets.memcg_usage = from_state("mem_cgroup", "memory.usage");
    offsets.memcg_max = from_state("mem_cgroup", "memory.max");
    offsets.pids_counter = from_state("pids_cgroup", "counter");
    offsets.cpu_throttled_time = from_state("task_group", "cfs_bandwidth.throttled_time");
    offsets.cpu_throttled_periods = from_state("task_group", "cfs_bandwidth.nr_throttled");
    for (id, name) in [
        (&mut offsets.memory_subsys_id, "memory_cgrp_id"),
        (&mut offsets.pids_subsys_id, "pids_cgrp_id"),
        (&mut offsets.cpu_subsys_id, "cpu_cgrp_id"),
    ] {
        match btf.enum_value("cgroup_subsys_id", name) {
            Ok(value) => *id = value,
            Err(_) => missing.push(format!("cgroup_subsys_id.{name}")),
        }
    }
    match btf.tracepoint_param_is_pointer("mark_victim", 0) {
        Ok(has_task) => offsets.mark_victim_has_task = u32::from(has_task),
        Err(_) => missing.push("btf_trace_mark_victim".into()),
    }
    // Kernels before 6.10 pass no reason, and report only resets that have a socket.
    if btf
        .tracepoint_param_is_pointer("tcp_send_reset", 2)
        .is_err()
    {
        missing.push(TCP_SEND_RESET_REASON.into());
    }
    let cgroup_iterator = btf.function_id(CGROUP_ITERATOR_FUNCTION).ok();
    if cgroup_iterator.is_none() {
        missing.push(format!("function {CGROUP_ITERATOR_FUNCTION}"));
    }
    let statistics_flush = STATISTICS_FLUSH_FUNCTIONS
        .iter()
        .find_map(|name| btf.function_id(name).ok());
    ResolvedOffsets {
        offsets,
        missing,
        cgroup_iterator,
        statistics_flush,
    }
}
