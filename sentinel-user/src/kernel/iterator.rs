//! A BPF iterator over cgroups (`iter/cgroup`, Linux 6.1): attached once to the cgroup2
//! hierarchy the daemon sees, parents first. A cgroup iterator cannot resume a walk across
//! reads, and one read returns at most eight pages: so a pass is one walk or a few, each a
//! new iterator file read to its end, each writing at most `FIGURES_PER_WALK` records, of the
//! cgroups whose figures changed since their last record.
//! aya 0.14 attaches an iterator without the link information a cgroup iterator requires,
//! and loads one only with aya's own parse of the kernel's BTF, which the daemon does not
//! keep (see `probes::Loader`): both are done here.

use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd},
    path::Path,
};

use aya::{
    maps::{Array, MapData},
    programs::{Iter, ProgramFd},
};
use sentinel_common::{
    CgroupFigures, FIGURES_PER_WALK, FLUSH_CALL_PLACEHOLDER, WALK_CUT, WALK_FROM, WALK_GENERATION,
    WALK_WRITTEN,
};

use super::CGROUP_ITERATOR_FUNCTION;
use crate::Error;

/// `BPF_LINK_CREATE` and `BPF_ITER_CREATE` in `enum bpf_cmd`, `BPF_TRACE_ITER` in
/// `enum bpf_attach_type`, `BPF_CGROUP_ITER_DESCENDANTS_PRE` in `enum bpf_cgroup_iter_order`.
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
const BPF_TRACE_ITER: u32 = 28;
const DESCENDANTS_PRE: u32 = 2;
/// What one walk writes at most, and so what one read takes.
const WALK_BYTES: usize = FIGURES_PER_WALK as usize * size_of::<CgroupFigures>();

/// The `link_create` member of `union bpf_attr`, for an iterator.
#[repr(C)]
#[derive(Default)]
struct LinkCreateAttr {
    prog_fd: u32,
    target_fd: u32,
    attach_type: u32,
    flags: u32,
    iter_info: u64,
    iter_info_len: u32,
    _pad: u32,
}

/// The `cgroup` member of `union bpf_iter_link_info`.
#[repr(C)]
struct CgroupIterInfo {
    order: u32,
    cgroup_fd: u32,
    cgroup_id: u64,
}

/// The `iter_create` member of `union bpf_attr`.
#[repr(C)]
struct IterCreateAttr {
    link_fd: u32,
    flags: u32,
}

/// A loaded and attached cgroup iterator.
pub struct CgroupIterator {
    /// Keeps the program loaded, whatever becomes of the object it came from.
    _program: ProgramFd,
    link: OwnedFd,
    /// Where the next walk starts, and where the last was cut short (`FIGURES_WALK`).
    state: Array<MapData, u64>,
    /// The number of the reader's table of records: the program writes a cgroup's record
    /// when its figures changed since the last one of this table.
    generation: u64,
    /// Whether the first walk of a pass sums up the kernel's CPU figures itself.
    flushes_statistics: bool,
}

impl std::fmt::Debug for CgroupIterator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CgroupIterator")
            .field("link", &self.link)
            .finish_non_exhaustive()
    }
}

impl CgroupIterator {
    /// Loads `program` and attaches it to walk the hierarchy under `root`, a directory of the
    /// cgroup2 mount; `function` is the type id of `bpf_iter_cgroup` in the kernel's BTF;
    /// `flushes_statistics` what [`link_statistics_flush`] answered for the program's object.
    pub fn attach(
        program: &mut Iter,
        state: Array<MapData, u64>,
        function: u32,
        root: &Path,
        flushes_statistics: bool,
    ) -> Result<Self, Error> {
        let failed = |what: &str, reason: &dyn std::fmt::Display| {
            Error::CgroupIterator(format!("{what}: {reason}"))
        };
        let stand_in = aya::Btf::parse(&naming_only(function), aya::Endianness::Little)
            .map_err(|error| failed("cannot name the iterator's kernel function", &error))?;
        program
            .load("cgroup", &stand_in)
            .map_err(|error| failed("the verifier refused it", &error))?;
        drop(stand_in);
        super::release_freed_memory();
        let program = program
            .fd()
            .and_then(|fd| fd.try_clone().map_err(Into::into))
            .map_err(|error| failed("the loaded program has no descriptor", &error))?;
        let root_dir =
            File::open(root).map_err(|error| failed(&root.display().to_string(), &error))?;
        let info = CgroupIterInfo {
            order: DESCENDANTS_PRE,
            cgroup_fd: root_dir.as_raw_fd() as u32,
            cgroup_id: 0,
        };
        let mut attr = LinkCreateAttr {
            prog_fd: program.as_fd().as_raw_fd() as u32,
            attach_type: BPF_TRACE_ITER,
            iter_info: (&raw const info) as u64,
            iter_info_len: size_of::<CgroupIterInfo>() as u32,
            ..LinkCreateAttr::default()
        };
        // SAFETY: `attr` and the `info` it points at outlive the call; the kernel copies both.
        let link = unsafe {
            bpf(
                BPF_LINK_CREATE,
                (&raw mut attr).cast(),
                size_of::<LinkCreateAttr>(),
            )
        }
        .map_err(|error| failed("attaching it failed", &error))?;
        Ok(Self {
            _program: program,
            link,
            state,
            generation: 0,
            flushes_statistics,
        })
    }

    /// Whether a pass's walks sum up the kernel's CPU figures themselves; if not, reading a
    /// cgroup's `cpu.stat` does it for its subtree.
    pub fn flushes_statistics(&self) -> bool {
        self.flushes_statistics
    }

    /// Into `records` (cleared first), in the walk's order, the records of the cgroups whose
    /// figures changed since their last record, or of every cgroup when the reader starts
    /// `afresh` (a new table); whether the walks reached the last cgroup. A cgroup made or
    /// removed meanwhile may be missed or looked at twice.
    pub fn read_all(&mut self, records: &mut Vec<u8>, afresh: bool) -> io::Result<Walked> {
        records.clear();
        if afresh {
            self.generation += 1;
        }
        let generation = self.generation;
        walk_pages(|from| {
            for (slot, value) in [
                (WALK_FROM, from),
                (WALK_GENERATION, generation),
                (WALK_WRITTEN, 0),
                (WALK_CUT, 0),
            ] {
                self.state.set(slot, value, 0).map_err(io::Error::other)?;
            }
            self.walk(records)?;
            let cut = self.state.get(&WALK_CUT, 0).map_err(io::Error::other)?;
            Ok((cut != 0).then_some(cut))
        })
    }

    /// One walk, appended to `records`.
    fn walk(&self, records: &mut Vec<u8>) -> io::Result<()> {
        let mut attr = IterCreateAttr {
            link_fd: self.link.as_raw_fd() as u32,
            flags: 0,
        };
        // SAFETY: `attr` outlives the call.
        let walk = unsafe {
            bpf(
                BPF_ITER_CREATE,
                (&raw mut attr).cast(),
                size_of::<IterCreateAttr>(),
            )
        }?;
        let mut walk = File::from(walk);
        loop {
            let filled = records.len();
            // One byte more than a walk writes, so that its end is a read of 0 bytes.
            records.resize(filled + WALK_BYTES + 1, 0);
            let read = walk.read(&mut records[filled..]);
            records.truncate(filled + *read.as_ref().unwrap_or(&0));
            if read? == 0 {
                return Ok(());
            }
        }
    }
}

/// Walks a pass makes at most. A walk that writes `FIGURES_PER_WALK` records ends, and the
/// next starts again at the top of the hierarchy: so when many cgroups change at once, a pass
/// costs the kernel about cgroups² / 1,024 steps. Bounded here, so that users who make
/// cgroups in their delegated subtrees cannot make each pass cost ever more. What lies past
/// the bound is read from the files of the policed cgroups.
pub const MAX_WALKS: u64 = 32;

/// Whether a pass's walks reached the last cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Walked {
    Every,
    /// `MAX_WALKS` were made and the last was cut short.
    Bounded,
}

/// Calls `walk` with the index of the first cgroup each walk looks at, until one reaches the
/// last cgroup (`walk` answers where it was cut short, if it was) or `MAX_WALKS` were made.
fn walk_pages(mut walk: impl FnMut(u64) -> io::Result<Option<u64>>) -> io::Result<Walked> {
    let mut from = 0;
    for _ in 0..MAX_WALKS {
        match walk(from)? {
            Some(cut) => from = cut,
            None => return Ok(Walked::Every),
        }
    }
    Ok(Walked::Bounded)
}

/// `bpf(2)` for a command that answers with a new descriptor.
///
/// # Safety
/// `attr` must point at `size` bytes of a valid `union bpf_attr` member for `command`.
unsafe fn bpf(command: libc::c_long, attr: *mut libc::c_void, size: usize) -> io::Result<OwnedFd> {
    // SAFETY: the caller vouches for `attr`.
    let fd = unsafe { libc::syscall(libc::SYS_bpf, command, attr, size) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Rewrites the cgroup iterator's call of [`FLUSH_CALL_PLACEHOLDER`] in the eBPF `object`
/// into a call of the kfunc at type id `flush` in the kernel's BTF or, without one, into
/// `r0 = 0`. Whether the walks now sum up the kernel's CPU figures themselves.
pub fn link_statistics_flush(object: &mut [u8], flush: Option<u32>) -> bool {
    /// `BPF_JMP | BPF_CALL`, and `BPF_ALU64 | BPF_MOV | BPF_K`.
    const CALL: u8 = 0x85;
    const MOVE_IMMEDIATE: u8 = 0xb7;
    /// `BPF_PSEUDO_KFUNC_CALL`, in the source register's bits.
    const KFUNC: u8 = 2 << 4;
    let instruction = |code: u8, registers: u8, immediate: u32| {
        let mut bytes = [code, registers, 0, 0, 0, 0, 0, 0];
        bytes[4..].copy_from_slice(&immediate.to_le_bytes());
        bytes
    };
    let placeholder = instruction(CALL, 0, FLUSH_CALL_PLACEHOLDER);
    let linked = match flush {
        Some(function) => instruction(CALL, KFUNC, function),
        None => instruction(MOVE_IMMEDIATE, 0, 0),
    };
    // Instructions sit at multiples of eight bytes: ELF aligns their sections so.
    let mut found = false;
    for slot in object.chunks_exact_mut(8) {
        if *slot == placeholder {
            slot.copy_from_slice(&linked);
            found = true;
        }
    }
    found && flush.is_some()
}

/// A BTF whose only named type is the function `CGROUP_ITERATOR_FUNCTION`, at the kernel's type id
/// `function`, for aya to name it by: every type before it is a blank pointer. It takes a
/// few MB while the program loads, where aya's parse of the kernel's BTF took tens.
fn naming_only(function: u32) -> Vec<u8> {
    const HEADER_BYTES: u32 = 24;
    const RECORD_BYTES: usize = 12;
    const KIND_PTR: u32 = 2;
    const KIND_FUNC: u32 = 12;
    let strings = format!("\0{CGROUP_ITERATOR_FUNCTION}\0");
    let types = function as usize * RECORD_BYTES;
    let mut data = Vec::with_capacity(HEADER_BYTES as usize + types + strings.len());
    data.extend_from_slice(&0xeb9f_u16.to_le_bytes());
    data.extend_from_slice(&[1, 0]);
    for value in [
        HEADER_BYTES,
        0,
        types as u32,
        types as u32,
        strings.len() as u32,
    ] {
        data.extend_from_slice(&value.to_le_bytes());
    }
    let mut record = |name: u32, kind: u32| {
        for value in [name, kind << 24, 0] {
            data.extend_from_slice(&value.to_le_bytes());
        }
    };
    for _ in 1..function {
        record(0, KIND_PTR);
    }
    record(1, KIND_FUNC);
    data.extend_from_slice(strings.as_bytes());
    data
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::Btf;

    #[test]
    fn walks_go_on_until_one_reaches_the_last_cgroup_and_stop_at_the_bound() {
        let mut firsts = Vec::new();
        let walked = walk_pages(|first| {
            firsts.push(first);
            Ok((firsts.len() < 3).then_some(first + 700))
        });
        assert_eq!(walked.unwrap(), Walked::Every);
        assert_eq!(firsts, [0, 700, 1400]);
        // A hierarchy of a thousand walks: the walks stop at the bound.
        let mut walks = 0;
        let walked = walk_pages(|first| {
            walks += 1;
            Ok((walks <= 1000).then_some(first + 512))
        });
        assert_eq!(walked.unwrap(), Walked::Bounded);
        assert_eq!(walks, MAX_WALKS);
    }

    /// The built object's one placeholder call becomes the kfunc call, or `r0 = 0`; nothing
    /// else changes. The VM suite's iterator test proves the kernel accepts the call.
    #[test]
    fn the_flush_placeholder_becomes_the_kfunc_call_or_nothing() {
        let built = crate::probes::OBJECT;
        let changed = |linked: &[u8]| {
            built
                .chunks_exact(8)
                .zip(linked.chunks_exact(8))
                .filter(|(before, after)| before != after)
                .map(|(_, after)| after.to_vec())
                .collect::<Vec<_>>()
        };
        let mut linked = built.to_vec();
        assert!(link_statistics_flush(&mut linked, Some(0x0001_2345)));
        assert_eq!(changed(&linked), [[0x85, 0x20, 0, 0, 0x45, 0x23, 0x01, 0]]);
        let mut linked = built.to_vec();
        assert!(!link_statistics_flush(&mut linked, None));
        assert_eq!(changed(&linked), [[0xb7, 0, 0, 0, 0, 0, 0, 0]]);
        // Linked once, there is nothing left to link.
        assert!(!link_statistics_flush(&mut linked, Some(0x0001_2345)));
    }

    /// The stand-in names the function at the kernel's id, read by this crate's BTF reader,
    /// and aya reads it; the VM suite's iterator tests prove the kernel takes what aya made of it.
    #[test]
    fn the_stand_in_names_the_function_at_the_kernels_id() {
        let function = Btf::from_sys_fs()
            .expect("this kernel's BTF")
            .function_id(CGROUP_ITERATOR_FUNCTION)
            .expect("a cgroup iterator in this kernel");
        let stand_in = naming_only(function);
        assert_eq!(
            Btf::parse(stand_in.clone())
                .unwrap()
                .function_id(CGROUP_ITERATOR_FUNCTION)
                .unwrap(),
            function
        );
        aya::Btf::parse(&stand_in, aya::Endianness::Little).unwrap();
    }
}
