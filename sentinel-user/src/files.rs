//! Files the daemon follows through replacement: allowed executables, libpam and the sshd
//! executables (package upgrades), the configuration file (editors). A replacement is a change
//! in a file's directory, or in the directory of the file a symlink leads to; the kernel reports
//! those (inotify), so the followers wake when something changed, not on a timer.

use std::{
    collections::{BTreeSet, HashMap},
    path::{Path, PathBuf},
    sync::Arc,
};

use nix::{
    errno::Errno,
    sys::inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
};
use tracing::warn;

/// The directories whose changes can replace one of `paths`: each path's own directory, and
/// the directory of the file a symlink leads to.
pub fn directories<P: AsRef<Path>>(paths: &[P]) -> BTreeSet<PathBuf> {
    let mut dirs = BTreeSet::new();
    for path in paths {
        let path = path.as_ref();
        dirs.extend(path.parent().map(Path::to_path_buf));
        if let Ok(target) = std::fs::canonicalize(path) {
            dirs.extend(target.parent().map(Path::to_path_buf));
        }
    }
    dirs
}

/// The kernel's notices of files made, replaced, written or removed in some directories.
pub struct DirectoryWatch {
    inotify: Arc<Inotify>,
    watched: HashMap<PathBuf, WatchDescriptor>,
}

impl DirectoryWatch {
    pub fn new() -> nix::Result<Self> {
        Ok(Self {
            inotify: Arc::new(Inotify::init(InitFlags::IN_CLOEXEC)?),
            watched: HashMap::new(),
        })
    }

    /// Watches exactly `directories` from now on. A directory that does not exist (yet) is not
    /// watched: the follower's own look every few seconds finds what appears there.
    pub fn watch(&mut self, directories: &BTreeSet<PathBuf>) {
        let changes = AddWatchFlags::IN_CREATE
            | AddWatchFlags::IN_MOVED_TO
            | AddWatchFlags::IN_MOVED_FROM
            | AddWatchFlags::IN_DELETE
            | AddWatchFlags::IN_CLOSE_WRITE
            | AddWatchFlags::IN_ATTRIB
            | AddWatchFlags::IN_ONLYDIR;
        self.watched.retain(|dir, descriptor| {
            let keep = directories.contains(dir);
            if !keep {
                let _ = self.inotify.rm_watch(*descriptor);
            }
            keep
        });
        for dir in directories {
            if self.watched.contains_key(dir) {
                continue;
            }
            if let Ok(descriptor) = self.inotify.add_watch(dir.as_path(), changes) {
                self.watched.insert(dir.clone(), descriptor);
            }
        }
    }

    /// Calls `changed` from a thread of its own, named `name`, after each batch of notices,
    /// for the daemon's whole life (the process exit ends the thread). If reading them fails,
    /// it says so and ends: the follower's own look every few seconds is left.
    pub fn notify_from_thread(&self, name: &str, changed: impl FnMut() -> bool + Send + 'static) {
        let waiter = self.waiter();
        let thread = name.to_string();
        let spawned = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                if let Err(errno) = waiter.notify(changed) {
                    warn!(
                        thread,
                        "cannot read the notices of followed files' directories ({errno})"
                    );
                }
            });
        if let Err(error) = spawned {
            warn!(
                name,
                "cannot wait for notices of followed files' directories ({error})"
            );
        }
    }

    /// A handle on the same notices, for the thread that waits on them.
    pub fn waiter(&self) -> Notices {
        Notices(Arc::clone(&self.inotify))
    }
}

/// The notices of a [`DirectoryWatch`], waited on by a thread of their own.
pub struct Notices(Arc<Inotify>);

impl Notices {
    /// Blocks until something changed in a watched directory: calls `changed` after each batch
    /// of notices until it answers false (its receiver gone).
    pub fn notify(&self, mut changed: impl FnMut() -> bool) -> nix::Result<()> {
        loop {
            match self.0.read_events() {
                Ok(_) => {
                    if !changed() {
                        return Ok(());
                    }
                }
                Err(Errno::EINTR) => {}
                Err(errno) => return Err(errno),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::symlink, sync::mpsc, time::Duration};

    use super::*;

    #[test]
    fn a_replaced_file_is_noticed_in_its_directory_and_its_links_target() {
        let root = std::env::temp_dir().join(format!("sentinel-files-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for dir in ["etc", "lib"] {
            std::fs::create_dir_all(root.join(dir)).unwrap();
        }
        std::fs::write(root.join("lib/libpam.so.0.85.1"), "old").unwrap();
        symlink(
            root.join("lib/libpam.so.0.85.1"),
            root.join("etc/libpam.so.0"),
        )
        .unwrap();
        let followed = [root.join("etc/libpam.so.0")];
        assert_eq!(
            directories(&followed),
            BTreeSet::from([root.join("etc"), root.join("lib")])
        );
        let mut watch = DirectoryWatch::new().unwrap();
        watch.watch(&directories(&followed));
        let (changes, changed) = mpsc::channel();
        let waiter = watch.waiter();
        std::thread::spawn(move || waiter.notify(|| changes.send(()).is_ok()));
        // An upgrade: the new library beside the old, renamed over it.
        std::fs::write(root.join("lib/libpam.so.0.85.1.new"), "new").unwrap();
        std::fs::rename(
            root.join("lib/libpam.so.0.85.1.new"),
            root.join("lib/libpam.so.0.85.1"),
        )
        .unwrap();
        changed
            .recv_timeout(Duration::from_secs(60))
            .expect("the rename is noticed");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
