//! The daemon library's one error type; the binary adds context with anyhow at the edge.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    path::PathBuf,
    time::Duration,
};

use crate::{firewall::IpNet, yaml::Diagnostics};

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
    /// Every problem of the file, one per line as `file:line:column: reason`.
    #[error("{0}")]
    ConfigInvalid(Diagnostics),
    #[error("loading the eBPF object failed: {0}")]
    Ebpf(#[from] aya::EbpfError),
    #[error("eBPF map error: {0}")]
    Map(#[from] aya::maps::MapError),
    #[error("the eBPF object has no map named {0}")]
    MissingMap(&'static str),
    #[error("the kernel's cgroup iterator is unavailable: {0}")]
    CgroupIterator(String),
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
    #[error(
        "cannot connect to systemd over the system bus: {0}; the limits of systemd units are \
         set only through systemd, so they stay as they are until it answers"
    )]
    SystemdConnect(#[source] Box<zbus::Error>),
    #[error("systemd's {call} for {target} failed: {source}")]
    Systemd {
        call: &'static str,
        target: String,
        source: Box<zbus::Error>,
    },
    #[error("systemd did not answer {call} within {after:?}")]
    SystemdTimeout { call: &'static str, after: Duration },
    #[error(
        "systemd accepted the limits of {unit}, but its cgroup's {file} reads {found}, not \
         {expected}"
    )]
    SystemdNotApplied {
        unit: String,
        file: &'static str,
        expected: String,
        found: String,
    },
    #[error(
        "the limits Sentinel set on {unit} before are not given back yet (systemd has not \
         reloaded its drop-ins); its new limits wait until they are"
    )]
    SystemdNotGivenBack { unit: String },
    #[error(
        "this host was not booted with systemd (/run/systemd/system is missing), so limits cannot \
         be set through systemd; set services.cgroup_backend to auto or cgroupfs"
    )]
    SystemdRequired,
    #[error(
        "cannot {action} systemd's runtime drop-in {path}: {source}{hint}",
        hint = if source.kind() == io::ErrorKind::ReadOnlyFilesystem {
            " (the service needs ReadWritePaths=/run/systemd/system.control, as the shipped unit \
             has)"
        } else {
            ""
        }
    )]
    DropIn {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("cannot write the audit log {path}: {source}")]
    AuditLog { path: PathBuf, source: io::Error },
    #[error("the {component} stopped: {reason}")]
    ComponentStopped {
        component: &'static str,
        reason: String,
    },
    #[error("the SSH guard could not start: {0}")]
    SshGuardStart(Box<Error>),
    #[error("the saved state {path}: {source}")]
    State { path: PathBuf, source: io::Error },
    #[error("cannot create the control socket {path}: {source}")]
    ControlSocket { path: PathBuf, source: io::Error },
    #[error("another sentinel is running: it is listening on {path}")]
    ControlSocketInUse { path: PathBuf },
    #[error(
        "cannot reach the sentinel daemon at {path}: is it running? (start it with `sentinel run`)"
    )]
    DaemonUnreachable { path: PathBuf },
    #[error(
        "the sentinel daemon is running (its control socket {path} answers) and would set the \
         limits again at once: stop it first (systemctl stop sentinel)"
    )]
    DaemonRunning { path: PathBuf },
    #[error("permission denied: the control socket is root-only; use sudo")]
    ControlPermissionDenied,
    #[error("talking to the sentinel daemon at {path} failed: {source}")]
    ControlIo { path: PathBuf, source: io::Error },
    #[error("the sentinel daemon sent an invalid answer: {0}")]
    ControlProtocol(String),
    /// The daemon understood the request and refused it; the message is the daemon's.
    #[error("{0}")]
    ControlRejected(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    ReloadRefused(String),

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
    #[error(
        "cannot isolate services: nft names cgroups under /sys/fs/cgroup, and the cgroup2 \
         hierarchy is mounted at {cgroup2}"
    )]
    IsolationUnavailable { cgroup2: PathBuf },
    #[error("cannot watch the directories of allowed executables: {0}")]
    ExecWatch(#[source] io::Error),
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
    #[error("the CrowdSec credential file {path}: {reason}")]
    CrowdsecCredentials { path: PathBuf, reason: String },
    #[error("cannot set up the CrowdSec LAPI client: {0}")]
    LapiClient(String),
    #[error("CrowdSec's Local API did not answer: {0}")]
    LapiUnreachable(String),
    #[error(
        "CrowdSec's Local API was refused: its certificate is not trusted here (crowdsec.ca_file \
         names the CA that signed it): {0}"
    )]
    LapiCertificate(String),
    #[error(
        "CrowdSec's Local API answered HTTP {status}: {body}{hint}",
        hint = if *unauthorized {
            " (check the credentials: `cscli bouncers list`, `cscli machines list`)"
        } else {
            ""
        }
    )]
    LapiStatus {
        status: u16,
        unauthorized: bool,
        body: String,
    },
    #[error("CrowdSec's Local API sent a malformed answer; nothing of it was applied: {0}")]
    LapiMalformed(String),
    #[error(transparent)]
    Io(#[from] io::Error),
}
