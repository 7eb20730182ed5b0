//! The daemon's mirror of the banned sets, and the planning of each batch against it.
//!
//! An interval set cannot hold overlapping elements (the kernel refuses them), so every ban is
//! merged with the bans it overlaps. CIDR networks never overlap partially: one contains the
//! other. The rule is that no ban ends sooner than any overlapping ban asked for:
//! - a ban inside a wider ban that lasts at least as long changes nothing; if the wider ban would
//!   end sooner, the wider ban is extended (the narrower one cannot sit inside it);
//! - a ban covering narrower bans replaces them and lasts as long as the longest of them;
//! - banning an already banned network again extends its timeout, and never shortens it.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use super::{ActiveBan, IpNet};

/// How long the mirror keeps an element after its expiry. The kernel counts in jiffies and starts
/// the timeout a moment after the daemon does, so an element the mirror has just dropped may still
/// be in the set; keeping it a little longer means a new ban of it is sent as a refresh (delete and
/// add) rather than an add that an older kernel would ignore without extending the timeout.
const EXPIRY_GRACE: Duration = Duration::from_secs(1);

/// When an element leaves the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Expiry {
    At(Instant),
    /// Elements added by hand without a timeout.
    Never,
}

impl Expiry {
    /// The time left, or `None` for an element without a timeout.
    pub(super) fn remaining(self, now: Instant) -> Option<Duration> {
        match self {
            Expiry::At(at) => Some(at.saturating_duration_since(now)),
            Expiry::Never => None,
        }
    }

    /// The timeout to give the kernel, in milliseconds (its unit), or `None` for no timeout.
    /// A partial millisecond is rounded up so that a ban never ends early.
    pub(super) fn timeout_ms(self, now: Instant) -> Option<u64> {
        let remaining = self.remaining(now)?;
        let millis = remaining.as_nanos().div_ceil(1_000_000);
        Some(u64::try_from(millis).unwrap_or(u64::MAX).max(1))
    }
}

/// The set updates that bring the kernel to the mirror's new state. Removals are sent first, so
/// a refreshed or widened element never overlaps the element it replaces.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Changes {
    pub removed: Vec<IpNet>,
    pub added: Vec<(IpNet, Expiry)>,
}

impl Changes {
    pub(super) fn is_empty(&self) -> bool {
        self.removed.is_empty() && self.added.is_empty()
    }
}

#[derive(Debug, Default)]
pub(super) struct BanView {
    by_net: BTreeMap<IpNet, Expiry>,
    /// The same bans ordered by expiry, so that forgetting expired ones needs no scan.
    by_expiry: BTreeSet<(Expiry, IpNet)>,
}

impl BanView {
    pub(super) fn new(bans: impl IntoIterator<Item = (IpNet, Expiry)>) -> Self {
        let mut view = Self::default();
        for (net, expiry) in bans {
            view.insert(net, expiry);
        }
        view
    }

    /// The bans still in force, narrowest address first.
    pub(super) fn active(&self, now: Instant) -> Vec<ActiveBan> {
        self.by_net
            .iter()
            .filter(|(_, expiry)| **expiry > Expiry::At(now))
            .map(|(net, expiry)| ActiveBan {
                net: *net,
                expires_in: expiry.remaining(now),
            })
            .collect()
    }

    /// Records the bans in the mirror and returns what the kernel must do to match.
    pub(super) fn ban(
        &mut self,
        bans: impl IntoIterator<Item = (IpNet, Expiry)>,
        now: Instant,
    ) -> Changes {
        self.forget_expired(now);
        let mut recorder = Recorder::new(self);
        for (net, expiry) in bans {
            if let Some((wider, wider_expiry)) = recorder.view.container_of(net) {
                if wider_expiry < expiry {
                    recorder.insert(wider, expiry);
                }
                continue;
            }
            let narrower = recorder.view.contained_in(net);
            let longest = narrower.iter().map(|(_, e)| *e).fold(expiry, Expiry::max);
            for (narrower_net, _) in narrower {
                recorder.remove(narrower_net);
            }
            recorder.insert(net, longest);
        }
        recorder.changes()
    }

    /// Removes every ban that overlaps one of `nets`, so all their addresses are let in again.
    pub(super) fn unban(&mut self, nets: impl IntoIterator<Item = IpNet>, now: Instant) -> Changes {
        self.forget_expired(now);
        let mut recorder = Recorder::new(self);
        for net in nets {
            let wider = recorder.view.container_of(net);
            let narrower = recorder.view.contained_in(net);
            for (overlapping, _) in wider.into_iter().chain(narrower) {
                recorder.remove(overlapping);
            }
        }
        recorder.changes()
    }

    /// The ban that contains `net` (or equals it), if any. Bans are disjoint, so only the last
    /// ban sorting at or before `net` can contain it.
    fn container_of(&self, net: IpNet) -> Option<(IpNet, Expiry)> {
        self.by_net
            .range(..=net)
            .next_back()
            .filter(|(ban, _)| ban.contains(&net))
            .map(|(ban, expiry)| (*ban, *expiry))
    }

    /// The bans inside `net`, `net` itself included.
    fn contained_in(&self, net: IpNet) -> Vec<(IpNet, Expiry)> {
        self.by_net
            .range(net..)
            .take_while(|(ban, _)| net.contains(ban))
            .map(|(ban, expiry)| (*ban, *expiry))
            .collect()
    }

    fn insert(&mut self, net: IpNet, expiry: Expiry) -> Option<Expiry> {
        let previous = self.remove(net);
        self.by_net.insert(net, expiry);
        self.by_expiry.insert((expiry, net));
        previous
    }

    fn remove(&mut self, net: IpNet) -> Option<Expiry> {
        let previous = self.by_net.remove(&net)?;
        self.by_expiry.remove(&(previous, net));
        Some(previous)
    }

    /// The kernel removes expired elements by itself.
    fn forget_expired(&mut self, now: Instant) {
        let cutoff = Expiry::At(now.checked_sub(EXPIRY_GRACE).unwrap_or(now));
        while let Some(&(expiry, net)) = self.by_expiry.first() {
            if expiry > cutoff {
                break;
            }
            self.remove(net);
        }
    }
}

/// Applies edits to the mirror while remembering each touched element's state before the batch.
struct Recorder<'a> {
    view: &'a mut BanView,
    before: BTreeMap<IpNet, Option<Expiry>>,
}

impl<'a> Recorder<'a> {
    fn new(view: &'a mut BanView) -> Self {
        Self {
            view,
            before: BTreeMap::new(),
        }
    }

    fn insert(&mut self, net: IpNet, expiry: Expiry) {
        let previous = self.view.insert(net, expiry);
        self.before.entry(net).or_insert(previous);
    }

    fn remove(&mut self, net: IpNet) {
        let previous = self.view.remove(net);
        self.before.entry(net).or_insert(previous);
    }

    fn changes(self) -> Changes {
        let mut changes = Changes::default();
        for (net, before) in self.before {
            match (before, self.view.by_net.get(&net).copied()) {
                (Some(_), None) => changes.removed.push(net),
                (None, Some(after)) => changes.added.push((net, after)),
                (Some(before), Some(after)) if before != after => {
                    changes.removed.push(net);
                    changes.added.push((net, after));
                }
                _ => {}
            }
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    fn at(now: Instant, secs: u64) -> Expiry {
        Expiry::At(now + Duration::from_secs(secs))
    }

    #[test]
    fn new_ban_is_added_and_a_repeat_changes_nothing() {
        let now = Instant::now();
        let mut view = BanView::default();
        let first = view.ban([(net("192.0.2.7"), at(now, 60))], now);
        assert_eq!(first.added, vec![(net("192.0.2.7"), at(now, 60))]);
        assert!(first.removed.is_empty());
        assert!(view.ban([(net("192.0.2.7"), at(now, 30))], now).is_empty());
    }

    #[test]
    fn longer_repeat_refreshes_the_element() {
        let now = Instant::now();
        let mut view = BanView::new([(net("192.0.2.7"), at(now, 60))]);
        let changes = view.ban([(net("192.0.2.7"), at(now, 600))], now);
        assert_eq!(changes.removed, vec![net("192.0.2.7")]);
        assert_eq!(changes.added, vec![(net("192.0.2.7"), at(now, 600))]);
    }

    #[test]
    fn ban_inside_a_shorter_wider_ban_extends_the_wider_one() {
        let now = Instant::now();
        let mut view = BanView::new([(net("2001:db8::/64"), at(now, 60))]);
        assert!(
            view.ban([(net("2001:db8::/80"), at(now, 10))], now)
                .is_empty()
        );
        let changes = view.ban([(net("2001:db8::/80"), at(now, 600))], now);
        assert_eq!(changes.removed, vec![net("2001:db8::/64")]);
        assert_eq!(changes.added, vec![(net("2001:db8::/64"), at(now, 600))]);
    }

    #[test]
    fn wider_ban_replaces_narrower_ones_and_keeps_the_longest_timeout() {
        let now = Instant::now();
        let mut view = BanView::new([
            (net("192.0.2.7"), at(now, 900)),
            (net("192.0.2.9"), at(now, 60)),
            (net("192.0.3.1"), at(now, 60)),
        ]);
        let changes = view.ban([(net("192.0.2.0/24"), at(now, 300))], now);
        assert_eq!(changes.removed, vec![net("192.0.2.7"), net("192.0.2.9")]);
        assert_eq!(changes.added, vec![(net("192.0.2.0/24"), at(now, 900))]);
        assert_eq!(view.active(now).len(), 2);
    }

    #[test]
    fn overlaps_within_one_batch_collapse_to_one_element() {
        let now = Instant::now();
        let mut view = BanView::default();
        let changes = view.ban(
            [
                (net("192.0.2.7"), at(now, 60)),
                (net("192.0.2.0/24"), at(now, 60)),
            ],
            now,
        );
        assert!(changes.removed.is_empty(), "nothing was in the kernel yet");
        assert_eq!(changes.added, vec![(net("192.0.2.0/24"), at(now, 60))]);
    }

    #[test]
    fn unban_removes_wider_and_narrower_overlaps_only() {
        let now = Instant::now();
        let mut view = BanView::new([
            (net("192.0.2.0/24"), at(now, 60)),
            (net("198.51.100.7"), at(now, 60)),
            (net("198.51.100.9"), at(now, 60)),
        ]);
        let changes = view.unban([net("192.0.2.7"), net("198.51.100.0/24")], now);
        assert_eq!(
            changes.removed,
            vec![
                net("192.0.2.0/24"),
                net("198.51.100.7"),
                net("198.51.100.9")
            ]
        );
        assert!(view.active(now).is_empty());
        assert!(view.unban([net("203.0.113.1")], now).is_empty());
    }

    #[test]
    fn expired_bans_are_forgotten_after_the_grace_period() {
        let now = Instant::now();
        let mut view = BanView::new([(net("192.0.2.7"), Expiry::At(now))]);
        let later = now + EXPIRY_GRACE + Duration::from_millis(1);
        assert!(view.active(now).is_empty());
        let changes = view.ban([(net("192.0.2.7"), at(later, 60))], later);
        assert!(changes.removed.is_empty());
        assert_eq!(changes.added, vec![(net("192.0.2.7"), at(later, 60))]);
    }
}
