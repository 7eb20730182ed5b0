//! Resource figures of every cgroup v2: an `iter/cgroup` program. A few walks of its
//! iterator give the daemon's stats pass one record per cgroup whose figures changed since
//! it last wrote one, where the interface files cost an open, a read and a close for each
//! figure of each service.

use core::ffi::c_void;

use aya_ebpf::{
    bindings::seq_file,
    helpers::bpf_seq_write,
    macros::map,
    maps::{Array, LruHashMap},
};
use sentinel_common::{
    CgroupFigures, FIGURES_CPU, FIGURES_MEMORY, FIGURES_PER_WALK, FIGURES_PIDS, FIGURES_REMEMBERED,
    FLUSH_CALL_PLACEHOLDER, WALK_CUT, WALK_FROM, WALK_GENERATION, WALK_SLOTS, WALK_WRITTEN,
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

/// The walk's state, shared with the daemon: see `WALK_SLOTS`. The kernel's walk skips
/// removed cgroups without calling this program, so indexes alone do not tell where a walk
/// ended.
#[map]
static FIGURES_WALK: Array<u64> = Array::with_max_entries(WALK_SLOTS, 0);

/// The last record written of each cgroup, and the daemon's table it went to.
#[derive(Clone, Copy)]
struct Written {
    generation: u64,
    figures: CgroupFigures,
}

#[map]
static FIGURES_WRITTEN: LruHashMap<u64, Written> =
    LruHashMap::with_max_entries(FIGURES_REMEMBERED, 0);

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
    let from = slot(WALK_FROM);
    if cgroup.is_null() || index < from || !offsets_ready() {
        return 0;
    }
    if index == 0 && from == 0 {
        flush_statistics(cgroup);
    }
    let Ok(figures) = figures(cgroup) else {
        return 0;
    };
    let generation = slot(WALK_GENERATION);
    // SAFETY: copied out at once; only this program writes the map, one walk at a time.
    let last = unsafe { FIGURES_WRITTEN.get(figures.cgroup_id) }.copied();
    if last.is_some_and(|last| last.generation == generation && same(&last.figures, &figures)) {
        return 0;
    }
    // SAFETY: `figures` lives on the stack for the call; the kernel copies it.
    let written = unsafe {
        bpf_seq_write(
            seq,
            (&raw const figures).cast::<c_void>(),
            size_of::<CgroupFigures>() as u32,
        )
    };
    if written != 0 {
        return 0;
    }
    // Not remembered (the map full of newer ones): written again next time, which is all.
    let _ = FIGURES_WRITTEN.insert(
        figures.cgroup_id,
        Written {
            generation,
            figures,
        },
        0,
    );
    let Some(count) = FIGURES_WALK.get_ptr_mut(WALK_WRITTEN) else {
        return 1;
    };
    // SAFETY: slots of this array are written only by this program during a walk, and by
    // the daemon between walks.
    unsafe {
        *count += 1;
        if *count < u64::from(FIGURES_PER_WALK) {
            return 0;
        }
        if let Some(cut) = FIGURES_WALK.get_ptr_mut(WALK_CUT) {
            *cut = index + 1;
        }
    }
    1
}

#[inline(always)]
fn slot(at: u32) -> u64 {
    FIGURES_WALK.get(at).copied().unwrap_or(0)
}

/// Field by field, so that no call to `memcmp` (which eBPF lacks) is made of it.
#[inline(always)]
fn same(a: &CgroupFigures, b: &CgroupFigures) -> bool {
    ((a.cgroup_id ^ b.cgroup_id)
        | u64::from(a.present ^ b.present)
        | u64::from(a.cpu_throttled_periods ^ b.cpu_throttled_periods)
        | (a.memory_pages ^ b.memory_pages)
        | (a.memory_max_pages ^ b.memory_max_pages)
        | (a.pids ^ b.pids)
        | (a.cpu_usage_ns ^ b.cpu_usage_ns)
        | (a.cpu_throttled_ns ^ b.cpu_throttled_ns))
        == 0
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
