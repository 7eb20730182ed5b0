//! cgroup v2 lifecycle: `raw_tp/cgroup_mkdir` and `raw_tp/cgroup_rmdir`, so the daemon learns
//! new services' paths at once and can release removed ones.

use aya_ebpf::{
    helpers::bpf_probe_read_kernel_str_bytes, macros::raw_tracepoint,
    programs::RawTracePointContext,
};
use sentinel_common::{CgroupEvent, EventKind, LossKind};

use crate::{
    kernel::{cgroup_id, offset, offsets_ready, read},
    maps::{ALERTS, record_loss},
};

/// `TP_PROTO(struct cgroup *cgrp, const char *path)`.
#[raw_tracepoint(tracepoint = "cgroup_mkdir")]
pub fn sentinel_cgmk(ctx: RawTracePointContext) {
    report(&ctx, EventKind::CgroupMkdir);
}

/// `TP_PROTO(struct cgroup *cgrp, const char *path)`.
#[raw_tracepoint(tracepoint = "cgroup_rmdir")]
pub fn sentinel_cgrm(ctx: RawTracePointContext) {
    report(&ctx, EventKind::CgroupRmdir);
}

#[inline(always)]
fn report(ctx: &RawTracePointContext, kind: EventKind) {
    if !offsets_ready() {
        return;
    }
    let cgroup: *const u8 = ctx.arg(0);
    // Only the cgroup v2 hierarchy (id 0); v1 hierarchies have their own, colliding ids.
    let Ok(root) = read::<*const u8>(cgroup, offset!(cgroup_root)) else {
        return;
    };
    if read::<u32>(root, offset!(cgroup_root_hierarchy_id)) != Ok(0) {
        return;
    }
    let Ok(id) = cgroup_id(cgroup) else {
        return;
    };
    let Some(mut entry) = ALERTS.reserve::<CgroupEvent>(0) else {
        record_loss(LossKind::Cgroup);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record; every field
    // is written before submit.
    unsafe {
        (*event).kind = kind as u32;
        (*event)._pad = 0;
        (*event).cgroup_id = id;
        (*event).path[0] = 0;
        let path: *const u8 = ctx.arg(1);
        let _ = bpf_probe_read_kernel_str_bytes(path, &mut (*event).path);
    }
    entry.submit(0);
}
