use std::{io, net::IpAddr, path::PathBuf, time::Duration};

use super::IpNet;

#[derive(Debug, thiserror::Error)]
pub enum FirewallError {
    #[error(
        "the `nft` command is not installed; install the Debian package `nftables` \
         (`apt-get install nftables`)"
    )]
    NftMissing,
    #[error("cannot run `nft`: {0}")]
    NftSpawn(#[source] io::Error),
    #[error("`nft {command}` failed: {stderr}")]
    NftFailed { command: String, stderr: String },
    #[error("cannot read the JSON printed by `nft {command}`: {source}")]
    NftOutput {
        command: String,
        source: serde_json::Error,
    },
    #[error("cannot enter the network namespace {path}: {source}")]
    Netns { path: PathBuf, source: io::Error },
    #[error("cannot open a netfilter netlink socket: {0}")]
    NetlinkSocket(#[source] io::Error),
    #[error("the kernel refused to update the banned sets: {source}")]
    Netlink { source: io::Error },
    #[error("prefix length /{prefix_len} is too long for {addr}")]
    InvalidPrefixLength { addr: IpAddr, prefix_len: u8 },
    #[error("{0:?} is not an IP address or network")]
    InvalidNet(String),
    #[error(
        "the ban of {net} has a timeout of {timeout:?}; it must be above zero and at most {max:?}"
    )]
    InvalidTimeout {
        net: IpNet,
        timeout: Duration,
        max: Duration,
    },
}
