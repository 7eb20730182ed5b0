//! Attribution of kernel events to services: cgroup v2 ids, paths and bounded labels.

mod attribution;
pub mod cgroupfs;
pub mod guardian;
pub mod stats;
mod mount;
mod tree;

pub use attribution::{Attribution, ServiceTotals};
pub use mount::find_cgroup2_mount;
pub use tree::{CgroupTree, Lookup};
