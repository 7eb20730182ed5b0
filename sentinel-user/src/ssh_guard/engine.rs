//! The ban decisions: failures per address within a window (a failed password counts in
//! full, a connection that ended before authenticating counts `preauth_weight`), growing bans
//! for repeat offenders, the allow list, the operator's open sessions, and bounded memory. Pure logic:
//! time comes in as arguments, the firewall and the audit log are driven by the caller.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

use crate::firewall::IpNet;

#[derive(Debug, Clone, PartialEq)]
pub struct GuardRules {
    pub max_failures: u32,
    /// What an SSH connection that ended without authenticating weighs, in hundredths of a
    /// failed password (sshguard's scoring: a failed password weighs more); 0 ignores them.
    pub preauth_weight: Weight,
    pub window: Duration,
    pub ban_for: Duration,
    pub multiplier: f64,
    pub max_ban: Duration,
    /// Never banned; loopback is always added.
    pub allow: Vec<IpNet>,
    /// IPv6 offenders are counted and banned per prefix of this length.
    pub ipv6_prefix_len: u8,
    /// Addresses with failures being tracked at once; beyond it the oldest are forgotten.
    pub max_tracked: usize,
    /// Bans held at once; beyond it new bans are refused (and counted).
    pub max_banned: usize,
}

/// A failure's weight in hundredths of a failed password (integers, so that ten tenths make
/// exactly one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Weight(pub u32);

impl Weight {
    /// A failed password.
    pub const FULL: Self = Self(100);
}

/// Why a failure did not lead to a ban although it reached the threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SkipReason {
    Allowlisted,
    /// A user is logged in over SSH from this address right now.
    ActiveSession,
    /// `max_banned` bans are already in force.
    BanTableFull,
}

impl SkipReason {
    pub fn label(self) -> &'static str {
        match self {
            Self::Allowlisted => "allowlisted",
            Self::ActiveSession => "active_session",
            Self::BanTableFull => "ban_table_full",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// Below the threshold (or already banned): nothing to do.
    Counted,
    Ban {
        net: IpNet,
        duration: Duration,
        failures: u32,
        /// 1 for a first ban, 2 for the next, ...
        offense: u32,
    },
    Skip {
        net: IpNet,
        reason: SkipReason,
        failures: u32,
    },
}

/// An offender's ban count, and when its latest ban ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Offense {
    pub count: u32,
    pub ends: Instant,
}

pub struct BanEngine {
    rules: GuardRules,
    /// Failure times and weights within the window, per offender.
    failures: HashMap<IpNet, VecDeque<(Instant, Weight)>>,
    /// Offenders in the order they were first tracked, for eviction (may hold stale keys).
    tracked_order: VecDeque<IpNet>,
    /// Bans so far per offender, for growing ban durations; forgotten once an offender has
    /// stayed unbanned for `max_ban`.
    offenses: HashMap<IpNet, Offense>,
    /// Bans in force and when they end.
    banned: HashMap<IpNet, Instant>,
    /// Addresses with an open SSH session, and whether it is still open.
    sessions: Vec<(IpAddr, Box<dyn Fn() -> bool + Send>)>,
    /// Failure records forgotten because `max_tracked` was reached.
    pub evicted: u64,
}

impl BanEngine {
    pub fn new(rules: GuardRules) -> Self {
        Self {
            rules: with_loopback(rules),
            failures: HashMap::new(),
            tracked_order: VecDeque::new(),
            offenses: HashMap::new(),
            banned: HashMap::new(),
            sessions: Vec::new(),
            evicted: 0,
        }
    }

    /// Takes new rules (a reload); failures, offenses and bans in force stay.
    pub fn set_rules(&mut self, rules: GuardRules) {
        self.rules = with_loopback(rules);
    }

    /// The bans in force that the allow list covers (after a reload widened it): they must be
    /// lifted, since allowed addresses are never banned.
    pub fn allowed_bans(&mut self, now: Instant) -> Vec<IpNet> {
        let mut allowed: Vec<IpNet> = self
            .banned
            .iter()
            .filter(|(net, until)| **until > now && self.covers_allowed(net))
            .map(|(net, _)| *net)
            .collect();
        allowed.sort();
        allowed
    }

    /// The unit of counting and banning for `addr`: the address, or its IPv6 prefix, unless
    /// that prefix holds an allowed address: then only the address itself, so that an attacker
    /// next to an allow-listed admin never gets the admin banned.
    pub fn offender(&self, addr: IpAddr) -> IpNet {
        let net = IpNet::from(addr);
        if !addr.is_ipv6() {
            return net;
        }
        let prefix = net.widened_to(self.rules.ipv6_prefix_len);
        if self.covers_allowed(&prefix) {
            net
        } else {
            prefix
        }
    }

    /// Whether banning `net` would drop an allowed address: the one rule for both families.
    pub fn covers_allowed(&self, net: &IpNet) -> bool {
        self.rules
            .allow
            .iter()
            .any(|allowed| allowed.contains(net) || net.contains(allowed))
    }

    /// A user logged in from `addr`; `still_open` tells whether that session still runs.
    pub fn session_opened(&mut self, addr: IpAddr, still_open: impl Fn() -> bool + Send + 'static) {
        self.sessions.retain(|(_, open)| open());
        self.sessions.push((addr, Box::new(still_open)));
    }

    /// Whether someone is logged in over SSH from inside `net` right now.
    pub fn has_open_session(&mut self, net: &IpNet) -> bool {
        self.sessions.retain(|(_, open)| open());
        self.sessions
            .iter()
            .any(|(addr, _)| net.contains(&IpNet::from(*addr)))
    }

    /// One failed authentication from `addr` at `now`.
    pub fn failure(&mut self, now: Instant, addr: IpAddr) -> Verdict {
        self.offend(now, addr, Weight::FULL)
    }

    /// An SSH connection from `addr` that ended at `now` without authenticating; it counts
    /// `preauth_weight`.
    pub fn preauth_end(&mut self, now: Instant, addr: IpAddr) -> Verdict {
        match self.rules.preauth_weight {
            Weight(0) => Verdict::Counted,
            weight => self.offend(now, addr, weight),
        }
    }

    /// Counts a failure of `weight`: a ban once the weights within the window reach
    /// `max_failures` failed passwords.
    fn offend(&mut self, now: Instant, addr: IpAddr, weight: Weight) -> Verdict {
        let net = self.offender(addr);
        if self.banned.get(&net).is_some_and(|until| *until > now) {
            return Verdict::Counted;
        }
        let window = self.rules.window;
        if !self.failures.contains_key(&net) {
            self.make_room(now);
            self.tracked_order.push_back(net);
        }
        let times = self.failures.entry(net).or_default();
        while times
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) >= window)
        {
            times.pop_front();
        }
        times.push_back((now, weight));
        let failures = times.len() as u32;
        let score: u64 = times.iter().map(|(_, Weight(w))| u64::from(*w)).sum();
        if score < u64::from(self.rules.max_failures) * u64::from(Weight::FULL.0) {
            return Verdict::Counted;
        }
        self.sentence(now, net, failures)
    }

    /// Why banning `net` now must not happen, if it must not: the allow list, an open SSH
    /// session from inside it, or a full ban table.
    pub fn skip_reason(&mut self, now: Instant, net: &IpNet) -> Option<SkipReason> {
        if self.covers_allowed(net) {
            Some(SkipReason::Allowlisted)
        } else if self.has_open_session(net) {
            Some(SkipReason::ActiveSession)
        } else if self.active_bans(now) >= self.rules.max_banned {
            Some(SkipReason::BanTableFull)
        } else {
            None
        }
    }

    /// `addr` was found offending by another detector (a port scan, with `failures` as its
    /// count): banned at once under the same rules as failed authentications (allow list, open
    /// sessions, growing bans), unless it is banned already.
    pub fn convict(&mut self, now: Instant, addr: IpAddr, failures: u32) -> Verdict {
        let net = self.offender(addr);
        if self.banned.get(&net).is_some_and(|until| *until > now) {
            return Verdict::Counted;
        }
        self.sentence(now, net, failures)
    }

    /// `net` has offended enough: its failures are forgotten, and it is banned (a longer ban
    /// for a repeat offender) unless a rule spares it.
    fn sentence(&mut self, now: Instant, net: IpNet, failures: u32) -> Verdict {
        self.failures.remove(&net);
        if let Some(reason) = self.skip_reason(now, &net) {
            return Verdict::Skip {
                net,
                reason,
                failures,
            };
        }
        let offense = self.offenses.get(&net).map_or(0, |known| known.count) + 1;
        let duration = self.ban_duration(offense);
        self.record_ban(net, now, duration, offense);
        Verdict::Ban {
            net,
            duration,
            failures,
            offense,
        }
    }

    /// `ban_for × multiplier^(offense-1)`, capped at `max_ban`.
    pub fn ban_duration(&self, offense: u32) -> Duration {
        let factor = self.rules.multiplier.powi(offense.saturating_sub(1) as i32);
        let seconds = self.rules.ban_for.as_secs_f64() * factor;
        Duration::from_secs_f64(seconds.min(self.rules.max_ban.as_secs_f64()))
    }

    /// Records a ban made elsewhere (by the operator, or found in the kernel at start).
    pub fn record_ban(&mut self, net: IpNet, now: Instant, duration: Duration, offense: u32) {
        let ends = now + duration;
        self.banned.insert(net, ends);
        self.record_offense(net, offense, ends);
    }

    /// Records a ban made for the fleet until `ends` (a later end wins): listed, restored and
    /// lifted like the others, but no offense of this host's, so it never lengthens a local ban.
    pub fn hold(&mut self, net: IpNet, ends: Instant) {
        let until = self.banned.entry(net).or_insert(ends);
        *until = (*until).max(ends);
    }

    /// When the ban of `net` in force ends.
    pub fn ban_end(&self, net: &IpNet) -> Option<Instant> {
        self.banned.get(net).copied()
    }

    /// Remembers that `net` was banned `count` times, the latest ban ending at `ends` (from the
    /// state kept on disk, or a ban just made).
    pub fn record_offense(&mut self, net: IpNet, count: u32, ends: Instant) {
        let known = self.offenses.entry(net).or_insert(Offense { count, ends });
        known.count = known.count.max(count);
        known.ends = known.ends.max(ends);
    }

    /// Takes back a ban `failure` called for but that could not be made: it is not in force and
    /// does not count as an offense.
    pub fn withdraw(&mut self, net: &IpNet, offense: u32) {
        self.banned.remove(net);
        if let Some(known) = self.offenses.get_mut(net)
            && known.count == offense
        {
            known.count -= 1;
            if known.count == 0 {
                self.offenses.remove(net);
            }
        }
    }

    /// The next moment something changes with time alone: a ban ends, or an offender is
    /// forgotten ([`Self::forget_old_offenses`]); `None` when nothing is banned or remembered.
    pub fn next_change(&self, now: Instant) -> Option<Instant> {
        let quiet_for = self.rules.max_ban;
        let ban_ends = self.banned.values().copied().filter(|until| *until > now);
        let forgotten = self
            .offenses
            .values()
            .map(|offense| offense.ends + quiet_for);
        ban_ends.chain(forgotten).min()
    }

    /// Offenders whose latest ban ended more than `max_ban` ago start over; at most as many
    /// are remembered as can be tracked and banned at once, the longest quiet forgotten first.
    pub fn forget_old_offenses(&mut self, now: Instant) {
        let quiet_for = self.rules.max_ban;
        self.offenses
            .retain(|_, offense| now.saturating_duration_since(offense.ends) < quiet_for);
        let bound = self.rules.max_tracked.saturating_add(self.rules.max_banned);
        if self.offenses.len() > bound {
            let mut ends: Vec<Instant> = self.offenses.values().map(|o| o.ends).collect();
            let cut = self.offenses.len() - bound;
            ends.select_nth_unstable(cut - 1);
            let oldest_kept = ends[cut - 1];
            self.offenses
                .retain(|_, offense| offense.ends > oldest_kept);
        }
    }

    /// The offenses remembered, for the state kept on disk.
    pub fn offenses(&self) -> impl Iterator<Item = (&IpNet, &Offense)> {
        self.offenses.iter()
    }

    pub fn lift(&mut self, net: &IpNet) -> bool {
        self.failures.remove(net);
        self.banned.remove(net).is_some()
    }

    /// Lifts every ban; offense counts stay.
    pub fn lift_all(&mut self) {
        self.banned.clear();
    }

    /// Bans in force at `now`, with when they end; expired ones are dropped.
    pub fn bans(&mut self, now: Instant) -> impl Iterator<Item = (&IpNet, &Instant)> {
        self.banned.retain(|_, until| *until > now);
        self.banned.iter()
    }

    pub fn active_bans(&mut self, now: Instant) -> usize {
        self.bans(now).count()
    }

    pub fn tracked(&self) -> usize {
        self.failures.len()
    }

    /// Forgets the oldest tracked offenders (and stale window entries) to stay within bounds.
    fn make_room(&mut self, now: Instant) {
        let window = self.rules.window;
        while self.failures.len() >= self.rules.max_tracked {
            let Some(oldest) = self.tracked_order.pop_front() else {
                break;
            };
            if let Some(times) = self.failures.remove(&oldest) {
                let live = times
                    .back()
                    .is_some_and(|(t, _)| now.duration_since(*t) < window);
                if live {
                    self.evicted += 1;
                }
            }
        }
        // Keys removed by bans stay in the queue; compact it before it grows unbounded.
        if self.tracked_order.len() > 2 * self.rules.max_tracked.max(1) {
            let failures = &self.failures;
            self.tracked_order.retain(|net| failures.contains_key(net));
        }
    }
}

/// `rules` with loopback allowed: the host never bans itself.
fn with_loopback(mut rules: GuardRules) -> GuardRules {
    for loopback in ["127.0.0.0/8", "::1/128"] {
        rules
            .allow
            .push(loopback.parse().expect("valid loopback network"));
    }
    rules
}

#[cfg(test)]
mod tests {
    use std::sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    };

    use super::*;

    fn rules() -> GuardRules {
        GuardRules {
            max_failures: 5,
            preauth_weight: Weight(50),
            window: Duration::from_secs(600),
            ban_for: Duration::from_secs(600),
            multiplier: 2.0,
            max_ban: Duration::from_secs(7 * 86400),
            allow: vec!["10.9.0.0/16".parse().unwrap()],
            ipv6_prefix_len: 64,
            max_tracked: 1000,
            max_banned: 1000,
        }
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn fail_n(engine: &mut BanEngine, now: Instant, addr: &str, n: u32) -> Vec<Verdict> {
        (0..n).map(|_| engine.failure(now, ip(addr))).collect()
    }

    #[test]
    fn new_rules_name_the_bans_the_allow_list_now_covers_and_apply_the_new_threshold() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        for attacker in ["203.0.113.7", "198.51.100.9"] {
            engine.record_ban(IpNet::from(ip(attacker)), now, Duration::from_secs(600), 1);
        }
        let mut reloaded = rules();
        reloaded.allow.push("203.0.113.0/24".parse().unwrap());
        reloaded.max_failures = 2;
        engine.set_rules(reloaded);
        let allowed = engine.allowed_bans(now);
        assert_eq!(allowed, vec![IpNet::from(ip("203.0.113.7"))]);
        assert!(engine.lift(&allowed[0]));
        let in_force: Vec<IpNet> = engine.bans(now).map(|(net, _)| *net).collect();
        assert_eq!(in_force, vec![IpNet::from(ip("198.51.100.9"))]);
        // Loopback stays allowed after a reload, and the new threshold counts.
        assert!(engine.covers_allowed(&IpNet::from(ip("127.0.0.1"))));
        assert_eq!(engine.failure(now, ip("192.0.2.1")), Verdict::Counted);
        assert!(matches!(
            engine.failure(now, ip("192.0.2.1")),
            Verdict::Ban { failures: 2, .. }
        ));
        assert!(matches!(
            fail_n(&mut engine, now, "203.0.113.8", 2).pop(),
            Some(Verdict::Skip {
                reason: SkipReason::Allowlisted,
                ..
            })
        ));
    }

    #[test]
    fn preauth_ends_weigh_their_share_and_nothing_when_their_weight_is_zero() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        // Five failures ban; at 0.5 each, nine pre-auth ends do not, the tenth does.
        for _ in 0..9 {
            assert_eq!(engine.preauth_end(now, ip("203.0.113.7")), Verdict::Counted);
        }
        assert!(matches!(
            engine.preauth_end(now, ip("203.0.113.7")),
            Verdict::Ban { failures: 10, .. }
        ));
        // Mixed: four failed passwords and two pre-auth ends make five.
        fail_n(&mut engine, now, "198.51.100.9", 4);
        assert_eq!(
            engine.preauth_end(now, ip("198.51.100.9")),
            Verdict::Counted
        );
        assert!(matches!(
            engine.preauth_end(now, ip("198.51.100.9")),
            Verdict::Ban { failures: 6, .. }
        ));
        // Ten tenths make exactly one failed password.
        let mut tenths = rules();
        tenths.max_failures = 1;
        tenths.preauth_weight = Weight(10);
        let mut engine = BanEngine::new(tenths);
        for _ in 0..9 {
            assert_eq!(engine.preauth_end(now, ip("192.0.2.1")), Verdict::Counted);
        }
        assert!(matches!(
            engine.preauth_end(now, ip("192.0.2.1")),
            Verdict::Ban { .. }
        ));
        let mut ignored = rules();
        ignored.preauth_weight = Weight(0);
        let mut engine = BanEngine::new(ignored);
        for _ in 0..1000 {
            assert_eq!(engine.preauth_end(now, ip("192.0.2.1")), Verdict::Counted);
        }
        assert_eq!(engine.tracked(), 0);
    }

    #[test]
    fn time_alone_changes_something_only_when_a_ban_ends_or_an_offender_is_forgotten() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        assert_eq!(engine.next_change(now), None);
        fail_n(&mut engine, now, "203.0.113.7", 4);
        assert_eq!(engine.next_change(now), None);

        let ban = Duration::from_secs(600);
        engine.record_ban(IpNet::from(ip("203.0.113.7")), now, ban, 1);
        let ends = now + ban;
        assert_eq!(engine.next_change(now), Some(ends));
        // Once the ban has ended, the offender is forgotten `max_ban` later.
        let forgotten = ends + rules().max_ban;
        assert_eq!(engine.next_change(ends), Some(forgotten));
        engine.forget_old_offenses(forgotten);
        assert_eq!(engine.next_change(forgotten), None);
    }

    #[test]
    fn bans_at_exactly_max_failures() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        let verdicts = fail_n(&mut engine, now, "203.0.113.7", 5);
        assert!(verdicts[..4].iter().all(|v| *v == Verdict::Counted));
        assert_eq!(
            verdicts[4],
            Verdict::Ban {
                net: "203.0.113.7/32".parse().unwrap(),
                duration: Duration::from_secs(600),
                failures: 5,
                offense: 1,
            }
        );
        // Further failures while banned do nothing.
        assert_eq!(engine.failure(now, ip("203.0.113.7")), Verdict::Counted);
    }

    #[test]
    fn failures_outside_the_window_do_not_count() {
        let mut engine = BanEngine::new(rules());
        let start = Instant::now();
        fail_n(&mut engine, start, "203.0.113.7", 4);
        let later = start + Duration::from_secs(601);
        assert_eq!(engine.failure(later, ip("203.0.113.7")), Verdict::Counted);
    }

    #[test]
    fn repeat_offenders_get_longer_bans_up_to_the_cap() {
        let mut engine = BanEngine::new(rules());
        let mut now = Instant::now();
        let mut durations = Vec::new();
        for round in 1..=12 {
            let verdict = fail_n(&mut engine, now, "198.51.100.1", 5).pop();
            let Some(Verdict::Ban {
                duration, offense, ..
            }) = verdict
            else {
                panic!("round {round} made no ban: {verdict:?}");
            };
            assert_eq!(offense, round);
            durations.push(duration.as_secs());
            now += duration + Duration::from_secs(1);
        }
        let week = 7 * 86400;
        assert_eq!(
            durations,
            [
                600, 1200, 2400, 4800, 9600, 19200, 38400, 76800, 153600, 307200, week, week
            ]
        );
    }

    #[test]
    fn allowlisted_and_loopback_addresses_are_never_banned() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        for addr in ["10.9.3.4", "127.0.0.1", "::1"] {
            for _ in 0..3 {
                let verdict = fail_n(&mut engine, now, addr, 5).pop().unwrap();
                assert!(
                    matches!(
                        verdict,
                        Verdict::Skip {
                            reason: SkipReason::Allowlisted,
                            ..
                        }
                    ),
                    "{addr}: {verdict:?}"
                );
            }
        }
        assert_eq!(engine.active_bans(now), 0);
    }

    #[test]
    fn an_address_with_an_open_session_is_not_banned_until_it_closes() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        let open = Arc::new(AtomicBool::new(true));
        let flag = open.clone();
        engine.session_opened(ip("192.0.2.10"), move || flag.load(Ordering::SeqCst));
        let verdict = fail_n(&mut engine, now, "192.0.2.10", 5).pop().unwrap();
        assert!(matches!(
            verdict,
            Verdict::Skip {
                reason: SkipReason::ActiveSession,
                ..
            }
        ));
        open.store(false, Ordering::SeqCst);
        assert!(matches!(
            fail_n(&mut engine, now, "192.0.2.10", 5).pop().unwrap(),
            Verdict::Ban { .. }
        ));
    }

    #[test]
    fn ipv6_is_counted_and_banned_per_prefix() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        for i in 1..=5 {
            let verdict = engine.failure(now, ip(&format!("2001:db8:1:2::{i}")));
            if i == 5 {
                assert!(
                    matches!(verdict, Verdict::Ban { net, .. } if net == "2001:db8:1:2::/64".parse().unwrap())
                );
            }
        }
    }

    #[test]
    fn memory_stays_bounded_under_a_flood_of_addresses() {
        let mut engine = BanEngine::new(GuardRules {
            max_tracked: 100,
            max_banned: 10,
            max_failures: 1,
            ..rules()
        });
        let now = Instant::now();
        let mut skipped = 0;
        for i in 0..10_000u32 {
            let addr = IpAddr::from(std::net::Ipv4Addr::from(0xC633_0000 + i));
            if matches!(
                engine.failure(now, addr),
                Verdict::Skip {
                    reason: SkipReason::BanTableFull,
                    ..
                }
            ) {
                skipped += 1;
            }
        }
        assert!(engine.tracked() <= 100);
        assert_eq!(engine.active_bans(now), 10);
        assert_eq!(skipped, 10_000 - 10);
    }

    #[test]
    fn tracking_evicts_the_oldest_offenders() {
        let mut engine = BanEngine::new(GuardRules {
            max_tracked: 2,
            ..rules()
        });
        let now = Instant::now();
        for addr in ["192.0.2.1", "192.0.2.2", "192.0.2.3"] {
            engine.failure(now, ip(addr));
        }
        assert_eq!(engine.tracked(), 2);
        assert_eq!(engine.evicted, 1);
        // The two newest kept their first failure: four more make five, a ban each...
        for kept in ["192.0.2.3", "192.0.2.2"] {
            let verdicts = fail_n(&mut engine, now, kept, 4);
            assert!(
                matches!(verdicts[3], Verdict::Ban { failures: 5, .. }),
                "{kept}: {verdicts:?}"
            );
        }
        // ...while the oldest was forgotten: four more are only four.
        let forgotten = fail_n(&mut engine, now, "192.0.2.1", 4);
        assert!(
            forgotten.iter().all(|verdict| *verdict == Verdict::Counted),
            "{forgotten:?}"
        );
    }

    #[test]
    fn an_ipv6_attacker_next_to_an_allowed_address_is_banned_alone() {
        let mut rules = rules();
        rules.allow.push("2001:db8:1::10/128".parse().unwrap());
        let mut engine = BanEngine::new(rules);
        let now = Instant::now();
        let attacker = fail_n(&mut engine, now, "2001:db8:1::66", 5);
        assert_eq!(
            attacker[4],
            Verdict::Ban {
                net: "2001:db8:1::66/128".parse().unwrap(),
                duration: Duration::from_secs(600),
                failures: 5,
                offense: 1,
            }
        );
        // The allowed address itself: never, by the same rule.
        let admin = fail_n(&mut engine, now, "2001:db8:1::10", 5);
        assert_eq!(
            admin[4],
            Verdict::Skip {
                net: "2001:db8:1::10/128".parse().unwrap(),
                reason: SkipReason::Allowlisted,
                failures: 5,
            }
        );
        // Elsewhere, the whole prefix.
        let other = fail_n(&mut engine, now, "2001:db8:2::66", 5);
        assert!(
            matches!(other[4], Verdict::Ban { net, .. } if net == "2001:db8:2::/64".parse().unwrap())
        );
    }

    #[test]
    fn offenses_are_forgotten_after_a_quiet_max_ban_and_bounded() {
        let mut rules = rules();
        rules.max_tracked = 1;
        rules.max_banned = 1;
        let mut engine = BanEngine::new(rules);
        let start = Instant::now();
        for (i, addr) in ["203.0.113.1", "203.0.113.2", "203.0.113.3"]
            .iter()
            .enumerate()
        {
            engine.record_ban(
                ip(addr).into(),
                start + Duration::from_secs(i as u64),
                Duration::from_secs(600),
                1,
            );
        }
        engine.forget_old_offenses(start);
        // Bounded to max_tracked + max_banned, the longest quiet forgotten first.
        let mut kept: Vec<String> = engine.offenses().map(|(net, _)| net.to_string()).collect();
        kept.sort();
        assert_eq!(kept, ["203.0.113.2", "203.0.113.3"]);
        // Quiet for max_ban (a week) after the last ban ended: forgotten.
        engine.forget_old_offenses(start + Duration::from_secs(602 + 7 * 86400));
        assert_eq!(engine.offenses().count(), 0);
    }

    #[test]
    fn a_withdrawn_ban_is_neither_in_force_nor_an_offense() {
        let mut engine = BanEngine::new(rules());
        let now = Instant::now();
        let verdicts = fail_n(&mut engine, now, "203.0.113.7", 5);
        let Verdict::Ban { net, offense, .. } = verdicts[4] else {
            panic!("{verdicts:?}");
        };
        engine.withdraw(&net, offense);
        assert_eq!(engine.active_bans(now), 0);
        assert_eq!(engine.offenses().count(), 0);
        // The next threshold is a first offense again.
        let again = fail_n(&mut engine, now, "203.0.113.7", 5);
        assert!(
            matches!(again[4], Verdict::Ban { offense: 1, .. }),
            "{again:?}"
        );
    }

    #[test]
    fn a_convicted_offender_is_banned_at_once_under_the_same_rules() {
        let now = Instant::now();
        let mut engine = BanEngine::new(rules());
        let first = engine.convict(now, ip("203.0.113.4"), 21);
        assert_eq!(
            first,
            Verdict::Ban {
                net: "203.0.113.4".parse().unwrap(),
                duration: Duration::from_secs(600),
                failures: 21,
                offense: 1,
            }
        );
        assert_eq!(engine.convict(now, ip("203.0.113.4"), 21), Verdict::Counted);
        // A repeat offender's ban grows, whatever made the earlier one.
        let later = now + Duration::from_secs(601);
        assert!(matches!(
            engine.convict(later, ip("203.0.113.4"), 20),
            Verdict::Ban { offense: 2, duration, .. } if duration == Duration::from_secs(1200)
        ));
        assert!(matches!(
            engine.convict(now, ip("10.9.1.1"), 20),
            Verdict::Skip {
                reason: SkipReason::Allowlisted,
                ..
            }
        ));
        assert!(matches!(
            engine.convict(now, ip("127.0.0.1"), 20),
            Verdict::Skip {
                reason: SkipReason::Allowlisted,
                ..
            }
        ));
        let open = Arc::new(AtomicBool::new(true));
        let still_open = open.clone();
        engine.session_opened(ip("198.51.100.8"), move || {
            still_open.load(Ordering::Relaxed)
        });
        assert!(matches!(
            engine.convict(now, ip("198.51.100.8"), 20),
            Verdict::Skip {
                reason: SkipReason::ActiveSession,
                ..
            }
        ));
        // IPv6 offenders are banned per prefix, like failing ones.
        assert!(matches!(
            engine.convict(now, ip("2001:db8:1::5"), 20),
            Verdict::Ban { net, .. } if net == "2001:db8:1::/64".parse().unwrap()
        ));
    }
}
