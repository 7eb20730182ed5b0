//! SSH authentication outcomes, from libpam inside sshd (uprobes; no logs are read).
//!
//! sshd hands PAM the client's address with `pam_set_item(pamh, PAM_RHOST, host)`; we keep it
//! per PAM handle. `pam_authenticate` failing, or `pam_open_session` succeeding, is then
//! reported with that address. No libpam struct is read, and never the password: only the
//! `PAM_RHOST` item's string and the return codes.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_ktime_get_ns,
        bpf_probe_read_user_str_bytes,
    },
    macros::{map, uprobe, uretprobe},
    maps::LruHashMap,
    programs::{ProbeContext, RetProbeContext},
};
use sentinel_common::{EventKind, LossKind, RHOST_LEN, SshAuthEvent};

use crate::maps::{ALERTS, record_loss};

const PAM_RHOST: i32 = 4;
const PAM_SUCCESS: i32 = 0;

/// PAM handle -> its `PAM_RHOST`.
#[map]
static PAM_RHOSTS: LruHashMap<u64, [u8; RHOST_LEN]> = LruHashMap::with_max_entries(4096, 0);

/// Thread (pid_tgid) -> the PAM handle of its `pam_authenticate`/`pam_open_session` in flight.
#[map]
static PAM_CALLS: LruHashMap<u64, u64> = LruHashMap::with_max_entries(4096, 0);

/// sshd, sshd-session and sshd-auth: every flavour OpenSSH has shipped.
fn is_sshd() -> bool {
    matches!(bpf_get_current_comm(), Ok(comm) if comm.starts_with(b"sshd"))
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
    let Some(mut entry) = ALERTS.reserve::<SshAuthEvent>(0) else {
        record_loss(LossKind::Ssh);
        return;
    };
    entry.write(SshAuthEvent {
        kind: kind as u32,
        pid: (pid_tgid >> 32) as u32,
        // SAFETY: helper without preconditions.
        timestamp_ns: unsafe { bpf_ktime_get_ns() },
        pam_result: result,
        _pad: 0,
        rhost,
    });
    entry.submit(0);
}
