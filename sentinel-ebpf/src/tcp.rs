//! TCP connections: `raw_tp/inet_sock_set_state`.

use aya_ebpf::{
    helpers::bpf_get_current_cgroup_id, macros::raw_tracepoint, programs::RawTracePointContext,
};
use sentinel_common::{EventKind, LossKind, TcpEvent};

use crate::{
    kernel::{cgroup_id, offset, offsets_ready, read},
    maps::{EVENTS, count, events_wakeup_flags, record_loss, tcp_records_wanted},
};

const TCP_ESTABLISHED: i32 = 1;
const TCP_SYN_SENT: i32 = 2;
const TCP_SYN_RECV: i32 = 3;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// `TP_PROTO(const struct sock *sk, const int oldstate, const int newstate)`.
#[raw_tracepoint(tracepoint = "inet_sock_set_state")]
pub fn sentinel_tcp(ctx: RawTracePointContext) {
    let old_state: i32 = ctx.arg(1);
    let new_state: i32 = ctx.arg(2);
    // Return before touching anything on the many transitions we do not report.
    let kind = match (old_state, new_state) {
        (_, TCP_SYN_SENT) => EventKind::TcpConnect,
        (TCP_SYN_RECV, TCP_ESTABLISHED) => EventKind::TcpAccept,
        _ => return,
    };
    if !offsets_ready() {
        return;
    }
    let sk: *const u8 = ctx.arg(0);
    let (cgroup_id, loss) = if kind == EventKind::TcpConnect {
        // connect() runs in the caller's context.
        // SAFETY: helper without preconditions.
        let id = unsafe { bpf_get_current_cgroup_id() };
        count(id, |counters| counters.tcp_connects += 1);
        (id, LossKind::TcpConnect)
    } else {
        // The handshake completes in softirq context: attribute it to the cgroup of the
        // listening socket, which the child socket inherited.
        let id = socket_cgroup_id(sk).unwrap_or(0);
        count(id, |counters| counters.tcp_accepts += 1);
        (id, LossKind::TcpAccept)
    };
    if !tcp_records_wanted() {
        return;
    }

    let Some(mut entry) = EVENTS.reserve::<TcpEvent>(0) else {
        record_loss(loss);
        return;
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at a reserved, exclusively owned ring buffer record; every field
    // is written before submit.
    unsafe {
        (*event).kind = kind as u32;
        (*event).cgroup_id = cgroup_id;
        (*event)._pad = [0; 3];
        let family: u16 = read(sk, offset!(sock_family)).unwrap_or(0);
        (*event).family = family;
        (*event).local_port = read(sk, offset!(sock_num)).unwrap_or(0);
        (*event).remote_port = u16::from_be(read(sk, offset!(sock_dport)).unwrap_or(0));
        (*event).local_addr = [0; 16];
        (*event).remote_addr = [0; 16];
        if family == AF_INET6 {
            (*event).local_addr = read(sk, offset!(sock_v6_rcv_saddr)).unwrap_or([0; 16]);
            (*event).remote_addr = read(sk, offset!(sock_v6_daddr)).unwrap_or([0; 16]);
        } else if family == AF_INET {
            let local: [u8; 4] = read(sk, offset!(sock_rcv_saddr)).unwrap_or([0; 4]);
            let remote: [u8; 4] = read(sk, offset!(sock_daddr)).unwrap_or([0; 4]);
            (&mut (*event).local_addr)[..4].copy_from_slice(&local);
            (&mut (*event).remote_addr)[..4].copy_from_slice(&remote);
        }
    }
    entry.submit(events_wakeup_flags());
}

fn socket_cgroup_id(sk: *const u8) -> Result<u64, i32> {
    let cgroup: *const u8 = read(sk, offset!(sock_cgroup))?;
    cgroup_id(cgroup)
}
