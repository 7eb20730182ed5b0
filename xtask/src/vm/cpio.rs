//! Writer for the "newc" cpio format that the kernel unpacks as an initramfs.

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFCHR: u32 = 0o020_000;

/// Appends entries to a newc archive. Parent directories are created on demand
/// because the kernel does not create missing parents while unpacking.
pub struct CpioWriter<W: Write> {
    out: W,
    offset: u64,
    next_inode: u32,
    dirs: HashSet<String>,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        Self {
            out,
            offset: 0,
            next_inode: 1,
            dirs: HashSet::new(),
        }
    }

    pub fn dir(&mut self, path: &str) -> Result<()> {
        let path = path.trim_matches('/');
        if path.is_empty() || self.dirs.contains(path) {
            return Ok(());
        }
        self.parents(path)?;
        self.dirs.insert(path.to_owned());
        self.entry(path, S_IFDIR | 0o755, 0, (0, 0))
    }

    pub fn file(&mut self, path: &str, permissions: u32, data: &[u8]) -> Result<()> {
        let path = self.prepare(path)?;
        self.entry(&path, S_IFREG | permissions, data.len() as u64, (0, 0))?;
        self.write_data(data)
    }

    /// Copies a host file, keeping its permission bits.
    pub fn host_file(&mut self, path: &str, host: &Path) -> Result<()> {
        let mut source =
            File::open(host).with_context(|| format!("cannot open {}", host.display()))?;
        let metadata = source.metadata()?;
        let path = self.prepare(path)?;
        let permissions = metadata.permissions().mode() & 0o7777;
        self.entry(&path, S_IFREG | permissions, metadata.len(), (0, 0))?;
        let copied = io::copy(&mut source, &mut self.out)
            .with_context(|| format!("cannot copy {} into the archive", host.display()))?;
        anyhow::ensure!(
            copied == metadata.len(),
            "{} changed size while being archived",
            host.display()
        );
        self.offset += copied;
        self.pad(4)
    }

    /// Copies a host file or directory tree (regular files, directories, symlinks).
    pub fn host_tree(&mut self, path: &str, host: &Path) -> Result<()> {
        let metadata = fs::symlink_metadata(host)
            .with_context(|| format!("cannot stat {}", host.display()))?;
        if metadata.is_dir() {
            self.dir(path)?;
            let mut entries = fs::read_dir(host)
                .with_context(|| format!("cannot list {}", host.display()))?
                .collect::<io::Result<Vec<_>>>()?;
            // Sorted, so the same tree always gives the same archive.
            entries.sort_by_key(|entry| entry.file_name());
            for entry in entries {
                let name = entry.file_name();
                let name = name.to_str().with_context(|| {
                    format!("{} has a name that is not UTF-8", entry.path().display())
                })?;
                self.host_tree(&format!("{path}/{name}"), &entry.path())?;
            }
            Ok(())
        } else if metadata.is_symlink() {
            let target = fs::read_link(host)?;
            let target = target
                .to_str()
                .with_context(|| format!("{} points to a non-UTF-8 path", host.display()))?;
            self.symlink(path, target)
        } else if metadata.is_file() {
            self.host_file(path, host)
        } else {
            anyhow::bail!(
                "{} is neither a file, a directory nor a symlink",
                host.display()
            )
        }
    }

    pub fn symlink(&mut self, path: &str, target: &str) -> Result<()> {
        let path = self.prepare(path)?;
        self.entry(&path, S_IFLNK | 0o777, target.len() as u64, (0, 0))?;
        self.write_data(target.as_bytes())
    }

    pub fn char_device(&mut self, path: &str, permissions: u32, device: (u32, u32)) -> Result<()> {
        let path = self.prepare(path)?;
        self.entry(&path, S_IFCHR | permissions, 0, device)
    }

    /// Writes the trailer and pads to a 512-byte block, so that further archives
    /// can be appended (the kernel unpacks concatenated archives in order).
    pub fn finish(mut self) -> Result<W> {
        self.entry("TRAILER!!!", 0, 0, (0, 0))?;
        self.pad(512)?;
        self.out.flush()?;
        Ok(self.out)
    }

    fn prepare(&mut self, path: &str) -> Result<String> {
        let path = path.trim_matches('/').to_owned();
        anyhow::ensure!(!path.is_empty(), "empty path in the archive");
        self.parents(&path)?;
        Ok(path)
    }

    fn parents(&mut self, path: &str) -> Result<()> {
        match path.rsplit_once('/') {
            Some((parent, _)) => self.dir(parent),
            None => Ok(()),
        }
    }

    fn entry(&mut self, path: &str, mode: u32, size: u64, device: (u32, u32)) -> Result<()> {
        let size = u32::try_from(size)
            .with_context(|| format!("{path} is too large for a newc archive (4 GiB limit)"))?;
        let inode = self.next_inode;
        self.next_inode += 1;
        let name_size = path.len() + 1;
        let (rdev_major, rdev_minor) = device;
        // Fields: magic, ino, mode, uid, gid, nlink, mtime, filesize, devmajor,
        // devminor, rdevmajor, rdevminor, namesize, check.
        let header = format!(
            "070701{inode:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{size:08x}{:08x}{:08x}\
             {rdev_major:08x}{rdev_minor:08x}{name_size:08x}{:08x}",
            0, 0, 1, 0, 0, 0, 0
        );
        self.write_data_unpadded(header.as_bytes())?;
        self.write_data_unpadded(path.as_bytes())?;
        self.write_data(&[0])
    }

    fn write_data(&mut self, data: &[u8]) -> Result<()> {
        self.write_data_unpadded(data)?;
        self.pad(4)
    }

    fn write_data_unpadded(&mut self, data: &[u8]) -> Result<()> {
        self.out.write_all(data)?;
        self.offset += data.len() as u64;
        Ok(())
    }

    fn pad(&mut self, alignment: u64) -> Result<()> {
        let padding = (alignment - self.offset % alignment) % alignment;
        self.write_data_unpadded(&vec![0; padding as usize])
    }
}
