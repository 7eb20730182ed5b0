//! The files the SSH probes depend on, followed while the daemon runs: libpam, whose functions
//! the uprobes attach to, and the sshd executables, whose inodes the kernel side checks so that
//! only the real sshd's authentications count. Package upgrades replace both (a new file renamed
//! over the old one, so a new inode); what they point to is re-read every second.

use std::{
    collections::VecDeque,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
    process::Command,
};

use aya::maps::{HashMap, MapData};
use sentinel_common::MAX_SSHD_EXECUTABLES;
use tracing::{info, warn};

/// Where OpenSSH's executables live across distributions: sshd itself, and since OpenSSH 9.8
/// sshd-session and sshd-auth, which run the PAM calls.
pub const DEFAULT_SSHD_PATHS: &[&str] = &[
    "/usr/sbin/sshd",
    "/usr/lib/openssh/sshd-session",
    "/usr/lib/openssh/sshd-auth",
    "/usr/libexec/openssh/sshd-session",
    "/usr/libexec/openssh/sshd-auth",
    "/usr/libexec/sshd-session",
    "/usr/libexec/sshd-auth",
    "/usr/local/sbin/sshd",
    "/usr/local/libexec/sshd-session",
    "/usr/local/libexec/sshd-auth",
];

/// `libpam.so.0` as the dynamic loader finds it for sshd, from its cache (`ldconfig -p`).
pub fn find_libpam() -> Option<PathBuf> {
    let output = ["ldconfig", "/sbin/ldconfig"]
        .iter()
        .find_map(|program| Command::new(program).arg("-p").output().ok())?;
    libpam_in_cache_listing(&String::from_utf8_lossy(&output.stdout))
}

/// The `libpam.so.0` entry of `ldconfig -p` for this machine's architecture.
fn libpam_in_cache_listing(listing: &str) -> Option<PathBuf> {
    let native = match std::env::consts::ARCH {
        "x86_64" => "x86-64",
        "aarch64" => "AArch64",
        other => other,
    };
    let entries: Vec<(&str, &str)> = listing
        .lines()
        .filter_map(|line| {
            let (name, rest) = line.trim().split_once(' ')?;
            let (flags, path) = rest.split_once(" => ")?;
            (name == "libpam.so.0").then_some((flags, path.trim()))
        })
        .collect();
    entries
        .iter()
        .find(|(flags, _)| flags.contains(native))
        .or_else(|| entries.first())
        .map(|(_, path)| PathBuf::from(path))
}

/// The inode `path` names now (following symlinks, as exec and the loader do).
pub fn inode(path: &Path) -> Option<u64> {
    std::fs::metadata(path).ok().map(|meta| meta.ino())
}

/// Keeps the kernel's list of sshd executables (by inode) current.
pub struct SshFiles {
    executables: HashMap<MapData, u64, u8>,
    sshd_paths: Vec<PathBuf>,
    /// What is in the map, oldest first: replaced binaries stay while their processes may run.
    listed: VecDeque<u64>,
}

impl SshFiles {
    /// Where the sshd executables are looked for.
    pub fn paths(&self) -> &[PathBuf] {
        &self.sshd_paths
    }

    pub fn new(executables: HashMap<MapData, u64, u8>, sshd_paths: Vec<PathBuf>) -> Self {
        let mut files = Self {
            executables,
            sshd_paths,
            listed: VecDeque::new(),
        };
        if files.refresh() == 0 {
            warn!(
                paths = ?files.sshd_paths,
                "no sshd executable found: SSH authentications will not be counted"
            );
        }
        files
    }

    /// Lists the inodes the sshd paths name now; returns how many paths exist.
    pub fn refresh(&mut self) -> usize {
        let current: Vec<(PathBuf, u64)> = self
            .sshd_paths
            .iter()
            .filter_map(|path| Some((path.clone(), inode(path)?)))
            .collect();
        for (path, inode) in &current {
            if self.listed.contains(inode) {
                continue;
            }
            if self.listed.len() >= MAX_SSHD_EXECUTABLES
                && let Some(oldest) = self.listed.pop_front()
            {
                let _ = self.executables.remove(&oldest);
            }
            match self.executables.insert(inode, 1, 0) {
                Ok(()) => {
                    info!(executable = %path.display(), inode, "sshd executable listed");
                    self.listed.push_back(*inode);
                }
                Err(error) => warn!(
                    executable = %path.display(),
                    "cannot list the sshd executable for the SSH probes: {error}"
                ),
            }
        }
        current.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn libpam_is_the_native_entry_of_the_loader_cache() {
        let listing = "\
1234 libs found in cache `/etc/ld.so.cache'
\tlibpamc.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libpamc.so.0
\tlibpam_misc.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libpam_misc.so.0
\tlibpam.so.0 (libc6) => /lib/i386-linux-gnu/libpam.so.0
\tlibpam.so.0 (libc6,x86-64) => /lib/x86_64-linux-gnu/libpam.so.0
\tlibpam.so.0 (libc6,AArch64) => /lib/aarch64-linux-gnu/libpam.so.0
";
        let expected = match std::env::consts::ARCH {
            "aarch64" => "/lib/aarch64-linux-gnu/libpam.so.0",
            "x86_64" => "/lib/x86_64-linux-gnu/libpam.so.0",
            _ => "/lib/i386-linux-gnu/libpam.so.0",
        };
        assert_eq!(
            libpam_in_cache_listing(listing),
            Some(PathBuf::from(expected))
        );
        assert_eq!(
            libpam_in_cache_listing("\tlibpamc.so.0 (libc6) => /x\n"),
            None
        );
    }
}
