//! The daemon's recent events, for the events pane of `sentinel top`: enforcement actions
//! (limits set or failed, SIGTERM and SIGKILL sent, drift put back), OOM kills, the SSH guard's
//! audit records (bans, unbans, fleet bans, skipped bans), containment actions and reloads.
//!
//! One task owns the log. The parts that act send it what they did through a bounded queue,
//! from the same place they count it or write it to the audit log; what does not fit is
//! dropped and counted in `sentinel_queue_dropped_total{queue="recent_events"}`. The task keeps
//! the last [`CAPACITY`] and publishes them for the control socket.

use std::collections::VecDeque;

use prometheus_client::metrics::counter::Counter;
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::queue::QueueDrops;

/// Events kept; older ones make room for newer ones.
pub const CAPACITY: usize = 256;
/// Events waiting for the log's task before new ones are dropped.
const QUEUE: usize = 1024;

/// One thing the daemon did or saw. A field of the `stats` answer: fields are only ever added.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecentEvent {
    /// When, as the audit log writes it (`2026-11-21T15:04:05.123Z`).
    pub time: String,
    /// An enforcement action as `sentinel_actions_total` counts it (`set_limits`, `sigterm`,
    /// `sigkill`, `failed`, ...), `drift`, `oom_kill`, an audit action (`ban`, `unban`, `skip`,
    /// `would_ban`), a containment action as its audit record names it (`alert`, `kill`,
    /// `freeze`, `isolate`, `would_kill`, ..., `release`), `reload` or `reload_refused`.
    pub kind: String,
    /// The service, the address, or for reloads what started it.
    pub subject: String,
    /// What else is known: the reason of a ban, the process an OOM kill took, the file a
    /// contained service executed; may be empty.
    pub detail: String,
}

/// The last [`CAPACITY`] events, oldest first.
#[derive(Debug, Default)]
pub struct RecentLog(VecDeque<RecentEvent>);

impl RecentLog {
    pub fn push(&mut self, event: RecentEvent) {
        if self.0.len() == CAPACITY {
            self.0.pop_front();
        }
        self.0.push_back(event);
    }

    pub fn to_vec(&self) -> Vec<RecentEvent> {
        self.0.iter().cloned().collect()
    }
}

/// Where the parts of the daemon send their events; cheap to clone.
#[derive(Clone)]
pub struct Recorder {
    sender: mpsc::Sender<RecentEvent>,
    dropped: Counter,
}

impl Recorder {
    /// Records an event that happens now.
    pub fn record(&self, kind: &str, subject: &str, detail: impl Into<String>) {
        self.record_at(
            crate::ssh_guard::audit::rfc3339(std::time::SystemTime::now()),
            kind,
            subject,
            detail,
        );
    }

    /// Records an event stamped `time` (already formatted, e.g. an audit record's).
    pub fn record_at(&self, time: String, kind: &str, subject: &str, detail: impl Into<String>) {
        let event = RecentEvent {
            time,
            kind: kind.to_owned(),
            subject: subject.to_owned(),
            detail: detail.into(),
        };
        // A closed queue means the daemon is stopping; nobody will ask any more.
        if let Err(mpsc::error::TrySendError::Full(_)) = self.sender.try_send(event) {
            self.dropped.inc();
        }
    }
}

/// The log's task and its inputs.
pub struct Keeper {
    inputs: mpsc::Receiver<RecentEvent>,
    publish: watch::Sender<RecentLog>,
}

/// A recorder, the task that keeps what it records, and what that task publishes.
pub fn channel(drops: &QueueDrops) -> (Recorder, Keeper, watch::Receiver<RecentLog>) {
    let (sender, inputs) = mpsc::channel(QUEUE);
    let (publish, published) = watch::channel(RecentLog::default());
    let recorder = Recorder {
        sender,
        dropped: drops.counter("recent_events"),
    };
    (recorder, Keeper { inputs, publish }, published)
}

impl Keeper {
    /// What was recorded and not yet taken, for tests that keep no log.
    #[cfg(test)]
    pub fn take_queued(&mut self) -> Vec<RecentEvent> {
        std::iter::from_fn(|| self.inputs.try_recv().ok()).collect()
    }

    /// Adds what arrives to the log, a batch at a time, until `cancel`.
    pub async fn run(mut self, cancel: CancellationToken) {
        let mut batch = Vec::with_capacity(QUEUE);
        loop {
            let received = tokio::select! {
                () = cancel.cancelled() => return,
                received = self.inputs.recv_many(&mut batch, QUEUE) => received,
            };
            if received == 0 {
                // Every recorder is gone: the daemon is stopping.
                return;
            }
            self.publish.send_modify(|log| {
                for event in batch.drain(..) {
                    log.push(event);
                }
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::{encoding::text::encode, registry::Registry};

    use super::*;

    fn event(number: usize) -> RecentEvent {
        RecentEvent {
            time: "2026-11-21T15:04:05.123Z".into(),
            kind: "ban".into(),
            subject: format!("192.0.2.{}", number % 256),
            detail: number.to_string(),
        }
    }

    #[test]
    fn a_flood_of_events_keeps_only_the_newest() {
        let mut log = RecentLog::default();
        for number in 0..1_000_000 {
            log.push(event(number));
        }
        let kept = log.to_vec();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(kept[0], event(1_000_000 - CAPACITY));
        assert_eq!(kept[CAPACITY - 1], event(999_999));
    }

    #[tokio::test]
    async fn what_the_queue_cannot_hold_is_dropped_and_counted() {
        let mut registry = Registry::default();
        let drops = QueueDrops::new(&mut registry);
        let (recorder, keeper, published) = channel(&drops);
        // Recorded faster than the task runs: the queue fills and the rest is counted.
        for number in 0..QUEUE + 10 {
            recorder.record("ban", &format!("192.0.2.{}", number % 256), "flood");
        }
        drop(recorder);
        keeper.run(CancellationToken::new()).await;
        let kept = published.borrow().to_vec();
        assert_eq!(kept.len(), CAPACITY);
        assert_eq!(
            kept[CAPACITY - 1].subject,
            format!("192.0.2.{}", (QUEUE - 1) % 256)
        );
        let mut text = String::new();
        encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("sentinel_queue_dropped_total{queue=\"recent_events\"} 10"),
            "{text}"
        );
    }
}
