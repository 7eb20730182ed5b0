//! OOM kills: `raw_tp/mark_victim`, attributed to the victim's cgroup (not the allocating
//! task's, which is the context the tracepoint runs in).

use aya_ebpf::{
    helpers::{bpf_get_current_pid_tgid, bpf_get_current_task},
    macros::{map, raw_tracepoint},
    maps::LruHashMap,
    programs::RawTracePointContext,
};
use aya_log_ebpf::debug;
use sentinel_common::{EventKind, LossKind, OomKillEvent};

use crate::{
    kernel::{offset, offsets_ready, read, task_cgroup_id},
    maps::{ALERTS, record_loss},
};

const SIGKILL: i32 = 9;

/// Tasks that were just sent SIGKILL, by pid. On kernels whose `mark_victim` passes only a pid,
/// the OOM killer's SIGKILL to the victim (sent right before `mark_victim`) tells us its task.
#[map]
static SIGKILLED_TASKS: LruHashMap<u32, u64> = LruHashMap::with_max_entries(1024, 0);

/// `TP_PROTO(int sig, struct kernel_siginfo *info, struct task_struct *task, int group,
/// int result)`. Only loaded on kernels whose `mark_victim` lacks the task.
#[raw_tracepoint(tracepoint = "signal_generate")]
pub fn sentinel_kill(ctx: RawTracePointContext) {
    let signal: i32 = ctx.arg(0);
    if signal != SIGKILL || !offsets_ready() {
        return;
    }
    let task: *const u8 = ctx.arg(2);
    if let Ok(pid) = read::<u32>(task, offset!(task_pid)) {
        let _ = SIGKILLED_TASKS.insert(pid, task as u64, 0);
    }
}

/// `TP_PROTO(struct task_struct *task, uid_t uid)` on kernels >= 6.7, `TP_PROTO(int pid)`
/// before.
#[raw_tracepoint(tracepoint = "mark_victim")]
pub fn sentinel_oom(ctx: RawTracePointContext) {
    if !offsets_ready() {
        return;
    }
    let task = victim_task(&ctx);
    let Some(mut entry) = ALERTS.reserve::<OomKillEvent>(0) else {
        record_loss(LossKind::OomKill);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record; every field
    // is written before submit.
    unsafe {
        (*event).kind = EventKind::OomKill as u32;
        (*event).pid = if task.is_null() {
            ctx.arg::<u32>(0)
        } else {
            read(task, offset!(task_tgid)).unwrap_or(0)
        };
        (*event).cgroup_id = if task.is_null() {
            0
        } else {
            task_cgroup_id(task).unwrap_or(0)
        };
        (*event).comm = if task.is_null() {
            [0; 16]
        } else {
            read(task, offset!(task_comm)).unwrap_or([0; 16])
        };
        if (*event).cgroup_id == 0 {
            debug!(
                &ctx,
                "OOM victim {} not resolved in the kernel",
                (*event).pid
            );
        }
    }
    entry.submit(0);
}

fn victim_task(ctx: &RawTracePointContext) -> *const u8 {
    if offset!(mark_victim_has_task) != 0 {
        return ctx.arg(0);
    }
    let pid: u32 = ctx.arg(0);
    // SAFETY: map lookup; the value is copied out before the entry is removed.
    if let Some(task) = unsafe { SIGKILLED_TASKS.get(pid) }.copied() {
        let _ = SIGKILLED_TASKS.remove(pid);
        return task as *const u8;
    }
    // An exiting task that the OOM killer marks without a signal is the current task.
    if (bpf_get_current_pid_tgid() as u32) == pid {
        // SAFETY: helper without preconditions.
        return unsafe { bpf_get_current_task() } as *const u8;
    }
    core::ptr::null()
}
