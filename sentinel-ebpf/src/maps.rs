//! Maps shared by all hook families, and the accounting helpers every program uses.

use aya_ebpf::{
    bindings::{BPF_NOEXIST, BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    macros::map,
    maps::{PerCpuArray, PerCpuHashMap, RingBuf},
};
use sentinel_common::{
    EVENTS_WAKEUP_BYTES, EventRecords, LossKind, SCAN_WAKEUP_BYTES, ServiceCounters,
};

/// Per-cgroup counters, keyed by cgroup v2 id. The daemon folds and deletes entries of
/// removed cgroups, so the map only holds live ones.
#[map]
pub static COUNTERS: PerCpuHashMap<u64, ServiceCounters> =
    PerCpuHashMap::with_max_entries(16384, 0);

/// Events that could not be recorded, indexed by `LossKind`.
#[map]
pub static LOST: PerCpuArray<u64> = PerCpuArray::with_max_entries(LossKind::COUNT as u32, 0);

/// Which of the high-volume records below the daemon reads; filled in before load (read-only
/// data). Without a reader, the exec and TCP programs only count.
#[unsafe(no_mangle)]
pub static RECORDS: EventRecords = EventRecords { exec: 0, tcp: 0 };

/// High-volume per-event records (exec, TCP) with batched wakeups.
#[map]
pub static EVENTS: RingBuf = RingBuf::with_byte_size(4 * 1024 * 1024, 0);

/// Rare records that must reach the daemon at once (OOM kills, cgroup lifecycle).
#[map]
pub static ALERTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// SSH authentication outcomes, on a ring of their own: a storm of cgroup creations (anyone
/// can start containers or transient units) must not push an attacker's failures out.
#[map]
pub static SSH_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// Closed-port hits (port scans), on a ring of their own with batched wakeups: a scan is a
/// burst of thousands, which must neither wake the daemon per record nor push other records out.
#[map]
pub static SCAN_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

pub fn record_loss(kind: LossKind) {
    if let Some(slot) = LOST.get_ptr_mut(kind as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU.
        unsafe { *slot += 1 };
    }
}

/// Adds to the counters of `cgroup_id`, creating its entry on first use.
#[inline(always)]
pub fn count(cgroup_id: u64, update: impl Fn(&mut ServiceCounters)) {
    if let Some(counters) = COUNTERS.get_ptr_mut(cgroup_id) {
        // SAFETY: per-CPU value, no concurrent writer on this CPU.
        update(unsafe { &mut *counters });
        return;
    }
    let mut fresh = ServiceCounters::default();
    update(&mut fresh);
    if COUNTERS
        .insert(cgroup_id, fresh, BPF_NOEXIST as u64)
        .is_ok()
    {
        return;
    }
    // Another CPU created the entry between the lookup and the insert.
    match COUNTERS.get_ptr_mut(cgroup_id) {
        // SAFETY: as above.
        Some(counters) => update(unsafe { &mut *counters }),
        None => record_loss(LossKind::CounterMapFull),
    }
}

/// Whether the daemon reads exec records, through a volatile load so that the compiler cannot
/// fold the zero initialiser into the program.
#[inline(always)]
pub fn exec_records_wanted() -> bool {
    // SAFETY: a valid reference to a static.
    unsafe { core::ptr::read_volatile(&RECORDS.exec) != 0 }
}

/// Whether the daemon reads TCP records (see `exec_records_wanted`).
#[inline(always)]
pub fn tcp_records_wanted() -> bool {
    // SAFETY: a valid reference to a static.
    unsafe { core::ptr::read_volatile(&RECORDS.tcp) != 0 }
}

/// Submit flags for `EVENTS`: wake the daemon only when enough data is queued.
#[inline(always)]
pub fn events_wakeup_flags() -> u64 {
    wakeup_flags(&EVENTS, EVENTS_WAKEUP_BYTES)
}

/// Submit flags for `SCAN_EVENTS` (see `events_wakeup_flags`).
#[inline(always)]
pub fn scan_wakeup_flags() -> u64 {
    wakeup_flags(&SCAN_EVENTS, SCAN_WAKEUP_BYTES)
}

#[inline(always)]
fn wakeup_flags(ring: &RingBuf, threshold: u64) -> u64 {
    if ring.query(BPF_RB_AVAIL_DATA as u64) >= threshold {
        BPF_RB_FORCE_WAKEUP as u64
    } else {
        BPF_RB_NO_WAKEUP as u64
    }
}
