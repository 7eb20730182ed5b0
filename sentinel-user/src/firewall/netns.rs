//! Running the firewall inside another network namespace (tests use their own namespaces).
//!
//! A network namespace belongs to a thread, and a socket stays in the namespace it was created
//! in, so the netlink socket is created on a short-lived thread that entered the namespace, and
//! every `nft` child enters it before exec. The calling thread never changes namespace.

use std::{
    fs::File,
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::Command,
    thread,
};

use nix::sched::{CloneFlags, setns};

use crate::Error;

#[derive(Debug)]
pub(super) struct NetNamespace {
    path: PathBuf,
    handle: File,
}

impl NetNamespace {
    /// `path` names a namespace, e.g. `/run/netns/NAME` (from `ip netns add NAME`) or
    /// `/proc/PID/ns/net`.
    pub(super) fn open(path: &Path) -> Result<Self, Error> {
        let handle = File::open(path).map_err(|source| Error::Netns {
            path: path.to_owned(),
            source,
        })?;
        Ok(Self {
            path: path.to_owned(),
            handle,
        })
    }

    /// Runs `task` on a thread inside the namespace and returns its result.
    pub(super) fn run<T: Send>(
        &self,
        task: impl FnOnce() -> Result<T, Error> + Send,
    ) -> Result<T, Error> {
        thread::scope(|scope| {
            scope
                .spawn(|| {
                    setns(&self.handle, CloneFlags::CLONE_NEWNET).map_err(|errno| {
                        Error::Netns {
                            path: self.path.clone(),
                            source: errno.into(),
                        }
                    })?;
                    task()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }

    /// Makes `command`'s child enter the namespace before it execs.
    pub(super) fn enter_on_exec(&self, command: &mut Command) {
        let namespace = self.handle.as_raw_fd();
        // SAFETY: the closure runs between fork and exec and only makes the setns(2) system
        // call, which is async-signal-safe. The descriptor stays open as long as `self`, which
        // outlives the spawn.
        unsafe {
            command.pre_exec(move || {
                if libc::setns(namespace, libc::CLONE_NEWNET) == -1 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    }
}
