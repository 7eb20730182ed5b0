//! What the fuzz targets in `fuzz/` need of the netlink code, which is private to the crate.
//! Built only with the `fuzzing` feature, so the daemon's API stays as it is.

use crate::firewall::{self, Batch, IpNet};

/// The kernel's netlink and nf_tables numbers batches are made of.
pub use crate::firewall::abi as netlink_abi;

/// The table and the IPv4 and IPv6 sets that batches change.
pub const TABLE: &str = firewall::TABLE;
pub const SET_V4: &str = firewall::SET_V4;
pub const SET_V6: &str = firewall::SET_V6;

/// The datagram the firewall sends to delete `removed` and add `added` (network, timeout in
/// ms) in one transaction, numbered from `first_sequence`.
pub fn netlink_batch(
    first_sequence: u32,
    removed: &[IpNet],
    added: &[(IpNet, Option<u64>)],
) -> Vec<u8> {
    Batch::transaction(
        first_sequence,
        removed.iter().copied(),
        added.iter().copied(),
    )
    .bytes
}

/// The error code of each acknowledgement or error in a datagram from nf_tables.
pub fn netlink_error_codes(datagram: &[u8]) -> Vec<i32> {
    firewall::error_codes(datagram).collect()
}

/// Whether a datagram of nf_tables notifications removes something from Sentinel's table.
pub fn netlink_removes_from_our_table(datagram: &[u8]) -> bool {
    firewall::removes_from_our_table(datagram)
}
