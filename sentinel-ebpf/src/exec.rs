//! Process execution: `raw_tp/sched_process_exec`.

use aya_ebpf::{
    helpers::{
        bpf_get_current_cgroup_id, bpf_get_current_comm, bpf_get_current_pid_tgid,
        bpf_get_current_task, bpf_get_current_uid_gid, bpf_probe_read_kernel_str_bytes,
    },
    macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use sentinel_common::{EventKind, ExecEvent, LossKind};

use crate::{
    containment::check_exec,
    kernel::{offset, offsets_ready, read},
    maps::{EVENTS, count, events_wakeup_flags, exec_records_wanted, record_loss},
};

/// `TP_PROTO(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`; runs in the
/// context of the task that just exec'd.
#[raw_tracepoint(tracepoint = "sched_process_exec")]
pub fn sentinel_exec(ctx: RawTracePointContext) {
    if !offsets_ready() {
        return;
    }
    // SAFETY: helper without preconditions.
    let cgroup_id = unsafe { bpf_get_current_cgroup_id() };
    count(cgroup_id, |counters| counters.execs += 1);
    let bprm: *const u8 = ctx.arg(2);
    check_exec(bprm, cgroup_id);
    if !exec_records_wanted() {
        return;
    }

    let Some(mut entry) = EVENTS.reserve::<ExecEvent>(0) else {
        record_loss(LossKind::Exec);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record; every field
    // is written before submit.
    unsafe {
        (*event).kind = EventKind::Exec as u32;
        (*event).pid = (bpf_get_current_pid_tgid() >> 32) as u32;
        (*event).uid = bpf_get_current_uid_gid() as u32;
        (*event).cgroup_id = cgroup_id;
        (*event).ppid = parent_tgid(bpf_get_current_task() as *const u8).unwrap_or(0);
        (*event).comm = bpf_get_current_comm().unwrap_or_default();
        (*event).filename[0] = 0;
        if let Ok(filename) = read::<*const u8>(bprm, offset!(binprm_filename)) {
            let _ = bpf_probe_read_kernel_str_bytes(filename, &mut (*event).filename);
        }
    }
    entry.submit(events_wakeup_flags());
}

fn parent_tgid(task: *const u8) -> Result<u32, i32> {
    let parent: *const u8 = read(task, offset!(task_real_parent))?;
    read(parent, offset!(task_tgid))
}
