//! Resource figures of every cgroup v2: an `iter/cgroup` program. A few walks of its
//! iterator give the daemon's stats pass one record per cgroup, where the interface files
//! cost an open, a read and a close for each figure of each service.

use core::ffi::c_void;

use aya_ebpf::{bindings::seq_file, helpers::bpf_seq_write, macros::map, maps::Array};
use sentinel_common::{
    CgroupFigures, FIGURES_CPU, FIGURES_MEMORY, FIGURES_PER_WALK, FIGURES_PIDS,
    FLUSH_CALL_PLACEHOLDER,
};

use crate::kernel::{cgroup_id, offset, offsets_ready, read};

/// `struct bpf_iter_meta`.
#[repr(C)]
struct IterMeta {
    seq: *mut seq_file,
    session_id: u64,
    seq_num: u64,
}

/// `struct bpf_iter__cgroup`: the cgroup is null once the walk is over.
#[repr(C)]
struct IterCgroup {
    meta: *mut IterMeta,
    cgroup: *const u8,
}

/// The walk's state, shared with the daemon: at `WALK_FROM` the index, in the walk's order,
/// of the first cgroup this walk writes (set by the daemon); at `WALK_CUT` 1 when the walk was
/// ended before the last cgroup (set here). The kernel's walk skips removed cgroups without
/// calling this program, so how many records a walk wrote does not tell whether it was the last.
#[map]
static FIGURES_WALK: Array<u64> = Array::with_max_entries(2, 0);
const WALK_FROM: u32 = 0;
const WALK_CUT: u32 = 1;

/// Returning 1 ends the walk after this cgroup. Sleepable, for the statistics flush.
#[unsafe(no_mangle)]
#[unsafe(link_section = "iter.s/cgroup")]
pub extern "C" fn sentinel_figures(ctx: *mut c_void) -> i32 {
    let ctx = ctx.cast::<IterCgroup>();
    // SAFETY: the kernel passes a `bpf_iter__cgroup`; the verifier checks the loads.
    let (seq, index, cgroup) = unsafe {
        let meta = (*ctx).meta;
        ((*meta).seq, (*meta).seq_num, (*ctx).cgroup)
    };
    let from = FIGURES_WALK.get(WALK_FROM).copied().unwrap_or(0);
    if cgroup.is_null() || index < from || !offsets_ready() {
        return 0;
    }
    if index == 0 && from == 0 {
        flush_statistics(cgroup);
    }
    if let Ok(figures) = figures(cgroup) {
        // SAFETY: `figures` lives on the stack for the call; the kernel copies it.
        unsafe {
            bpf_seq_write(
                seq,
                (&raw const figures).cast::<c_void>(),
                size_of::<CgroupFigures>() as u32,
            )
        };
    }
    if index + 1 < from + u64::from(FIGURES_PER_WALK) {
        return 0;
    }
    if let Some(cut) = FIGURES_WALK.get_ptr_mut(WALK_CUT) {
        // SAFETY: a slot of this array, written only by this program during a walk.
        unsafe { *cut = 1 };
    }
    1
}

/// Has the kernel sum up the CPU time of every cgroup below `root`, the first of a pass's
/// walks: the kernel adds a cgroup's CPU time into its figure only when asked. The daemon
/// turns this call into the kernel's flush (`cgroup_rstat_flush`, from Linux 6.16
/// `css_rstat_flush`, whose `css` is the cgroup's first member), or into nothing.
#[inline(always)]
fn flush_statistics(root: *const u8) {
    // SAFETY: the call's number is rewritten before load, as `FLUSH_CALL_PLACEHOLDER` says;
    // aya's helpers are called the same way. The flush takes the cgroup and returns nothing.
    unsafe {
        let flush: unsafe extern "C" fn(*const u8) =
            core::mem::transmute(FLUSH_CALL_PLACEHOLDER as usize);
        flush(root);
    }
}

#[inline(always)]
fn figures(cgroup: *const u8) -> Result<CgroupFigures, i32> {
    let mut figures = CgroupFigures {
        cgroup_id: cgroup_id(cgroup)?,
        cpu_usage_ns: read(cgroup, offset!(cgroup_cpu_usage))?,
        ..CgroupFigures::default()
    };
    let memory = controller(cgroup, offset!(memory_subsys_id))?;
    if !memory.is_null() {
        figures.present |= FIGURES_MEMORY;
        figures.memory_pages = read(memory, offset!(memcg_usage))?;
        figures.memory_max_pages = read(memory, offset!(memcg_max))?;
    }
    let pids = controller(cgroup, offset!(pids_subsys_id))?;
    if !pids.is_null() {
        figures.present |= FIGURES_PIDS;
        figures.pids = read(pids, offset!(pids_counter))?;
    }
    let cpu = controller(cgroup, offset!(cpu_subsys_id))?;
    if !cpu.is_null() {
        figures.present |= FIGURES_CPU;
        figures.cpu_throttled_ns = read(cpu, offset!(cpu_throttled_time))?;
        figures.cpu_throttled_periods = read(cpu, offset!(cpu_throttled_periods))?;
    }
    Ok(figures)
}

/// `cgroup->subsys[id]`: the controller's state on this cgroup, null where it is not enabled.
#[inline(always)]
fn controller(cgroup: *const u8, id: u32) -> Result<*const u8, i32> {
    read(
        cgroup,
        offset!(cgroup_subsys) + id * size_of::<usize>() as u32,
    )
}
