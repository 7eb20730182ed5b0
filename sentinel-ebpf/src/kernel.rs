//! Reads of kernel structs at offsets the daemon found in the running kernel's BTF.

use aya_ebpf::helpers::bpf_probe_read_kernel;
use sentinel_common::KernelOffsets;

/// Filled in by the daemon before load (read-only data).
#[unsafe(no_mangle)]
pub static OFFSETS: KernelOffsets = KernelOffsets {
    ready: 0,
    mark_victim_has_task: 0,
    task_pid: 0,
    task_tgid: 0,
    task_real_parent: 0,
    task_comm: 0,
    task_cgroups: 0,
    css_set_dfl_cgrp: 0,
    cgroup_kn: 0,
    cgroup_root: 0,
    cgroup_root_hierarchy_id: 0,
    kernfs_node_id: 0,
    binprm_filename: 0,
    sock_family: 0,
    sock_num: 0,
    sock_dport: 0,
    sock_daddr: 0,
    sock_rcv_saddr: 0,
    sock_v6_daddr: 0,
    sock_v6_rcv_saddr: 0,
    sock_cgroup: 0,
    task_mm: 0,
    mm_exe_file: 0,
    file_inode: 0,
    inode_ino: 0,
    binprm_file: 0,
    inode_sb: 0,
    super_block_dev: 0,
    skb_head: 0,
    skb_network_header: 0,
    skb_transport_header: 0,
    skb_dev: 0,
    net_device_net: 0,
    net_inum: 0,
    cgroup_subsys: 0,
    memory_subsys_id: 0,
    pids_subsys_id: 0,
    cpu_subsys_id: 0,
    memcg_usage: 0,
    memcg_max: 0,
    pids_counter: 0,
    cpu_throttled_time: 0,
    cpu_throttled_periods: 0,
    cgroup_cpu_usage: 0,
};

/// One field of `OFFSETS`, read through a volatile load so the compiler cannot fold the zero
/// initialiser into the program.
macro_rules! offset {
    ($field:ident) => {
        $crate::kernel::read_volatile(&$crate::kernel::OFFSETS.$field)
    };
}
pub(crate) use offset;

#[inline(always)]
pub fn read_volatile(field: &u32) -> u32 {
    // SAFETY: `field` is a valid reference.
    unsafe { core::ptr::read_volatile(field) }
}

#[inline(always)]
pub fn offsets_ready() -> bool {
    offset!(ready) != 0
}

/// Reads a `T` at `base + offset` from kernel memory.
#[inline(always)]
pub fn read<T>(base: *const u8, offset: u32) -> Result<T, i32> {
    // SAFETY: bpf_probe_read_kernel validates the address; a bad one yields an error.
    unsafe { bpf_probe_read_kernel(base.wrapping_add(offset as usize).cast::<T>()) }
}

/// `task->cgroups->dfl_cgrp`, the task's cgroup v2.
#[inline(always)]
pub fn task_cgroup_id(task: *const u8) -> Result<u64, i32> {
    let css_set: *const u8 = read(task, offset!(task_cgroups))?;
    let cgroup: *const u8 = read(css_set, offset!(css_set_dfl_cgrp))?;
    cgroup_id(cgroup)
}

/// `task->mm->exe_file->f_inode->i_ino`: the inode of the executable `task` runs.
#[inline(always)]
pub fn task_executable_inode(task: *const u8) -> Result<u64, i32> {
    let mm: *const u8 = read(task, offset!(task_mm))?;
    let exe_file: *const u8 = read(mm, offset!(mm_exe_file))?;
    let inode: *const u8 = read(exe_file, offset!(file_inode))?;
    read(inode, offset!(inode_ino))
}

/// `cgroup->kn->id`, the id user space sees as the cgroup directory's inode number.
#[inline(always)]
pub fn cgroup_id(cgroup: *const u8) -> Result<u64, i32> {
    let kn: *const u8 = read(cgroup, offset!(cgroup_kn))?;
    read(kn, offset!(kernfs_node_id))
}
