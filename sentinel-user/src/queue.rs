//! Bounded channels into the threads that own the enforcer and the SSH guard (and the drop
//! counters of the other bounded queues, such as the recent events'). A stalled
//! consumer must not grow the daemon without bound: what does not fit is dropped and counted in
//! `sentinel_queue_dropped_total{queue}`, where an operator sees it.
//!
//! A queue takes memory only for what is in it. The standard bounded channel allocates and
//! writes every slot up front: the SSH guard's 65,536 slots alone kept 8 MiB resident in an
//! idle daemon. These queues are the standard unbounded channel, whose blocks come and go with
//! the messages, plus a count of what is queued.

use std::{
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst},
        mpsc::{self, RecvTimeoutError},
    },
    time::Duration,
};

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
    sender: mpsc::Sender<T>,
    room: Arc<Room>,
    dropped: Counter,
}

impl<T> Clone for Queue<T> {
    fn clone(&self) -> Self {
        Self {
            sender: self.sender.clone(),
            room: Arc::clone(&self.room),
            dropped: self.dropped.clone(),
        }
    }
}

/// The receiving end, owned by the thread the queue feeds.
pub struct Inbox<T> {
    receiver: mpsc::Receiver<T>,
    room: Arc<Room>,
}

/// What both ends share: how much is queued, and where a sender waits for room.
struct Room {
    capacity: usize,
    queued: AtomicUsize,
    /// Senders waiting in `send`: the receiver takes the lock to wake them only when there are.
    waiting: AtomicUsize,
    closed: AtomicBool,
    lock: Mutex<()>,
    freed: Condvar,
}

impl Room {
    /// Counts one more message in, unless the queue is full.
    fn reserve(&self) -> bool {
        // A compare-and-swap loop: `fetch_update` is deprecated on newer toolchains (the fuzz
        // targets' nightly), and its replacement is not on the pinned stable one.
        let mut queued = self.queued.load(SeqCst);
        while queued < self.capacity {
            match self
                .queued
                .compare_exchange_weak(queued, queued + 1, SeqCst, SeqCst)
            {
                Ok(_) => return true,
                Err(now) => queued = now,
            }
        }
        false
    }

    /// Counts one message out, and wakes the senders waiting for room.
    fn release(&self) {
        self.queued.fetch_sub(1, SeqCst);
        // A sender counts itself waiting, under the lock, before it looks at `queued` a last
        // time; taking the lock here means it is asleep by the time it is notified.
        if self.waiting.load(SeqCst) > 0 {
            self.wake_senders();
        }
    }

    /// The receiver is gone: waiting senders give up.
    fn close(&self) {
        self.closed.store(true, SeqCst);
        self.wake_senders();
    }

    fn wake_senders(&self) {
        let _locked = self.lock.lock().expect("queue lock");
        self.freed.notify_all();
    }

    /// Waits until the queue has room (true) or its receiver is gone (false).
    fn wait_for_room(&self) -> bool {
        let mut locked = self.lock.lock().expect("queue lock");
        self.waiting.fetch_add(1, SeqCst);
        while !self.closed.load(SeqCst) && self.queued.load(SeqCst) >= self.capacity {
            locked = self.freed.wait(locked).expect("queue lock");
        }
        self.waiting.fetch_sub(1, SeqCst);
        !self.closed.load(SeqCst)
    }
}

/// A queue of `capacity` messages; its drops are counted under `name`.
pub fn bounded<T>(name: &'static str, capacity: usize, drops: &QueueDrops) -> (Queue<T>, Inbox<T>) {
    let (sender, receiver) = mpsc::channel();
    let room = Arc::new(Room {
        capacity,
        queued: AtomicUsize::new(0),
        waiting: AtomicUsize::new(0),
        closed: AtomicBool::new(false),
        lock: Mutex::new(()),
        freed: Condvar::new(),
    });
    let dropped = drops.counter(name);
    (
        Queue {
            sender,
            room: Arc::clone(&room),
            dropped,
        },
        Inbox { receiver, room },
    )
}

impl<T> Queue<T> {
    /// Queues `message` unless the queue is full (then it is dropped and counted).
    pub fn offer(&self, message: T) -> Result<(), Refused> {
        if self.room.closed.load(SeqCst) {
            return Err(Refused::Closed);
        }
        if !self.room.reserve() {
            self.dropped.inc();
            return Err(Refused::Full);
        }
        self.push(message)
    }

    /// Waits for room: for what must arrive (a stop, a reload), from threads that may block.
    pub fn send(&self, message: T) -> Result<(), Refused> {
        while !self.room.reserve() {
            if !self.room.wait_for_room() {
                return Err(Refused::Closed);
            }
        }
        self.push(message)
    }

    /// Sends a message whose room is reserved.
    fn push(&self, message: T) -> Result<(), Refused> {
        self.sender.send(message).map_err(|_| {
            self.room.release();
            Refused::Closed
        })
    }
}

impl<T> Inbox<T> {
    /// The next message, waiting at most `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<T, RecvTimeoutError> {
        let message = self.receiver.recv_timeout(timeout)?;
        self.room.release();
        Ok(message)
    }

    /// The messages queued now, without waiting.
    pub fn try_iter(&self) -> impl Iterator<Item = T> + '_ {
        self.receiver.try_iter().inspect(|_| self.room.release())
    }
}

impl<T> Drop for Inbox<T> {
    fn drop(&mut self) {
        self.room.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_and_counts() {
        let mut registry = Registry::default();
        let drops = QueueDrops::new(&mut registry);
        let (queue, inbox) = bounded("test", 2, &drops);
        assert_eq!(queue.offer(1), Ok(()));
        assert_eq!(queue.offer(2), Ok(()));
        assert_eq!(queue.offer(3), Err(Refused::Full));
        assert_eq!(inbox.try_iter().collect::<Vec<_>>(), [1, 2]);
        // What was taken out makes room again.
        assert_eq!(queue.offer(4), Ok(()));
        assert_eq!(queue.offer(5), Ok(()));
        assert_eq!(queue.offer(6), Err(Refused::Full));
        assert_eq!(inbox.recv_timeout(Duration::ZERO), Ok(4));
        assert_eq!(queue.offer(7), Ok(()));
        drop(inbox);
        assert_eq!(queue.offer(8), Err(Refused::Closed));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("sentinel_queue_dropped_total{queue=\"test\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn a_sender_waits_for_room_and_nothing_is_lost() {
        let (queue, inbox) = bounded("test", 1, &QueueDrops::new(&mut Registry::default()));
        const MESSAGES: u32 = 10_000;
        let senders: Vec<_> = (0..2)
            .map(|sender| {
                let queue = queue.clone();
                std::thread::spawn(move || {
                    for n in 0..MESSAGES {
                        queue.send(sender * MESSAGES + n).unwrap();
                    }
                })
            })
            .collect();
        drop(queue);
        let mut received = Vec::new();
        while let Ok(message) = inbox.recv_timeout(Duration::MAX) {
            assert!(
                inbox.room.queued.load(SeqCst) <= 1,
                "more queued than the capacity"
            );
            received.push(message);
        }
        for sender in senders {
            sender.join().unwrap();
        }
        received.sort_unstable();
        assert_eq!(received, (0..2 * MESSAGES).collect::<Vec<_>>());
    }

    #[test]
    fn a_sender_waiting_for_room_hears_that_the_receiver_is_gone() {
        let (queue, inbox) = bounded("test", 1, &QueueDrops::new(&mut Registry::default()));
        queue.send(1).unwrap();
        let waiting = std::thread::spawn(move || queue.send(2));
        // Give the sender time to wait (it also works if it has not begun to).
        std::thread::sleep(Duration::from_millis(50));
        drop(inbox);
        assert_eq!(waiting.join().unwrap(), Err(Refused::Closed));
    }
}
