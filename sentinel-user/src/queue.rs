//! Bounded channels into the threads that own the enforcer and the SSH guard (and the drop
//! counters of the other bounded queues, such as the recent events'). A stalled
//! consumer must not grow the daemon without bound: what does not fit is dropped and counted in
//! `sentinel_queue_dropped_total{queue}`, where an operator sees it.

use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

/// The drop counters of every queue.
#[derive(Clone)]
pub struct QueueDrops(Family<Labels, Counter>);

impl QueueDrops {
    pub fn new(registry: &mut Registry) -> Self {
        let drops = Self(Family::default());
        registry.register(
            "sentinel_queue_dropped",
            "Messages dropped because the queue into a part of the daemon was full",
            drops.0.clone(),
        );
        drops
    }

    /// The drop counter of the queue named `queue`.
    pub fn counter(&self, queue: &'static str) -> Counter {
        self.0.get_or_create(&vec![("queue", queue)]).clone()
    }
}

/// Why a message was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Dropped and counted.
    Full,
    /// The consumer is gone.
    Closed,
}

/// The sending end of a bounded queue named `queue`.
pub struct Queue<T> {
    sender: SyncSender<T>,
    dropped: Counter,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
            dropped: self.dropped.clone(),
        }
    }
}

/// A queue of `capacity` messages; its drops are counted under `name`.
pub fn bounded<T>(
    name: &'static str,
    capacity: usize,
    drops: &QueueDrops,
) -> (Queue<T>, Receiver<T>) {
    let (sender, receiver) = mpsc::sync_channel(capacity);
    let dropped = drops.counter(name);
    (Queue { sender, dropped }, receiver)
}

impl<T> Queue<T> {
    /// Queues `message` unless the queue is full (then it is dropped and counted).
    pub fn offer(&self, message: T) -> Result<(), Refused> {
        match self.sender.try_send(message) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(_)) => {
                self.dropped.inc();
                Err(Refused::Full)
            }
            Err(TrySendError::Disconnected(_)) => Err(Refused::Closed),
        }
    }

    /// Waits for room: for what must arrive (a stop, a reload), from threads that may block.
    pub fn send(&self, message: T) -> Result<(), Refused> {
        self.sender.send(message).map_err(|_| Refused::Closed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut registry = Registry::default();
        let drops = QueueDrops::new(&mut registry);
        let (queue, receiver) = bounded("test", 2, &drops);
        assert_eq!(queue.offer(1), Ok(()));
        assert_eq!(queue.offer(2), Ok(()));
        assert_eq!(queue.offer(3), Err(Refused::Full));
        assert_eq!(receiver.try_iter().collect::<Vec<_>>(), [1, 2]);
        drop(receiver);
        assert_eq!(queue.offer(4), Err(Refused::Closed));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("sentinel_queue_dropped_total{queue=\"test\"} 1"),
            "{text}"
        );
    }
}
