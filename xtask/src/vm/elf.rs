//! Static or dynamic? The guest has shared libraries only for the programs it
//! borrows from the host, so any other dynamic executable fails there with a
//! puzzling "not found".

use std::fs::File;
use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};

const PT_INTERP: u32 = 3;

pub fn require_static_executable(path: &Path) -> Result<()> {
    anyhow::ensure!(
        is_static_executable(path)?,
        "{} is dynamically linked and cannot run in the VM guest, which has no shared \
         libraries (is RUSTFLAGS or CARGO_ENCODED_RUSTFLAGS overriding +crt-static?)",
        path.display()
    );
    Ok(())
}

/// Whether the ELF file at `path` runs without a dynamic loader.
pub fn is_static_executable(path: &Path) -> Result<bool> {
    let mut head = Vec::new();
    File::open(path)
        .with_context(|| format!("cannot open {}", path.display()))?
        .take(64 * 1024)
        .read_to_end(&mut head)?;
    let interpreter = has_interpreter(&head)
        .with_context(|| format!("{} is not a 64-bit little-endian ELF file", path.display()))?;
    Ok(!interpreter)
}

/// Whether the program headers name a dynamic loader (PT_INTERP); None if the
/// bytes are not a 64-bit little-endian ELF header.
fn has_interpreter(head: &[u8]) -> Option<bool> {
    if head.get(..6)? != b"\x7fELF\x02\x01" {
        return None;
    }
    let u16_at = |at: usize| Some(u16::from_le_bytes(head.get(at..at + 2)?.try_into().ok()?));
    let program_headers = u64::from_le_bytes(head.get(0x20..0x28)?.try_into().ok()?) as usize;
    let entry_size = usize::from(u16_at(0x36)?);
    let count = usize::from(u16_at(0x38)?);
    (0..count).try_fold(false, |found, index| {
        let at = program_headers + index * entry_size;
        let kind = u32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?);
        Some(found || kind == PT_INTERP)
    })
}
