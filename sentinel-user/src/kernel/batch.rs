//! Reads a whole per-CPU hash map with `BPF_MAP_LOOKUP_BATCH` (Linux 5.6, older than the ring
//! buffer Sentinel needs anyway): a few syscalls per scrape instead of two per entry, which at
//! 5,000 cgroups was most of a scrape's time. aya 0.14 has no batch operations.

use std::{
    io,
    mem::size_of,
    os::fd::{AsRawFd, BorrowedFd},
};

use aya::Pod;

/// `BPF_MAP_LOOKUP_BATCH` in `enum bpf_cmd`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per syscall: 5,000 cgroups take five calls, with buffers of tens of KiB.
const ENTRIES_PER_CALL: usize = 1024;

/// The `batch` member of `union bpf_attr`; the kernel zero-fills the rest of the union.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Reads every entry of a per-CPU hash map, calling `entry` with its key and one value per
/// possible CPU.
pub struct PerCpuBatchReader<K, V> {
    cpus: usize,
    keys: Vec<K>,
    values: Vec<u8>,
    per_cpu: Vec<V>,
}

impl<K: Pod + Default, V: Pod + Default> PerCpuBatchReader<K, V> {
    pub fn new(cpus: usize) -> Self {
        Self {
            cpus,
            keys: vec![K::default(); ENTRIES_PER_CALL],
            values: vec![0; ENTRIES_PER_CALL * cpus * Self::stride()],
            per_cpu: Vec::with_capacity(cpus),
        }
    }

    /// The kernel lays out per-CPU values 8-byte aligned, one after the other.
    const fn stride() -> usize {
        size_of::<V>().next_multiple_of(8)
    }

    pub fn read(&mut self, map: BorrowedFd<'_>, mut entry: impl FnMut(K, &[V])) -> io::Result<()> {
        // A hash map's batch position is a bucket index (u32); 8 bytes hold any map type's.
        let (mut position, mut next) = (0u64, 0u64);
        let mut first = true;
        loop {
            let mut attr = BatchAttr {
                in_batch: if first { 0 } else { &raw const position as u64 },
                out_batch: &raw mut next as u64,
                keys: self.keys.as_mut_ptr() as u64,
                values: self.values.as_mut_ptr() as u64,
                count: ENTRIES_PER_CALL as u32,
                map_fd: map.as_raw_fd() as u32,
                ..BatchAttr::default()
            };
            // SAFETY: `attr` points at buffers of `count` keys and `count` per-CPU values, which
            // the kernel fills and does not keep; `position` and `next` outlive the call.
            let result = unsafe {
                libc::syscall(
                    libc::SYS_bpf,
                    BPF_MAP_LOOKUP_BATCH,
                    &raw mut attr,
                    size_of::<BatchAttr>(),
                )
            };
            // ENOENT: the end of the map, with the last entries in this answer.
            let done = match result {
                0 => false,
                _ => match io::Error::last_os_error() {
                    error if error.raw_os_error() == Some(libc::ENOENT) => true,
                    error => return Err(error),
                },
            };
            let stride = Self::stride();
            for (index, key) in self.keys[..attr.count as usize].iter().enumerate() {
                self.per_cpu.clear();
                let element = &self.values[index * self.cpus * stride..];
                self.per_cpu.extend((0..self.cpus).map(|cpu| {
                    // SAFETY: the kernel wrote a `V` at each CPU's stride, inside the buffer;
                    // `V: Pod` takes any bytes.
                    unsafe {
                        element
                            .as_ptr()
                            .add(cpu * stride)
                            .cast::<V>()
                            .read_unaligned()
                    }
                }));
                entry(*key, &self.per_cpu);
            }
            if done {
                return Ok(());
            }
            position = next;
            first = false;
        }
    }
}
