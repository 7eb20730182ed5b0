//! Draining a ring buffer: on the kernel's wakeups, and on a timer for records that the
//! kernel queued without waking us (see `EVENTS_WAKEUP_BYTES`).

use std::{os::fd::AsRawFd, time::Duration};

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};
use tokio_util::sync::CancellationToken;
use tracing::warn;

use super::{EventHandler, decode};

pub async fn read_ring(
    ring: RingBuf<MapData>,
    handler: std::sync::Arc<EventHandler>,
    poll_every: Duration,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    let mut ring = readable(ring)?;
    let mut tick = tokio::time::interval(poll_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            guard = ring.readable_mut() => {
                let mut guard = guard?;
                // Cleared before draining: a record committed after the drain's last look
                // wakes this task again, instead of waiting for the timer.
                guard.clear_ready();
                drain(guard.get_inner_mut(), &handler);
            }
            _ = tick.tick() => drain(ring.get_mut(), &handler),
        }
    }
    // Records queued before shutdown are still worth handling.
    drain(ring.get_mut(), &handler);
    Ok(())
}

fn drain(ring: &mut RingBuf<MapData>, handler: &EventHandler) {
    while let Some(record) = ring.next() {
        match decode(&record) {
            Some(event) => handler.handle(event),
            None => warn!(
                len = record.len(),
                "skipped an undecodable ring buffer record"
            ),
        }
    }
}

/// Registers an object that owns its file descriptor (a ring buffer, the eBPF logger) with
/// the runtime for read readiness.
pub fn readable<T: AsRawFd>(owner: T) -> std::io::Result<AsyncFd<T>> {
    // SAFETY: `owner` owns its descriptor and keeps it open, unchanged, until it is dropped,
    // which is when the AsyncFd is dropped.
    unsafe { AsyncFd::register_with_interest(owner, Interest::READABLE) }.map_err(|e| e.into())
}
