//! The cgroupfs backend: reads and writes cgroup v2 interface files under the cgroup2 mount.
//!
//! cgroups-rs is not used: its v2 hierarchy is fixed to `/sys/fs/cgroup` and `auto()` falls
//! back to the v1 hierarchies on hybrid hosts, which Sentinel must never touch.

use std::{
    collections::HashMap,
    ffi::{CStr, CString},
    fs,
    io::{ErrorKind, Read, Write},
    os::unix::{
        ffi::{OsStrExt, OsStringExt},
        fs::{FileExt, MetadataExt},
    },
    path::{Path, PathBuf},
};

use nix::{
    errno::Errno,
    fcntl::OFlag,
    sys::{
        stat::Mode,
        statfs::{CGROUP2_SUPER_MAGIC, statfs},
    },
};

use crate::Error;

/// The longest interface file path made on the stack, with its NUL.
const ON_STACK: usize = 256;

/// Controllers Sentinel's limits need, in the order they are enabled.
pub const CONTROLLERS: [&str; 3] = ["memory", "cpu", "pids"];

/// The ancestors' `cgroup.subtree_control` as last read or written, by parent path: one pass
/// over many cgroups under the same parents reads each parent once. Made anew for each pass,
/// so that what someone else changed between passes is read again.
#[derive(Debug, Default)]
pub struct SubtreeControls {
    enabled: HashMap<String, String>,
    /// The last cgroup's parent and the controllers found available to its children: the next
    /// cgroups, nearly always its siblings, need no lookup.
    confirmed: Option<(String, Vec<String>)>,
}

#[derive(Debug, Clone)]
pub struct CgroupFs {
    root: PathBuf,
    /// The root is a cgroup2 mount, whose interface files take each write whole: they are
    /// opened without `O_CREAT` and `O_TRUNC`, so that the open stays on the kernel's lockless
    /// path lookup and no truncation is made for the file to ignore. Elsewhere (a test's tree of
    /// regular files) a write replaces the file's content.
    interface_files: bool,
}

impl CgroupFs {
    pub fn new(root: PathBuf) -> Self {
        let interface_files =
            statfs(&root).is_ok_and(|found| found.filesystem_type() == CGROUP2_SUPER_MAGIC);
        Self {
            root,
            interface_files,
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of `path` (relative to the root, `/`-prefixed or not).
    pub fn dir(&self, path: &str) -> PathBuf {
        self.root.join(path.trim_start_matches('/'))
    }

    /// `file` of the cgroup at `path`.
    fn file(&self, path: &str, file: &str) -> PathBuf {
        let relative = path.trim_matches('/');
        let mut joined = self.root.clone();
        if !relative.is_empty() {
            joined.push(relative);
        }
        joined.push(file);
        joined
    }

    /// Calls `call` with the path of `file` of the cgroup at `path`, or of its directory when
    /// `file` is empty. Thousands are named per pass: the path is made on the stack, unless it
    /// is longer than [`ON_STACK`] (deep in a delegated tree).
    fn with_path<T>(
        &self,
        path: &str,
        file: &str,
        call: impl FnOnce(&CStr) -> nix::Result<T>,
    ) -> nix::Result<T> {
        let relative = path.trim_matches('/');
        let parts = [
            self.root.as_os_str().as_bytes(),
            b"/",
            relative.as_bytes(),
            b"/",
            file.as_bytes(),
        ];
        let length: usize = parts.iter().map(|part| part.len()).sum();
        if length >= ON_STACK {
            return call(
                &CString::new(self.file(path, file).into_os_string().into_vec())
                    .map_err(|_| Errno::EINVAL)?,
            );
        }
        let mut joined = [0; ON_STACK];
        let mut at = 0;
        for part in parts {
            joined[at..at + part.len()].copy_from_slice(part);
            at += part.len();
        }
        // A NUL inside `path` or `file` would name another file: refused.
        call(CStr::from_bytes_with_nul(&joined[..=at]).map_err(|_| Errno::EINVAL)?)
    }

    /// Calls `call` with the path of the cgroup directory at `path`, made as [`Self::with_path`]
    /// makes it.
    pub fn with_dir<T>(
        &self,
        path: &str,
        call: impl FnOnce(&CStr) -> nix::Result<T>,
    ) -> nix::Result<T> {
        self.with_path(path, "", call)
    }

    /// Opens `file` of the cgroup at `path`.
    fn open(&self, path: &str, file: &str, flags: OFlag) -> Result<fs::File, Error> {
        let flags = flags | OFlag::O_CLOEXEC;
        let mode = Mode::from_bits_truncate(0o666);
        self.with_path(path, file, |joined| nix::fcntl::open(joined, flags, mode))
            .map(fs::File::from)
            .map_err(|errno| self.io_error(path, file, errno.into()))
    }

    /// A failed read or write of `file` of the cgroup at `path`, naming the file.
    fn io_error(&self, path: &str, file: &str, source: std::io::Error) -> Error {
        Error::CgroupIo {
            file: self.file(path, file),
            source,
        }
    }

    pub fn read(&self, path: &str, file: &str) -> Result<String, Error> {
        let mut text = Vec::new();
        let mut opened = self.open(path, file, OFlag::O_RDONLY)?;
        read_interface_file(&mut opened, &mut text)
            .map(|text| text.trim_end().to_string())
            .map_err(|source| self.io_error(path, file, source))
    }

    pub fn write(&self, path: &str, file: &str, value: &str) -> Result<(), Error> {
        let flags = if self.interface_files {
            OFlag::O_WRONLY
        } else {
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_TRUNC
        };
        self.open(path, file, flags)?
            .write_all(value.as_bytes())
            .map_err(|source| self.io_error(path, file, source))
    }

    /// Writes `value` and returns what the file held before, opening it once.
    pub fn swap(&self, path: &str, file: &str, value: &str) -> Result<String, Error> {
        let mut opened = self.open(path, file, OFlag::O_RDWR)?;
        let mut swap = || {
            // A limit is a few bytes: read on the stack, and into a buffer made only for a
            // longer file.
            let mut first = [0; FIRST_READ];
            let read = opened.read(&mut first)?;
            let mut longer = Vec::new();
            let text = if read < FIRST_READ {
                std::str::from_utf8(&first[..read])
                    .map_err(|_| std::io::Error::from(ErrorKind::InvalidData))?
            } else {
                longer.extend_from_slice(&first);
                read_on(&mut opened, &mut longer, read)?
            };
            let previous = text.trim_end().to_string();
            // Interface files take each write whole, wherever the offset; at 0 a regular file
            // (a test's fake tree) reads the same way.
            opened.write_all_at(value.as_bytes(), 0)?;
            Ok(previous)
        };
        swap().map_err(|source| self.io_error(path, file, source))
    }

    pub fn exists(&self, path: &str) -> bool {
        self.dir(path).is_dir()
    }

    /// The cgroup's id: its directory's inode number, new for a cgroup made again at the same
    /// path. `None` when it does not exist.
    pub fn id(&self, path: &str) -> Option<u64> {
        std::fs::metadata(self.dir(path))
            .ok()
            .filter(|meta| meta.is_dir())
            .map(|meta| meta.ino())
    }

    /// Makes `controllers` available to `path` by enabling them in `cgroup.subtree_control` of
    /// every ancestor from the root down, skipping those that already have them (as `known`
    /// last saw them).
    pub fn enable_controllers(
        &self,
        path: &str,
        controllers: &[&str],
        known: &mut SubtreeControls,
    ) -> Result<(), Error> {
        let relative = path.trim_matches('/');
        // The root has no parent.
        if relative.is_empty() {
            return Ok(());
        }
        let direct_parent = relative.rsplit_once('/').map_or("", |(parent, _)| parent);
        if let Some((confirmed, available)) = &known.confirmed
            && confirmed == direct_parent
            && controllers
                .iter()
                .all(|controller| available.iter().any(|c| c == controller))
        {
            return Ok(());
        }
        // Each ancestor as a prefix of the path, the root (``) first: no copy of a parent's
        // name or of what it enables on the way, so that thousands of cgroups under a few
        // parents cost a lookup each.
        let ancestors = std::iter::once("")
            .chain(relative.match_indices('/').map(|(at, _)| &relative[..at]))
            .filter(|parent| !parent.ends_with('/'));
        for parent in ancestors {
            if !known.enabled.contains_key(parent) {
                let enabled = self.read(parent, "cgroup.subtree_control")?;
                known.enabled.insert(parent.to_owned(), enabled);
            }
            let enabled = &known.enabled[parent];
            let has = |controller: &&str| enabled.split_whitespace().any(|c| c == *controller);
            if controllers.iter().all(has) {
                continue;
            }
            let missing: Vec<&str> = controllers.iter().copied().filter(|c| !has(c)).collect();
            let enabled = enabled.clone();
            let available = self.read(parent, "cgroup.controllers")?;
            if let Some(controller) = missing
                .iter()
                .find(|controller| !available.split_whitespace().any(|c| c == **controller))
            {
                return Err(Error::ControllerUnavailable {
                    parent: display_path(parent),
                    controller: controller.to_string(),
                    available,
                });
            }
            // One write enables them all: the kernel takes space-separated tokens.
            let enable: Vec<String> = missing.iter().map(|c| format!("+{c}")).collect();
            match self.write(parent, "cgroup.subtree_control", &enable.join(" ")) {
                Err(Error::CgroupIo { source, .. }) if source.kind() == ErrorKind::ResourceBusy => {
                    return Err(Error::InternalProcesses {
                        parent: display_path(parent),
                        controller: missing.join(" "),
                    });
                }
                other => other?,
            }
            known.enabled.insert(
                parent.to_owned(),
                format!("{enabled} {}", missing.join(" ")),
            );
        }
        known.confirmed = Some((
            direct_parent.to_owned(),
            controllers.iter().map(ToString::to_string).collect(),
        ));
        Ok(())
    }

    /// Pids of the processes in `path` and all its descendants.
    pub fn processes(&self, path: &str) -> Vec<i32> {
        let mut pids = Vec::new();
        let mut pending = vec![self.dir(path)];
        while let Some(dir) = pending.pop() {
            if let Ok(procs) = fs::read_to_string(dir.join("cgroup.procs")) {
                pids.extend(procs.lines().filter_map(|pid| pid.parse::<i32>().ok()));
            }
            if let Ok(entries) = fs::read_dir(&dir) {
                pending.extend(
                    entries
                        .flatten()
                        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                        .map(|e| e.path()),
                );
            }
        }
        pids
    }
}

/// The first `read` into a buffer that has no room yet: most interface files are one line.
/// A read that fills the room given may have left more behind (the room then doubles); a
/// short one reached the end.
pub(crate) const FIRST_READ: usize = 128;

/// The whole text of an opened interface file, read into `buffer` (kept by callers that read
/// many files) with as few `read` calls as it takes: unlike `read_to_string`, no `statx` and
/// `lseek` for a size hint that cgroupfs does not give, and no extra `read` to see the end.
pub fn read_interface_file<'a>(
    file: &mut fs::File,
    buffer: &'a mut Vec<u8>,
) -> std::io::Result<&'a str> {
    read_on(file, buffer, 0)
}

/// [`read_interface_file`] once `buffer[..filled]` is read.
fn read_on<'a>(
    file: &mut fs::File,
    buffer: &'a mut Vec<u8>,
    mut filled: usize,
) -> std::io::Result<&'a str> {
    // The buffer keeps its length between reads: zeroed once as it grows, not at every file.
    loop {
        if filled == buffer.len() {
            buffer.resize((2 * filled).max(FIRST_READ), 0);
        }
        filled += file.read(&mut buffer[filled..])?;
        if filled < buffer.len() {
            break;
        }
    }
    std::str::from_utf8(&buffer[..filled]).map_err(|_| std::io::Error::from(ErrorKind::InvalidData))
}

fn display_path(path: &str) -> String {
    if path.is_empty() {
        "/".into()
    } else {
        format!("/{path}")
    }
}

#[cfg(test)]
mod tests {
    use nix::sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor};

    use super::*;

    /// A fake cgroup tree in a temp dir: plain files stand in for interface files.
    struct FakeTree(PathBuf);

    impl FakeTree {
        fn new(controllers: &str) -> Self {
            let root = std::env::temp_dir().join(format!(
                "sentinel-cgroupfs-{}-{}",
                std::process::id(),
                rand_suffix()
            ));
            for dir in ["", "a", "a/b"] {
                fs::create_dir_all(root.join(dir)).unwrap();
                fs::write(root.join(dir).join("cgroup.controllers"), controllers).unwrap();
                fs::write(root.join(dir).join("cgroup.subtree_control"), "").unwrap();
            }
            Self(root)
        }
    }

    impl Drop for FakeTree {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn rand_suffix() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    }

    #[test]
    fn enables_controllers_in_every_ancestor() {
        let tree = FakeTree::new("cpu memory pids io");
        let fs = CgroupFs::new(tree.0.clone());
        fs.write("a", "cgroup.subtree_control", "memory").unwrap();
        // Every write to an interface file is seen, not only the last one: each closes a file
        // opened for writing.
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK).unwrap();
        let watched: Vec<(WatchDescriptor, &str)> = ["", "a", "a/b"]
            .into_iter()
            .map(|dir| {
                let file = tree.0.join(dir).join("cgroup.subtree_control");
                (
                    inotify
                        .add_watch(&file, AddWatchFlags::IN_CLOSE_WRITE)
                        .unwrap(),
                    dir,
                )
            })
            .collect();
        let mut known = SubtreeControls::default();
        fs.enable_controllers("/a/b", &CONTROLLERS, &mut known)
            .unwrap();
        // A sibling in the same pass reads and writes no parent again.
        fs::create_dir_all(tree.0.join("a/c")).unwrap();
        fs.enable_controllers("/a/c", &CONTROLLERS, &mut known)
            .unwrap();
        let mut writes: Vec<&str> = inotify
            .read_events()
            .unwrap()
            .iter()
            .map(|event| watched.iter().find(|(wd, _)| *wd == event.wd).unwrap().1)
            .collect();
        writes.sort();
        // Each ancestor that lacks a controller gets exactly one write naming all it lacks; the
        // cgroup itself none.
        assert_eq!(writes, ["", "a"]);
        assert_eq!(
            fs.read("", "cgroup.subtree_control").unwrap(),
            "+memory +cpu +pids"
        );
        assert_eq!(
            fs.read("a", "cgroup.subtree_control").unwrap(),
            "+cpu +pids"
        );
        assert_eq!(fs.read("a/b", "cgroup.subtree_control").unwrap(), "");
    }

    #[test]
    fn swap_writes_and_returns_what_was_there() {
        let tree = FakeTree::new("");
        let fs = CgroupFs::new(tree.0.clone());
        fs.write("a", "memory.max", "max\n").unwrap();
        assert_eq!(fs.swap("a", "memory.max", "1048576").unwrap(), "max");
        assert_eq!(fs.read("a", "memory.max").unwrap(), "1048576");
        // Read on the stack up to its size, and whole beyond it.
        for length in [FIRST_READ - 1, FIRST_READ, FIRST_READ + 1, 5 * FIRST_READ] {
            let long: String = ('a'..='z').cycle().take(length).collect();
            fs::write(tree.0.join(format!("a/long.{length}")), &long).unwrap();
            assert_eq!(fs.swap("a", &format!("long.{length}"), "1").unwrap(), long);
        }
        let error = fs.swap("a", "no.such.file", "1").unwrap_err();
        assert!(error.to_string().contains("no.such.file"), "{error}");
    }

    #[test]
    fn files_of_deep_cgroups_are_written_and_a_nul_in_a_name_is_refused() {
        let tree = FakeTree::new("");
        let fs = CgroupFs::new(tree.0.clone());
        // Past the paths made on the stack, and at the edge of it.
        let root_length = tree.0.as_os_str().len();
        let edge = "e".repeat(ON_STACK - root_length - "//memory.max".len() - 1);
        for cgroup in ["d/".repeat(ON_STACK), edge] {
            fs::create_dir_all(tree.0.join(&cgroup)).unwrap();
            fs.write(&cgroup, "memory.max", "max").unwrap();
            assert_eq!(fs.swap(&cgroup, "memory.max", "1048576").unwrap(), "max");
            assert_eq!(fs.read(&cgroup, "memory.max").unwrap(), "1048576");
        }
        // Cut at its NUL, this path would name `a`'s memory.max.
        fs.write("a", "memory.max", "max").unwrap();
        let error = fs.write("a/memory.max\0", "memory.max", "1").unwrap_err();
        assert!(error.to_string().contains("memory.max"), "{error}");
        assert_eq!(fs.read("a", "memory.max").unwrap(), "max");
        // Past the stack too: cut at its NUL, this one would name the deep cgroup's file.
        let deep = "d/".repeat(ON_STACK);
        let error = fs
            .write(&format!("{deep}memory.max\0"), "memory.max", "1")
            .unwrap_err();
        assert!(error.to_string().contains("memory.max"), "{error}");
        assert_eq!(fs.read(&deep, "memory.max").unwrap(), "1048576");
    }

    #[test]
    fn missing_controller_is_a_clear_error() {
        let tree = FakeTree::new("cpu pids");
        let fs = CgroupFs::new(tree.0.clone());
        let error = fs
            .enable_controllers("a", &["memory"], &mut SubtreeControls::default())
            .unwrap_err();
        assert_eq!(
            error.to_string(),
            "the memory controller is not available in / (cgroup.controllers: cpu pids)"
        );
    }

    #[test]
    fn lists_processes_recursively() {
        let tree = FakeTree::new("");
        fs::write(tree.0.join("a/cgroup.procs"), "10\n11\n").unwrap();
        fs::write(tree.0.join("a/b/cgroup.procs"), "12\n").unwrap();
        let mut pids = CgroupFs::new(tree.0.clone()).processes("a");
        pids.sort();
        assert_eq!(pids, vec![10, 11, 12]);
    }
}
