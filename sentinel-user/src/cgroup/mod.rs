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
