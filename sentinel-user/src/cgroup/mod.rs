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

/// The cgroup v2 path of a process, from the `0::` line of `/proc/PID/cgroup`.
pub fn cgroup_of_pid(pid: i32) -> Option<String> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    text.lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
}
