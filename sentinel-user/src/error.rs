//! The daemon library's one error type; the binary adds context with anyhow at the edge.

use std::{io, net::SocketAddr, path::PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "Sentinel must run as root (or with CAP_BPF and CAP_PERFMON) to load its eBPF programs; \
         try `sudo cargo xtask run`"
    )]
    NotPrivileged,
    #[error(
        "the kernel exposes no BTF at {path} ({source}); Sentinel needs a kernel built with \
         CONFIG_DEBUG_INFO_BTF=y"
    )]
    NoBtf { path: PathBuf, source: io::Error },
    #[error("the kernel's BTF could not be parsed: {0}")]
    BadBtf(String),
    #[error("the kernel's BTF has no {0}")]
    MissingKernelField(String),
    #[error("no cgroup2 hierarchy is mounted (searched /proc/self/mountinfo)")]
    NoCgroup2,
    #[error(
        "cannot listen for metrics on {addr}: {source}{hint}",
        hint = if source.kind() == io::ErrorKind::AddrInUse {
            " (is another sentinel running? choose another address with --metrics-addr)"
        } else {
            ""
        }
    )]
    MetricsListen { addr: SocketAddr, source: io::Error },
    #[error("cannot read the configuration file {path}: {source}")]
    ConfigRead { path: PathBuf, source: io::Error },
    #[error("{path}: {message}")]
    ConfigInvalid { path: PathBuf, message: String },
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("{file}: {source}")]
    CgroupIo { file: PathBuf, source: io::Error },
    #[error(
        "cannot enable the {controller} controller for children of {parent}: it has processes of \
         its own (cgroup v2's no-internal-processes rule); move them into a child cgroup"
    )]
    InternalProcesses { parent: String, controller: String },
    #[error(
        "the {controller} controller is not available in {parent} (cgroup.controllers: {available})"
    )]
    ControllerUnavailable {
        parent: String,
        controller: String,
        available: String,
    },
    #[error("cannot write the audit log {path}: {source}")]
    AuditLog { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Firewall(#[from] crate::firewall::FirewallError),
    #[error(transparent)]
    Io(#[from] io::Error),
}
