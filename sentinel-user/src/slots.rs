//! A fixed number of connection slots for one server (`/metrics`, the control socket), so that
//! clients can never take all of the daemon's file descriptors.
//!
//! When every slot is taken, the connection that has waited longest without sending its request
//! is closed to make room: clients that connect and say nothing cannot lock out one that asks
//! at once. Only when every slot is serving a request is a new connection turned away.

use std::{collections::VecDeque, sync::Arc};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;

pub(crate) struct Slots {
    free: Arc<Semaphore>,
    /// Connections that may still be waiting for their request, oldest first.
    waiting: VecDeque<Waiting>,
}

/// What the accept loop keeps of a connection in order to close it.
struct Waiting {
    evict: CancellationToken,
    /// Cancelled once the connection has its request, or is gone.
    settled: CancellationToken,
}

/// A taken slot; dropping it frees the slot.
pub(crate) struct Slot {
    _permit: OwnedSemaphorePermit,
    evict: CancellationToken,
    settled: CancellationToken,
}

impl Slots {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            free: Arc::new(Semaphore::new(capacity)),
            waiting: VecDeque::with_capacity(capacity),
        }
    }

    /// A slot for a new connection: a free one, or the one of the longest-waiting connection
    /// that has not sent its request, which is closed for it. `None` when every slot is
    /// serving a request.
    ///
    /// A connection whose request arrives just as it is chosen keeps its slot until it has
    /// been answered (bounded by its server's response deadline), and this waits for it.
    pub(crate) async fn admit(&mut self) -> Option<Slot> {
        self.waiting
            .retain(|waiting| !waiting.settled.is_cancelled());
        let permit = match self.free.clone().try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => {
                let oldest = self.waiting.pop_front()?;
                oldest.evict.cancel();
                self.free
                    .clone()
                    .acquire_owned()
                    .await
                    .expect("the semaphore is never closed")
            }
        };
        let slot = Slot {
            _permit: permit,
            evict: CancellationToken::new(),
            settled: CancellationToken::new(),
        };
        self.waiting.push_back(Waiting {
            evict: slot.evict.clone(),
            settled: slot.settled.clone(),
        });
        Some(slot)
    }
}

impl Slot {
    /// Runs `read` (receiving the request) unless another connection needs this slot first
    /// (`None`); either way the connection can no longer be closed for another one afterwards.
    pub(crate) async fn read_request<T>(&self, read: impl Future<Output = T>) -> Option<T> {
        let outcome = tokio::select! {
            biased;
            () = self.evict.cancelled() => None,
            value = read => Some(value),
        };
        self.settled.cancel();
        outcome
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.settled.cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::future::pending;

    use tokio::{sync::oneshot, task::JoinHandle};

    use super::*;

    /// A connection that waits for a request that never comes: reports whether it was
    /// closed for another one.
    fn silent(slot: Slot) -> JoinHandle<bool> {
        tokio::spawn(async move { slot.read_request(pending::<()>()).await.is_none() })
    }

    /// A connection that has its request and is being served until `done` fires.
    async fn serving(slot: Slot) -> (oneshot::Sender<()>, JoinHandle<()>) {
        let (done, finish) = oneshot::channel::<()>();
        let (read, has_read) = oneshot::channel();
        let task = tokio::spawn(async move {
            assert_eq!(slot.read_request(async {}).await, Some(()));
            read.send(()).unwrap();
            let _ = finish.await;
        });
        has_read.await.unwrap();
        (done, task)
    }

    #[tokio::test]
    async fn the_longest_silent_connection_makes_room() {
        let mut slots = Slots::new(2);
        let first = silent(slots.admit().await.unwrap());
        let second = silent(slots.admit().await.unwrap());
        let third = silent(slots.admit().await.unwrap());
        assert!(
            first.await.unwrap(),
            "the oldest silent connection was not closed"
        );
        let _fourth = slots.admit().await.unwrap();
        assert!(second.await.unwrap());
        assert!(!third.is_finished());
    }

    #[tokio::test]
    async fn connections_being_served_are_never_closed() {
        let mut slots = Slots::new(2);
        let (finish_first, first) = serving(slots.admit().await.unwrap()).await;
        let (_finish_second, _second) = serving(slots.admit().await.unwrap()).await;
        assert!(
            slots.admit().await.is_none(),
            "a served connection lost its slot"
        );
        finish_first.send(()).unwrap();
        first.await.unwrap();
        let quiet = silent(slots.admit().await.unwrap());
        let _newest = slots.admit().await.unwrap();
        assert!(quiet.await.unwrap());
    }

    #[tokio::test]
    async fn connections_that_ended_free_their_slot() {
        let mut slots = Slots::new(1);
        for _ in 0..10 {
            drop(slots.admit().await.unwrap());
        }
        assert_eq!(slots.waiting.len(), 1);
    }
}
