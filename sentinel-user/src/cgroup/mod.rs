//! Attribution of kernel events to services: cgroup v2 ids, paths and bounded labels.

mod attribution;
pub mod cgroupfs;
pub mod guardian;
mod mount;
pub mod stats;
mod tree;

pub use attribution::{Attribution, ServiceTotals, UNKNOWN, service_name};
pub use mount::find_cgroup2_mount;
pub use tree::{CgroupTree, Lookup, walk_hierarchy};

/// A cgroup's path from the cgroup2 root (`/`-prefixed), shared by every table that names
/// the cgroup: thousands of policed cgroups are each named once in memory.
pub type CgroupPath = std::sync::Arc<str>;

/// Where the limits of systemd units' cgroups are set (`services.cgroup_backend`). Cgroups no
/// unit owns (delegated subtrees, containers' trees) are written directly with every value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupBackend {
    /// Through systemd on a host booted with systemd; directly elsewhere.
    Auto,
    /// Through systemd; the daemon refuses to start on a host not booted with systemd.
    Systemd,
    /// Directly, for every cgroup: systemd undoes a unit's limits when it restarts the unit.
    Cgroupfs,
}

/// The cgroup v2 path of a process, from the `0::` line of `/proc/PID/cgroup`.
pub fn cgroup_of_pid(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}
