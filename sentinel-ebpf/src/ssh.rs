//! SSH authentication outcomes, from libpam inside sshd (uprobes; no logs are read).
//!
//! sshd hands PAM the client's address with `pam_set_item(pamh, PAM_RHOST, host)`; we keep it
//! per PAM handle. `pam_authenticate` failing, or `pam_open_session` succeeding, is then
//! reported with that address. No libpam struct is read, and never the password: only the
//! `PAM_RHOST` item's string and the return codes.
//!
//! Attackers that never reach `pam_authenticate` (refused public keys, unknown users on a
//! key-only server) are seen too: sshd starts PAM, with `PAM_RHOST`, in its privileged monitor
//! process as soon as the client names a user, and the same process opens the PAM session
//! after a successful login. A monitor that exits having done neither (and no failed
//! `pam_authenticate` either, which is counted already) ended its connection before
//! authenticating: reported at `sched_process_exit`.
//!
//! The uprobes fire in every process that calls libpam, so only the real sshd counts: a task
//! running as root (sshd's PAM monitor does; an unprivileged user, even root in a user
//! namespace, does not) whose executable is one of the sshd binaries the daemon lists by inode.
//! Anyone else can name a process `sshd` and call libpam with any `PAM_RHOST`.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_get_current_task,
        bpf_get_current_uid_gid, bpf_ktime_get_ns, bpf_probe_read_user_str_bytes,
    },
    macros::{map, raw_tracepoint, uprobe, uretprobe},
    maps::{HashMap, LruHashMap},
    programs::{ProbeContext, RawTracePointContext, RetProbeContext},
};
use sentinel_common::{EventKind, LossKind, MAX_SSHD_EXECUTABLES, RHOST_LEN, SshAuthEvent};

use crate::{
    kernel::task_executable_inode,
    maps::{SSH_EVENTS, record_loss},
};

const PAM_RHOST: i32 = 4;
const PAM_SUCCESS: i32 = 0;

/// PAM handle -> its `PAM_RHOST`.
#[map]
static PAM_RHOSTS: LruHashMap<u64, [u8; RHOST_LEN]> = LruHashMap::with_max_entries(4096, 0);

/// Thread (pid_tgid) -> the PAM handle of its `pam_authenticate`/`pam_open_session` in flight.
#[map]
static PAM_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// sshd monitor processes (tgid) whose client named a user and has not authenticated yet ->
/// the client's `PAM_RHOST`.
#[map]
static PREAUTH: LruHashMap<u32, [u8; RHOST_LEN]> = LruHashMap::with_max_entries(4096, 0);

/// Inodes of the sshd executables (sshd, sshd-session, sshd-auth), kept current by the daemon.
#[map]
static SSHD_EXECUTABLES: HashMap<u64, u8> =
    HashMap::with_max_entries(MAX_SSHD_EXECUTABLES as u32, 0);

/// Whether the current task is the real sshd acting with root privileges.
#[inline(always)]
fn is_sshd() -> bool {
    // The low half is the real uid, in the initial user namespace.
    if bpf_get_current_uid_gid() as u32 != 0 {
        return false;
    }
    // SAFETY: helper without preconditions; the pointer is only read through probe reads.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    match task_executable_inode(task) {
        // SAFETY: map lookup; only presence is used.
        Ok(inode) => unsafe { SSHD_EXECUTABLES.get(inode) }.is_some(),
        Err(_) => false,
    }
}

/// `int pam_set_item(pam_handle_t *pamh, int item_type, const void *item)`.
#[uprobe]
pub fn sentinel_pam_rh(ctx: ProbeContext) -> u32 {
    let (Some(pamh), Some(item_type), Some(item)) = (
        ctx.arg::<u64>(0),
        ctx.arg::<i32>(1),
        ctx.arg::<*const u8>(2),
    ) else {
        return 0;
    };
    if item_type != PAM_RHOST || item.is_null() || !is_sshd() {
        return 0;
    }
    let mut rhost = [0u8; RHOST_LEN];
    // SAFETY: reads a user-space string; a bad pointer yields an error.
    if unsafe { bpf_probe_read_user_str_bytes(item, &mut rhost) }.is_ok() {
        let _ = PAM_RHOSTS.insert(pamh, rhost, 0);
        let _ = PREAUTH.insert(current_tgid(), rhost, 0);
    }
    0
}

/// Entry of `pam_authenticate(pamh, flags)` and `pam_open_session(pamh, flags)`.
#[uprobe]
pub fn sentinel_pam_in(ctx: ProbeContext) -> u32 {
    if let Some(pamh) = ctx.arg::<u64>(0)
        && is_sshd()
    {
        let _ = PAM_CALLS.insert(bpf_get_current_pid_tgid(), pamh, 0);
    }
    0
}

/// Return of `pam_authenticate`: report failures.
#[uretprobe]
pub fn sentinel_pam_rc(ctx: RetProbeContext) -> u32 {
    let result: i32 = ctx.ret();
    report(EventKind::SshAuthFailure, result, result != PAM_SUCCESS);
    0
}

/// Return of `pam_open_session`: report logins.
#[uretprobe]
pub fn sentinel_pam_so(ctx: RetProbeContext) -> u32 {
    let result: i32 = ctx.ret();
    report(EventKind::SshSessionOpened, result, result == PAM_SUCCESS);
    0
}

/// A process ends: an sshd monitor still in [`PREAUTH`] ended its connection before
/// authenticating. Runs for every exiting task, so anything not named like sshd (`sshd`,
/// `sshd-session`) is let go before the map is looked at; a process that merely takes the
/// name finds nothing there, since only the real sshd's calls fill it.
#[raw_tracepoint(tracepoint = "sched_process_exit")]
pub fn sentinel_sshd_exit(_ctx: RawTracePointContext) {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    // Only the whole process's end (its main thread); sshd's monitor has no other threads.
    if pid_tgid as u32 != tgid {
        return;
    }
    if !bpf_get_current_comm().is_ok_and(|comm| comm.starts_with(b"sshd")) {
        return;
    }
    // SAFETY: map lookup; the value is copied out before the entry is removed.
    let Some(rhost) = (unsafe { PREAUTH.get(tgid) }).copied() else {
        return;
    };
    let _ = PREAUTH.remove(tgid);
    submit(EventKind::SshPreauthEnd, tgid, 0, rhost);
}

fn current_tgid() -> u32 {
    (bpf_get_current_pid_tgid() >> 32) as u32
}

#[inline(always)]
fn report(kind: EventKind, result: i32, wanted: bool) {
    let pid_tgid = bpf_get_current_pid_tgid();
    // SAFETY: map lookup; the value is copied out before the entry is removed.
    let Some(pamh) = (unsafe { PAM_CALLS.get(pid_tgid) }).copied() else {
        return;
    };
    let _ = PAM_CALLS.remove(pid_tgid);
    if !wanted {
        return;
    }
    // SAFETY: as above.
    let Some(rhost) = (unsafe { PAM_RHOSTS.get(pamh) }).copied() else {
        return;
    };
    // A failure is counted in full, a session is a login: either way this connection's end
    // is not a pre-authentication disconnect.
    let tgid = (pid_tgid >> 32) as u32;
    let _ = PREAUTH.remove(tgid);
    submit(kind, tgid, result, rhost);
}

#[inline(always)]
fn submit(kind: EventKind, pid: u32, pam_result: i32, rhost: [u8; RHOST_LEN]) {
    let Some(mut entry) = SSH_EVENTS.reserve::<SshAuthEvent>(0) else {
        record_loss(LossKind::Ssh);
        return;
    };
    entry.write(SshAuthEvent {
        kind: kind as u32,
        pid,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        pam_result,
        _pad: 0,
        rhost,
    });
    entry.submit(0);
}
