//! Host programs the guest borrows where busybox falls short (its `ip` has no
//! `netns`, there is no `nft` or `promtool`), with the shared libraries and the
//! dynamic loader they need, at the same paths as on the host.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::elf::is_static_executable;
use super::payload::Payload;
use crate::host::command_output;

/// (host path, guest path) of the programs every guest gets. iproute2's ip takes
/// the place of busybox's; coreutils' true replaces busybox's because a copy of
/// a multi-call binary under another name does not run.
pub fn standard_programs() -> Vec<(PathBuf, String)> {
    [
        ("/bin/ip", "/sbin/ip"),
        ("/usr/sbin/nft", "/usr/sbin/nft"),
        ("/usr/bin/true", "/bin/true"),
    ]
    .into_iter()
    .map(|(host, guest)| (PathBuf::from(host), guest.to_owned()))
    .collect()
}

pub fn add_to(payload: &mut Payload, programs: Vec<(PathBuf, String)>) -> Result<()> {
    let mut libraries = BTreeSet::new();
    for (host, guest) in programs {
        libraries.extend(shared_libraries(&host)?);
        payload.copies.push((host, guest));
    }
    for library in libraries {
        // Copy the file a library name resolves to: the guest gets no symlinks
        // whose targets it lacks.
        let real = fs::canonicalize(&library)
            .with_context(|| format!("cannot resolve the shared library {library}"))?;
        payload.copies.push((real, library));
    }
    Ok(())
}

/// The absolute paths ldd resolves for `program`, its loader included.
fn shared_libraries(program: &Path) -> Result<Vec<String>> {
    // ldd fails on static executables.
    if is_static_executable(program)? {
        return Ok(Vec::new());
    }
    let listing = command_output(Command::new("ldd").arg(program))
        .with_context(|| format!("cannot list the shared libraries of {}", program.display()))?;
    // Lines look like "libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)" or
    // "/lib64/ld-linux-x86-64.so.2 (0x...)"; the vDSO has no file.
    Ok(listing
        .lines()
        .filter_map(|line| {
            let path = match line.split_once("=>") {
                Some((_, resolved)) => resolved.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| path.to_owned())
        })
        .collect())
}
