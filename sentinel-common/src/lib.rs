//! Types shared by the eBPF programs and the daemon.
//!
//! Every type here is `#[repr(C)]` plain data: the kernel side writes it into maps and ring
//! buffers, the user side reads the same bytes. Host-only trait impls sit behind the `user`
//! feature so the eBPF build stays `no_std` and dependency-free.
#![no_std]

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`).
pub const COMM_LEN: usize = 16;
/// Bytes of an exec'd file name carried in an event; longer names are truncated.
pub const FILENAME_LEN: usize = 256;
/// Bytes of a cgroup path carried in an event; longer paths are resolved by the daemon instead.
pub const CGROUP_PATH_LEN: usize = 512;
/// Bytes of a PAM remote host (an IPv6 address in text needs 46 with its NUL).
pub const RHOST_LEN: usize = 64;

/// sshd executables (by inode) the SSH probes accept at once: current and recently replaced
/// binaries of every sshd flavour.
pub const MAX_SSHD_EXECUTABLES: usize = 64;

/// Discriminant at offset 0 of every ring buffer record.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventKind {
    Exec = 1,
    OomKill = 2,
    TcpConnect = 3,
    TcpAccept = 4,
    CgroupMkdir = 5,
    CgroupRmdir = 6,
    SshAuthFailure = 7,
    SshSessionOpened = 8,
    ExecViolation = 9,
    SshPreauthEnd = 10,
    ClosedPort = 11,
}

impl EventKind {
    pub fn from_u32(value: u32) -> Option<Self> {
        Some(match value {
            1 => Self::Exec,
            2 => Self::OomKill,
            3 => Self::TcpConnect,
            4 => Self::TcpAccept,
            5 => Self::CgroupMkdir,
            6 => Self::CgroupRmdir,
            7 => Self::SshAuthFailure,
            8 => Self::SshSessionOpened,
            9 => Self::ExecViolation,
            10 => Self::SshPreauthEnd,
            11 => Self::ClosedPort,
            _ => return None,
        })
    }
}

/// A process called execve(): `sched/sched_process_exec`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub kind: u32,
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
    pub filename: [u8; FILENAME_LEN],
}

/// The OOM killer chose a victim: `oom/mark_victim`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct OomKillEvent {
    pub kind: u32,
    pub pid: u32,
    /// The victim's cgroup v2 id; 0 when the kernel did not let us see the victim's task.
    pub cgroup_id: u64,
    pub comm: [u8; COMM_LEN],
}

/// A TCP connection changed state in a way Sentinel reports: `sock/inet_sock_set_state`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct TcpEvent {
    pub kind: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    pub local_port: u16,
    pub cgroup_id: u64,
    pub remote_port: u16,
    pub _pad: [u16; 3],
    /// IPv4 addresses use the first 4 bytes, in network order.
    pub local_addr: [u8; 16],
    pub remote_addr: [u8; 16],
}

/// A cgroup v2 directory was created or removed: `cgroup/cgroup_mkdir`, `cgroup/cgroup_rmdir`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CgroupEvent {
    pub kind: u32,
    pub _pad: u32,
    pub cgroup_id: u64,
    /// NUL-terminated path relative to the cgroup2 root, starting with `/`.
    pub path: [u8; CGROUP_PATH_LEN],
}

/// An sshd process finished a PAM step: a failed `pam_authenticate`, or a successful
/// `pam_open_session` (a user is logged in from `rhost`); or sshd's monitor for `rhost`
/// ended before either (the connection ended before authenticating).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct SshAuthEvent {
    pub kind: u32,
    pub pid: u32,
    /// `bpf_ktime_get_ns()` (CLOCK_MONOTONIC) when PAM returned.
    pub timestamp_ns: u64,
    /// PAM's return code (`PAM_AUTH_ERR`, `PAM_USER_UNKNOWN`, ...; 0 for a session).
    pub pam_result: i32,
    pub _pad: u32,
    /// The remote host sshd gave PAM (`PAM_RHOST`): normally the client's address as text.
    pub rhost: [u8; RHOST_LEN],
}

/// Cgroups under a containment policy, and the executables each policy allows: the kernel
/// checks every exec in such a cgroup against them.
pub const MAX_CONTAINED_CGROUPS: u32 = 4096;
/// `(policy, device, inode)` entries over every containment policy.
pub const MAX_ALLOWED_EXECUTABLES: u32 = 16384;

/// A contained cgroup: which policy's allow list applies, and whether the kernel kills a
/// violating process itself (`on_violation: kill` in enforce mode).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContainedCgroup {
    pub policy: u32,
    pub kill: u32,
}

/// An allowed executable of one policy, by the file the kernel runs: device (the kernel's
/// `MKDEV(major, minor)`, major above 20 bits of minor) and inode.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllowedExecutable {
    pub policy: u32,
    pub _pad: u32,
    pub dev: u64,
    pub ino: u64,
}

/// A process in a contained cgroup executed a file its policy does not allow.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecViolationEvent {
    pub kind: u32,
    pub pid: u32,
    pub cgroup_id: u64,
    pub policy: u32,
    /// Non-zero when the kernel sent the process SIGKILL before its first instruction.
    pub killed: u32,
    pub dev: u64,
    pub ino: u64,
    pub comm: [u8; COMM_LEN],
    pub filename: [u8; FILENAME_LEN],
}

/// A TCP segment reached a port of Sentinel's network namespace where no socket listens, and
/// the kernel answered with a reset: `tcp/tcp_send_reset` with no socket.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ClosedPortEvent {
    pub kind: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// The closed local port the segment was sent to.
    pub port: u16,
    /// The sender's address; IPv4 uses the first 4 bytes, in network order.
    pub remote_addr: [u8; 16],
}

/// Filled in before load (read-only data): the network namespace whose closed-port hits count,
/// by its inode number (`/proc/self/ns/net`, or `ssh_guard.netns`). 0: none counts.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanTarget {
    pub netns_inode: u32,
    pub _pad: u32,
}

/// Per-cgroup counters kept in the kernel (a per-CPU hash keyed by cgroup id).
#[repr(C)]
#[derive(Clone, Copy, Default, Debug, PartialEq, Eq)]
pub struct ServiceCounters {
    pub execs: u64,
    pub tcp_connects: u64,
    pub tcp_accepts: u64,
}

impl ServiceCounters {
    pub fn add(&mut self, other: &Self) {
        self.execs += other.execs;
        self.tcp_connects += other.tcp_connects;
        self.tcp_accepts += other.tcp_accepts;
    }
}

/// Why the kernel side dropped an event; the index into the per-CPU `LOST` array.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LossKind {
    Exec = 0,
    OomKill = 1,
    TcpConnect = 2,
    TcpAccept = 3,
    Cgroup = 4,
    /// The per-cgroup counter map was full, so a count could not be recorded.
    CounterMapFull = 5,
    Ssh = 6,
    ExecViolation = 7,
    ClosedPort = 8,
}

impl LossKind {
    pub const COUNT: usize = 9;
    pub const ALL: [Self; Self::COUNT] = [
        Self::Exec,
        Self::OomKill,
        Self::TcpConnect,
        Self::TcpAccept,
        Self::Cgroup,
        Self::CounterMapFull,
        Self::Ssh,
        Self::ExecViolation,
        Self::ClosedPort,
    ];

    /// The `kind` label of `sentinel_events_lost_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::OomKill => "oom_kill",
            Self::TcpConnect => "tcp_connect",
            Self::TcpAccept => "tcp_accept",
            Self::Cgroup => "cgroup",
            Self::CounterMapFull => "counter_map_full",
            Self::Ssh => "ssh",
            Self::ExecViolation => "exec_violation",
            Self::ClosedPort => "closed_port",
        }
    }
}

/// Offsets of kernel struct fields, read from the running kernel's BTF by the daemon and
/// written into the programs' read-only data before load. Rust eBPF has no CO-RE, so this is
/// what lets one object run on different kernels.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// Non-zero once filled in; programs do nothing until then.
    pub ready: u32,
    /// 1 when `mark_victim`'s first argument is the victim's `task_struct *` (kernels >= 6.7);
    /// 0 when it is only the victim's pid.
    pub mark_victim_has_task: u32,
    pub task_pid: u32,
    pub task_tgid: u32,
    pub task_real_parent: u32,
    pub task_comm: u32,
    /// `task_struct.cgroups` (`struct css_set *`).
    pub task_cgroups: u32,
    /// `css_set.dfl_cgrp` (`struct cgroup *`).
    pub css_set_dfl_cgrp: u32,
    /// `cgroup.kn` (`struct kernfs_node *`).
    pub cgroup_kn: u32,
    /// `cgroup.root` (`struct cgroup_root *`).
    pub cgroup_root: u32,
    pub cgroup_root_hierarchy_id: u32,
    /// `kernfs_node.id`, which is the cgroup id.
    pub kernfs_node_id: u32,
    pub binprm_filename: u32,
    /// `sock.__sk_common.skc_family` and friends.
    pub sock_family: u32,
    pub sock_num: u32,
    pub sock_dport: u32,
    pub sock_daddr: u32,
    pub sock_rcv_saddr: u32,
    pub sock_v6_daddr: u32,
    pub sock_v6_rcv_saddr: u32,
    /// `sock.sk_cgrp_data.cgroup` (`struct cgroup *`), the cgroup that created the socket.
    pub sock_cgroup: u32,
    /// `task_struct.mm`, `mm_struct.exe_file`, `file.f_inode`, `inode.i_ino`: the inode of the
    /// executable a task runs, which tells the real sshd from a process merely named so.
    pub task_mm: u32,
    pub mm_exe_file: u32,
    pub file_inode: u32,
    pub inode_ino: u32,
    /// `linux_binprm.file`, `inode.i_sb`, `super_block.s_dev`: the device and inode of the
    /// file an exec runs, checked against containment allow lists.
    pub binprm_file: u32,
    pub inode_sb: u32,
    pub super_block_dev: u32,
    /// `sk_buff.head`, `.network_header`, `.transport_header` and `.dev`,
    /// `net_device.nd_net.net`, `net.ns.inum`: a received segment's headers and the network
    /// namespace it arrived in.
    pub skb_head: u32,
    pub skb_network_header: u32,
    pub skb_transport_header: u32,
    pub skb_dev: u32,
    pub net_device_net: u32,
    pub net_inum: u32,
    /// `cgroup.subsys` (an array of `struct cgroup_subsys_state *`, by subsystem id), and the
    /// ids of the memory, pids and cpu controllers (`enum cgroup_subsys_id`).
    pub cgroup_subsys: u32,
    pub memory_subsys_id: u32,
    pub pids_subsys_id: u32,
    pub cpu_subsys_id: u32,
    /// From a controller's `cgroup_subsys_state` to its figures: `mem_cgroup.memory.usage`
    /// and `.memory.max` (pages), `pids_cgroup.counter` (tasks),
    /// `task_group.cfs_bandwidth.throttled_time` (ns) and `.nr_throttled` (periods).
    pub memcg_usage: u32,
    pub memcg_max: u32,
    pub pids_counter: u32,
    pub cpu_throttled_time: u32,
    pub cpu_throttled_periods: u32,
    /// `cgroup.bstat.cputime.sum_exec_runtime` (ns), as of the last statistics flush.
    pub cgroup_cpu_usage: u32,
}

/// One cgroup's resource figures, as the `iter/cgroup` program writes them for every cgroup
/// v2, in kernel units; the daemon converts them to what the interface files show.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CgroupFigures {
    pub cgroup_id: u64,
    /// `FIGURES_*` bits: the controllers enabled on this cgroup, whose figures follow.
    pub present: u32,
    pub cpu_throttled_periods: u32,
    pub memory_pages: u64,
    pub memory_max_pages: u64,
    pub pids: u64,
    pub cpu_usage_ns: u64,
    pub cpu_throttled_ns: u64,
}

/// Records the cgroup iterator writes per walk: a cgroup iterator cannot resume a walk across
/// reads, and one read returns at most the kernel's eight-page buffer. A walk writes the
/// records of the cgroups from the index in `FIGURES_WALK` on, and ends after this many.
pub const FIGURES_PER_WALK: u32 = 512;

/// Cgroups whose last record the cgroup iterator remembers, so as to write only what changed
/// since: one more is forgotten (and written again) only when a newer one needs its place.
pub const FIGURES_REMEMBERED: u32 = 8192;

/// Slots of the cgroup iterator's `FIGURES_WALK` map. Set by the daemon before each walk: the
/// index, in the walk's order, of the first cgroup the walk looks at (`WALK_FROM`); the number
/// of the daemon's table of records (`WALK_GENERATION`), a new one when it starts afresh; 0 at
/// `WALK_WRITTEN` and `WALK_CUT`. Set by the program: how many records the walk wrote
/// (`WALK_WRITTEN`) and, when it ended the walk early, the index to go on from (`WALK_CUT`).
pub const WALK_FROM: u32 = 0;
pub const WALK_CUT: u32 = 1;
pub const WALK_WRITTEN: u32 = 2;
pub const WALK_GENERATION: u32 = 3;
pub const WALK_SLOTS: u32 = 4;

/// The helper number the cgroup iterator calls to have the kernel sum CPU time up the
/// hierarchy before a pass. No helper has it: before load, the daemon rewrites that one call
/// into a call of the kernel's statistics flush (a kfunc, whose BTF id only the running
/// kernel knows; aya 0.14 has no kfunc calls), or into `r0 = 0` where the kernel has none.
pub const FLUSH_CALL_PLACEHOLDER: u32 = 0x5e57_f105;

/// `CgroupFigures::present`: the memory controller's figures were read.
pub const FIGURES_MEMORY: u32 = 1;
/// The pids controller's.
pub const FIGURES_PIDS: u32 = 2;
/// The cpu controller's (throttled time; CPU usage is kept for every cgroup).
pub const FIGURES_CPU: u32 = 4;

/// Which per-event records the exec and TCP programs write to `EVENTS`, written into their
/// read-only data before load. Both count every event either way; a record costs a ring
/// buffer reservation and copies, so it is written only when the daemon has a reader for it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EventRecords {
    /// Non-zero: one `ExecEvent` per exec.
    pub exec: u32,
    /// Non-zero: one `TcpEvent` per connect started and accept completed.
    pub tcp: u32,
}

/// Ring buffer bytes queued before a producer wakes the daemon; below it the daemon drains
/// on its own timer. Wakeups dominate per-event cost, so they are batched.
pub const EVENTS_WAKEUP_BYTES: u64 = 256 * 1024;
/// The same for closed-port hits, whose ring is read on the same timer.
pub const SCAN_WAKEUP_BYTES: u64 = 64 * 1024;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): plain `#[repr(C)]` data with no padding-dependent invariants, valid
    // for any bit pattern.
    unsafe impl aya::Pod for super::ServiceCounters {}
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::EventRecords {}
    unsafe impl aya::Pod for super::ScanTarget {}
    unsafe impl aya::Pod for super::ContainedCgroup {}
    unsafe impl aya::Pod for super::AllowedExecutable {}
}
