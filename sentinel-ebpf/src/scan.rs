//! Port scans: `raw_tp/tcp_send_reset`. A segment to a port where no socket listens is
//! answered with a reset that carries no socket and the reason `NO_SOCKET`; each such reset
//! in Sentinel's network namespace is one closed-port hit, reported with the sender's address
//! and the port. Only attached when `port_scan` is configured.

use aya_ebpf::{macros::raw_tracepoint, programs::RawTracePointContext};
use sentinel_common::{ClosedPortEvent, EventKind, LossKind, ScanTarget};

use crate::{
    kernel::{offset, offsets_ready, read, read_volatile},
    maps::{SCAN_EVENTS, record_loss, scan_wakeup_flags},
};

/// `SK_RST_REASON_NO_SOCKET` of `enum sk_rst_reason`.
const NO_SOCKET: u32 = 1;
const AF_INET: u16 = 2;
const AF_INET6: u16 = 10;

/// Filled in by the daemon before load (read-only data).
#[unsafe(no_mangle)]
pub static SCAN_TARGET: ScanTarget = ScanTarget {
    netns_inode: 0,
    _pad: 0,
};

/// `TP_PROTO(const struct sock *sk, const struct sk_buff *skb, const enum sk_rst_reason
/// reason)` (kernels >= 6.10; earlier ones have no reason and are not attached to).
#[raw_tracepoint(tracepoint = "tcp_send_reset")]
pub fn sentinel_scan(ctx: RawTracePointContext) {
    let sk: *const u8 = ctx.arg(0);
    let reason: u32 = ctx.arg(2);
    if !sk.is_null() || reason != NO_SOCKET || !offsets_ready() {
        return;
    }
    let skb: *const u8 = ctx.arg(1);
    let _ = try_report(skb);
}

fn try_report(skb: *const u8) -> Result<(), i32> {
    if skb.is_null() || netns_inode(skb)? != read_volatile(&SCAN_TARGET.netns_inode) {
        return Ok(());
    }
    let head: *const u8 = read(skb, offset!(skb_head))?;
    let network: u16 = read(skb, offset!(skb_network_header))?;
    let transport: u16 = read(skb, offset!(skb_transport_header))?;
    let ip = head.wrapping_add(usize::from(network));
    let version: u8 = read::<u8>(ip, 0)? >> 4;
    let mut remote_addr = [0u8; 16];
    let family = match version {
        4 => {
            // `iphdr.saddr`
            let saddr: [u8; 4] = read(ip, 12)?;
            remote_addr[..4].copy_from_slice(&saddr);
            AF_INET
        }
        6 => {
            // `ipv6hdr.saddr`
            remote_addr = read(ip, 8)?;
            AF_INET6
        }
        _ => return Ok(()),
    };
    // `tcphdr.dest`
    let port: u16 = read(head.wrapping_add(usize::from(transport)), 2)?;
    let Some(mut entry) = SCAN_EVENTS.reserve::<ClosedPortEvent>(0) else {
        record_loss(LossKind::ClosedPort);
        return Ok(());
    };
    entry.write(ClosedPortEvent {
        kind: EventKind::ClosedPort as u32,
        family,
        port: u16::from_be(port),
        remote_addr,
    });
    entry.submit(scan_wakeup_flags());
    Ok(())
}

/// `skb->dev->nd_net.net->ns.inum`: the network namespace the segment arrived in.
#[inline(always)]
fn netns_inode(skb: *const u8) -> Result<u32, i32> {
    let dev: *const u8 = read(skb, offset!(skb_dev))?;
    let net: *const u8 = read(dev, offset!(net_device_net))?;
    read(net, offset!(net_inum))
}
