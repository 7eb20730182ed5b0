//! Containment: a process in a contained cgroup executes a file its policy does not allow.
//!
//! Called from the exec program at `sched_process_exec`, when the task already runs the new
//! image but has not executed its first instruction. The file checked is the one the kernel
//! runs (`bprm->file`): for a `#!` script that is its interpreter, since the script itself is
//! only the interpreter's input. Files are named by device and inode, which a path, a symlink
//! or a rename cannot fake; the daemon keeps the allowed inodes current across upgrades.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
        bpf_send_signal,
    },
    macros::map,
    maps::HashMap,
};
use sentinel_common::{
    AllowedExecutable, ContainedCgroup, EventKind, ExecViolationEvent, LossKind,
    MAX_ALLOWED_EXECUTABLES, MAX_CONTAINED_CGROUPS,
};

use crate::{
    kernel::{offset, read},
    maps::{ALERTS, record_loss},
};

const SIGKILL: u32 = 9;

/// Contained cgroups by cgroup v2 id, kept by the daemon.
#[map]
static CONTAINED_CGROUPS: HashMap<u64, ContainedCgroup> =
    HashMap::with_max_entries(MAX_CONTAINED_CGROUPS, 0);

/// The allow lists of every containment policy, kept by the daemon.
#[map]
static EXEC_ALLOWED: HashMap<AllowedExecutable, u8> =
    HashMap::with_max_entries(MAX_ALLOWED_EXECUTABLES, 0);

/// Checks the exec of `bprm` by the current task, in cgroup `cgroup_id`.
#[inline(always)]
pub fn check_exec(bprm: *const u8, cgroup_id: u64) {
    // SAFETY: map lookup; the value is copied out.
    let Some(contained) = (unsafe { CONTAINED_CGROUPS.get(cgroup_id) }).copied() else {
        return;
    };
    // A file that cannot be identified is on no list: it counts as a violation.
    let (dev, ino) = executed_file(bprm).unwrap_or((0, 0));
    let key = AllowedExecutable {
        policy: contained.policy,
        _pad: 0,
        dev,
        ino,
    };
    // SAFETY: map lookup; only presence is used.
    if unsafe { EXEC_ALLOWED.get(key) }.is_some() {
        return;
    }
    // The signal is delivered on the way back to user space: the new image never runs.
    // SAFETY: helper acting on the current task.
    let killed = contained.kill != 0 && unsafe { bpf_send_signal(SIGKILL) } == 0;
    report(bprm, cgroup_id, &contained, dev, ino, killed);
}

/// `bprm->file->f_inode`: its superblock's device and its inode number.
#[inline(always)]
fn executed_file(bprm: *const u8) -> Result<(u64, u64), i32> {
    let file: *const u8 = read(bprm, offset!(binprm_file))?;
    let inode: *const u8 = read(file, offset!(file_inode))?;
    let ino: u64 = read(inode, offset!(inode_ino))?;
    let super_block: *const u8 = read(inode, offset!(inode_sb))?;
    let dev: u32 = read(super_block, offset!(super_block_dev))?;
    Ok((u64::from(dev), ino))
}

#[inline(always)]
fn report(
    bprm: *const u8,
    cgroup_id: u64,
    contained: &ContainedCgroup,
    dev: u64,
    ino: u64,
    killed: bool,
) {
    let Some(mut entry) = ALERTS.reserve::<ExecViolationEvent>(0) else {
        record_loss(LossKind::ExecViolation);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record; every field
    // is written before submit.
    unsafe {
        (*event).kind = EventKind::ExecViolation as u32;
        (*event).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*event).cgroup_id = cgroup_id;
        (*event).policy = contained.policy;
        (*event).killed = u32::from(killed);
        (*event).dev = dev;
        (*event).ino = ino;
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).filename[0] = 0;
        if let Ok(filename) = read::<*const u8>(bprm, offset!(binprm_filename)) {
            let _ = bpf_probe_read_kernel_str_bytes(filename, &mut (*event).filename);
        }
    }
    entry.submit(0);
}
