//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find struct
//! member offsets and tracepoint prototypes. It stands in for CO-RE, which Rust eBPF lacks.

use std::path::Path;

use crate::Error;

const MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC: u32 = 12;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

/// Kernel BTF, kept as the raw bytes plus where each type's record starts; members and names
/// are decoded only when a lookup asks for them. Decoding every type into owned structures
/// took tens of MB for a handful of offsets.
pub struct Btf {
    data: Vec<u8>,
    /// The string section's bounds in `data`.
    strings: std::ops::Range<usize>,
    /// Byte position of each type's record in `data`, by type id; id 0 (`void`) has none.
    types: Vec<u32>,
}

/// The fixed part of a type record.
struct Record {
    name_off: u32,
    kind: u32,
    vlen: usize,
    kind_flag: bool,
    size_or_type: u32,
    /// Where the kind-specific data after the fixed part starts.
    rest: usize,
}

const RECORD_BYTES: usize = 12;
const MEMBER_BYTES: usize = 12;
const PARAM_BYTES: usize = 8;
const ENUM_VALUE_BYTES: usize = 8;

impl Btf {
    pub fn from_sys_fs() -> Result<Self, Error> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let data = std::fs::read(path).map_err(|source| Error::NoBtf {
            path: path.into(),
            source,
        })?;
        Self::parse(data)
    }

    pub fn parse(data: Vec<u8>) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadBtf(reason.to_string());
        if u16_at(&data, 0) != Some(MAGIC) {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let header = |at| {
            u32_at(&data, at)
                .map(|v| v as usize)
                .ok_or_else(|| bad("truncated"))
        };
        let header_len = header(4)?;
        let type_start = header_len + header(8)?;
        let type_end = type_start + header(12)?;
        let str_start = header_len + header(16)?;
        let str_end = str_start + header(20)?;
        if type_end > data.len() || str_end > data.len() {
            return Err(bad("truncated"));
        }
        let mut btf = Self {
            strings: str_start..str_end,
            types: vec![0],
            data: Vec::new(),
        };
        let mut at = type_start;
        while at < type_end {
            let record = read_record(&data, at).ok_or_else(|| bad("truncated"))?;
            let next = record.rest + trailing_bytes(record.kind, record.vlen);
            if next > type_end {
                return Err(bad("truncated"));
            }
            btf.types.push(at as u32);
            at = next;
        }
        btf.data = data;
        Ok(btf)
    }

    /// Byte offset of `path` (members separated by `.`) inside the struct named `type_name`.
    /// Members of anonymous structs and unions are found as if they were direct members.
    pub fn member_offset(&self, type_name: &str, path: &str) -> Result<u32, Error> {
        let missing = || Error::MissingKernelField(format!("{type_name}.{path}"));
        let mut type_id = self.composite_by_name(type_name).ok_or_else(missing)?;
        let mut bits = 0;
        for name in path.split('.') {
            let (member_bits, member_type) = self.find_member(type_id, name).ok_or_else(missing)?;
            bits += member_bits;
            type_id = self.resolve_alias(member_type);
        }
        if bits % 8 != 0 {
            return Err(missing());
        }
        Ok(bits / 8)
    }

    /// Whether parameter `index` of the raw tracepoint `name` is a pointer, from the
    /// `btf_trace_<name>` typedef (whose first parameter is the context, not counted here).
    pub fn tracepoint_param_is_pointer(&self, name: &str, index: usize) -> Result<bool, Error> {
        let missing = || Error::MissingKernelField(format!("btf_trace_{name}"));
        let typedef_name = format!("btf_trace_{name}");
        let typedef = self.ids_named(&typedef_name).next().ok_or_else(missing)?;
        // typedef -> pointer -> function prototype
        let pointer = self
            .record(self.resolve_alias(typedef))
            .ok_or_else(missing)?;
        if pointer.kind != KIND_PTR {
            return Err(missing());
        }
        let proto = self
            .record(self.resolve_alias(pointer.size_or_type))
            .ok_or_else(missing)?;
        if proto.kind != KIND_FUNC_PROTO || index + 1 >= proto.vlen {
            return Err(missing());
        }
        let param =
            u32_at(&self.data, proto.rest + (index + 1) * PARAM_BYTES + 4).ok_or_else(missing)?;
        Ok(self
            .record(self.resolve_alias(param))
            .is_some_and(|record| record.kind == KIND_PTR))
    }

    /// The value of `name` in the enum named `enum_name`.
    pub fn enum_value(&self, enum_name: &str, name: &str) -> Result<u32, Error> {
        let missing = || Error::MissingKernelField(format!("{enum_name}.{name}"));
        self.ids_named(enum_name)
            .filter_map(|id| self.record(id).filter(|record| record.kind == KIND_ENUM))
            .find_map(|record| {
                (0..record.vlen).find_map(|index| {
                    let at = record.rest + index * ENUM_VALUE_BYTES;
                    self.name_is(u32_at(&self.data, at)?, name)
                        .then(|| u32_at(&self.data, at + 4))?
                })
            })
            .ok_or_else(missing)
    }

    /// The type id of the kernel function `name`, as programs that attach to one name it.
    pub fn function_id(&self, name: &str) -> Result<u32, Error> {
        self.ids_named(name)
            .find(|&id| {
                self.record(id)
                    .is_some_and(|record| record.kind == KIND_FUNC)
            })
            .ok_or_else(|| Error::MissingKernelField(format!("function {name}")))
    }

    fn record(&self, id: u32) -> Option<Record> {
        let at = *self.types.get(id as usize).filter(|_| id != 0)?;
        read_record(&self.data, at as usize)
    }

    fn name(&self, offset: u32) -> &[u8] {
        let strings = &self.data[self.strings.clone()];
        let tail = strings.get(offset as usize..).unwrap_or_default();
        let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
        &tail[..end]
    }

    /// Whether the string at `offset` is `name`, without scanning past it.
    fn name_is(&self, offset: u32, name: &str) -> bool {
        let start = self.strings.start + offset as usize;
        let end = start + name.len();
        end < self.strings.end && &self.data[start..end] == name.as_bytes() && self.data[end] == 0
    }

    /// Ids of the types named `name`, in id order: a scan, as a handful of lookups is all
    /// the daemon makes.
    fn ids_named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = u32> + 'a {
        (1..self.types.len() as u32).filter(move |&id| {
            self.record(id)
                .is_some_and(|record| self.name_is(record.name_off, name))
        })
    }

    fn composite_by_name(&self, name: &str) -> Option<u32> {
        self.ids_named(name).find(|&id| {
            self.record(id).is_some_and(|record| {
                matches!(record.kind, KIND_STRUCT | KIND_UNION) && record.vlen > 0
            })
        })
    }

    fn resolve_alias(&self, mut id: u32) -> u32 {
        while let Some(record) = self.record(id) {
            if !matches!(
                record.kind,
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG
            ) {
                break;
            }
            id = record.size_or_type;
        }
        id
    }

    /// (bit offset, type id) of member `name`, searching anonymous members recursively.
    fn find_member(&self, type_id: u32, name: &str) -> Option<(u32, u32)> {
        let record = self.record(type_id)?;
        if !matches!(record.kind, KIND_STRUCT | KIND_UNION) {
            return None;
        }
        (0..record.vlen).find_map(|index| {
            let at = record.rest + index * MEMBER_BYTES;
            let member_name = self.name(u32_at(&self.data, at)?);
            let member_type = u32_at(&self.data, at + 4)?;
            let offset = u32_at(&self.data, at + 8)?;
            // With kind_flag the top 8 bits hold a bitfield size.
            let bit_offset = if record.kind_flag {
                offset & 0xff_ffff
            } else {
                offset
            };
            if member_name == name.as_bytes() {
                Some((bit_offset, member_type))
            } else if member_name.is_empty() {
                let inner = self.resolve_alias(member_type);
                self.find_member(inner, name)
                    .map(|(bits, ty)| (bit_offset + bits, ty))
            } else {
                None
            }
        })
    }
}

fn u16_at(data: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(data.get(at..at + 2)?.try_into().ok()?))
}

fn u32_at(data: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?))
}

fn read_record(data: &[u8], at: usize) -> Option<Record> {
    let info = u32_at(data, at + 4)?;
    Some(Record {
        name_off: u32_at(data, at)?,
        kind: (info >> 24) & 0x1f,
        vlen: (info & 0xffff) as usize,
        kind_flag: info >> 31 == 1,
        size_or_type: u32_at(data, at + 8)?,
        rest: at + RECORD_BYTES,
    })
}

/// Bytes of kind-specific data after a record's fixed part.
fn trailing_bytes(kind: u32, vlen: usize) -> usize {
    match kind {
        KIND_STRUCT | KIND_UNION | KIND_DATASEC | KIND_ENUM64 => vlen * 12,
        KIND_FUNC_PROTO | KIND_ENUM => vlen * 8,
        KIND_INT | KIND_VAR | KIND_DECL_TAG => 4,
        KIND_ARRAY => 12,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kernel_without_btf_is_a_clear_error() {
        let error = Btf::from_file(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        let message = error.to_string();
        assert!(message.contains("CONFIG_DEBUG_INFO_BTF=y"), "{message}");
        assert!(message.contains("/nonexistent/vmlinux"), "{message}");
    }

    #[test]
    fn garbage_is_not_btf() {
        assert!(matches!(
            Btf::parse(b"not btf at all".to_vec()),
            Err(Error::BadBtf(_))
        ));
    }

    /// The running kernel's BTF must give every offset the probes need (Sentinel requires
    /// BTF, so a host without it fails here, loudly).
    #[test]
    fn the_running_kernel_has_every_field() {
        let btf = Btf::from_sys_fs().expect("this kernel's BTF");
        let resolved = crate::kernel::resolve_offsets(&btf);
        assert!(
            resolved.missing.is_empty(),
            "missing: {:?}",
            resolved.missing
        );
        assert!(resolved.offsets.task_cgroups > 0 && resolved.offsets.sock_cgroup > 0);
    }

    /// `tcp_send_reset` passes the reset's reason as its third argument on this kernel (6.10
    /// and later); a kernel whose tracepoint lacks an argument, as 6.1 lacks the reason, is
    /// told apart by the same check, which then keeps the port-scan probe off.
    #[test]
    fn tcp_send_reset_has_a_reason_here_and_a_missing_argument_is_an_error() {
        let btf = Btf::from_sys_fs().expect("this kernel's BTF");
        assert!(
            btf.tracepoint_param_is_pointer("tcp_send_reset", 1)
                .unwrap()
        );
        assert!(
            !btf.tracepoint_param_is_pointer("tcp_send_reset", 2)
                .unwrap()
        );
        assert!(
            btf.tracepoint_param_is_pointer("tcp_send_reset", 3)
                .is_err()
        );
    }
}
