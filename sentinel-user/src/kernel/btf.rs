//! A small reader of the kernel's BTF (`/sys/kernel/btf/vmlinux`): just enough to find struct
//! member offsets and tracepoint prototypes. It stands in for CO-RE, which Rust eBPF lacks.

use std::{collections::HashMap, path::Path};

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
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Debug, Clone)]
struct Member {
    name: String,
    type_id: u32,
    bit_offset: u32,
}

#[derive(Debug, Clone)]
enum Type {
    /// Struct or union.
    Composite {
        members: Vec<Member>,
    },
    Pointer {
        target: u32,
    },
    /// Typedef and the qualifiers: a name for another type.
    Alias {
        target: u32,
    },
    FuncProto {
        params: Vec<u32>,
    },
    Other,
}

/// Parsed kernel BTF: types by id and named types by name.
pub struct Btf {
    types: Vec<Type>,
    by_name: HashMap<String, Vec<u32>>,
}

impl Btf {
    pub fn from_sys_fs() -> Result<Self, Error> {
        Self::from_file(Path::new("/sys/kernel/btf/vmlinux"))
    }

    pub fn from_file(path: &Path) -> Result<Self, Error> {
        let data = std::fs::read(path).map_err(|source| Error::NoBtf {
            path: path.into(),
            source,
        })?;
        Self::parse(&data)
    }

    pub fn parse(data: &[u8]) -> Result<Self, Error> {
        let bad = |reason: &str| Error::BadBtf(reason.to_string());
        let u16_at = |at: usize| -> Result<u16, Error> {
            Ok(u16::from_le_bytes(
                data.get(at..at + 2)
                    .ok_or_else(|| bad("truncated"))?
                    .try_into()
                    .unwrap(),
            ))
        };
        let u32_at = |at: usize| -> Result<u32, Error> {
            Ok(u32::from_le_bytes(
                data.get(at..at + 4)
                    .ok_or_else(|| bad("truncated"))?
                    .try_into()
                    .unwrap(),
            ))
        };
        if u16_at(0)? != MAGIC {
            return Err(bad("bad magic (not little-endian BTF)"));
        }
        let header_len = u32_at(4)? as usize;
        let type_start = header_len + u32_at(8)? as usize;
        let type_end = type_start + u32_at(12)? as usize;
        let str_start = header_len + u32_at(16)? as usize;
        let str_end = str_start + u32_at(20)? as usize;
        let strings = data
            .get(str_start..str_end)
            .ok_or_else(|| bad("string section"))?;
        let name_at = |offset: u32| -> String {
            let tail = strings.get(offset as usize..).unwrap_or_default();
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            String::from_utf8_lossy(&tail[..end]).into_owned()
        };

        // Type id 0 is `void`.
        let mut types = vec![Type::Other];
        let mut by_name: HashMap<String, Vec<u32>> = HashMap::new();
        let mut at = type_start;
        while at < type_end {
            let name_off = u32_at(at)?;
            let info = u32_at(at + 4)?;
            let size_or_type = u32_at(at + 8)?;
            let kind = (info >> 24) & 0x1f;
            let vlen = (info & 0xffff) as usize;
            let kind_flag = info >> 31 == 1;
            at += 12;
            let ty = match kind {
                KIND_STRUCT | KIND_UNION => {
                    let mut members = Vec::with_capacity(vlen);
                    for i in 0..vlen {
                        let base = at + i * 12;
                        let offset = u32_at(base + 8)?;
                        members.push(Member {
                            name: name_at(u32_at(base)?),
                            type_id: u32_at(base + 4)?,
                            // With kind_flag the top 8 bits hold a bitfield size.
                            bit_offset: if kind_flag {
                                offset & 0xff_ffff
                            } else {
                                offset
                            },
                        });
                    }
                    at += vlen * 12;
                    Type::Composite { members }
                }
                KIND_PTR => Type::Pointer {
                    target: size_or_type,
                },
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    Type::Alias {
                        target: size_or_type,
                    }
                }
                KIND_FUNC_PROTO => {
                    let params = (0..vlen)
                        .map(|i| u32_at(at + i * 8 + 4))
                        .collect::<Result<_, _>>()?;
                    at += vlen * 8;
                    Type::FuncProto { params }
                }
                KIND_INT | KIND_VAR | KIND_DECL_TAG => {
                    at += 4;
                    Type::Other
                }
                KIND_ARRAY => {
                    at += 12;
                    Type::Other
                }
                KIND_ENUM => {
                    at += vlen * 8;
                    Type::Other
                }
                KIND_DATASEC | KIND_ENUM64 => {
                    at += vlen * 12;
                    Type::Other
                }
                _ => Type::Other,
            };
            let id = types.len() as u32;
            let name = name_at(name_off);
            if !name.is_empty() {
                by_name.entry(name).or_default().push(id);
            }
            types.push(ty);
        }
        Ok(Self { types, by_name })
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
        let typedef = self
            .by_name
            .get(&format!("btf_trace_{name}"))
            .and_then(|ids| ids.first())
            .ok_or_else(missing)?;
        // typedef -> pointer -> function prototype
        let Some(Type::Pointer { target }) = self.types.get(self.resolve_alias(*typedef) as usize)
        else {
            return Err(missing());
        };
        let Some(Type::FuncProto { params }) = self.types.get(self.resolve_alias(*target) as usize)
        else {
            return Err(missing());
        };
        let param = params.get(index + 1).ok_or_else(missing)?;
        Ok(matches!(
            self.types.get(self.resolve_alias(*param) as usize),
            Some(Type::Pointer { .. })
        ))
    }

    fn composite_by_name(&self, name: &str) -> Option<u32> {
        self.by_name.get(name)?.iter().copied().find(|&id| {
            matches!(self.types.get(id as usize), Some(Type::Composite { members }) if !members.is_empty())
        })
    }

    fn resolve_alias(&self, mut id: u32) -> u32 {
        while let Some(Type::Alias { target }) = self.types.get(id as usize) {
            id = *target;
        }
        id
    }

    /// (bit offset, type id) of member `name`, searching anonymous members recursively.
    fn find_member(&self, type_id: u32, name: &str) -> Option<(u32, u32)> {
        let Some(Type::Composite { members }) = self.types.get(type_id as usize) else {
            return None;
        };
        members.iter().find_map(|member| {
            if member.name == name {
                Some((member.bit_offset, member.type_id))
            } else if member.name.is_empty() {
                let inner = self.resolve_alias(member.type_id);
                self.find_member(inner, name)
                    .map(|(bits, ty)| (member.bit_offset + bits, ty))
            } else {
                None
            }
        })
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
            Btf::parse(b"not btf at all"),
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
}
