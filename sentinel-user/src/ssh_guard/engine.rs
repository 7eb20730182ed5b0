//! The ban decisions: failures per address within a window, growing bans for repeat
//! offenders, the allow list, the operator's open sessions, and bounded memory. Pure logic:
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

pub struct BanEngine {
    rules: GuardRules,
    /// Failure times within the window, per offender.
    failures: HashMap<IpNet, VecDeque<Instant>>,
    /// Offenders in the order they were first tracked, for eviction (may hold stale keys).
    tracked_order: VecDeque<IpNet>,
    /// Bans so far per offender, for growing ban durations.
    offenses: HashMap<IpNet, u32>,
    /// Bans in force and when they end.
    banned: HashMap<IpNet, Instant>,
    /// Addresses with an open SSH session, and whether it is still open.
    sessions: Vec<(IpAddr, Box<dyn Fn() -> bool + Send>)>,
    /// Failure records forgotten because `max_tracked` was reached.
    pub evicted: u64,
}

impl BanEngine {
    pub fn new(mut rules: GuardRules) -> Self {
        for loopback in ["127.0.0.0/8", "::1/128"] {
            rules
                .allow
                .push(loopback.parse().expect("valid loopback network"));
        }
        Self {
            rules,
            failures: HashMap::new(),
            tracked_order: VecDeque::new(),
            offenses: HashMap::new(),
            banned: HashMap::new(),
            sessions: Vec::new(),
            evicted: 0,
        }
    }

    /// The unit of counting and banning for `addr`: the address, or its IPv6 prefix.
    pub fn offender(&self, addr: IpAddr) -> IpNet {
        let net = IpNet::from(addr);
        if addr.is_ipv6() {
            net.widened_to(self.rules.ipv6_prefix_len)
        } else {
            net
        }
    }

    pub fn is_allowed(&self, addr: IpAddr) -> bool {
        let net = IpNet::from(addr);
        self.rules
            .allow
            .iter()
            .any(|allowed| allowed.contains(&net))
    }

    /// A user logged in from `addr`; `still_open` tells whether that session still runs.
    pub fn session_opened(&mut self, addr: IpAddr, still_open: impl Fn() -> bool + Send + 'static) {
        self.sessions.retain(|(_, open)| open());
        self.sessions.push((addr, Box::new(still_open)));
    }

    fn has_open_session(&mut self, net: &IpNet) -> bool {
        self.sessions.retain(|(_, open)| open());
        self.sessions
            .iter()
            .any(|(addr, _)| net.contains(&IpNet::from(*addr)))
    }

    /// One failed authentication from `addr` at `now`.
    pub fn failure(&mut self, now: Instant, addr: IpAddr) -> Verdict {
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
            .is_some_and(|t| now.duration_since(*t) >= window)
        {
            times.pop_front();
        }
        times.push_back(now);
        let failures = times.len() as u32;
        if failures < self.rules.max_failures {
            return Verdict::Counted;
        }
        self.failures.remove(&net);
        let skip = if self.is_allowed(addr) {
            Some(SkipReason::Allowlisted)
        } else if self.has_open_session(&net) {
            Some(SkipReason::ActiveSession)
        } else if self.active_bans(now) >= self.rules.max_banned {
            Some(SkipReason::BanTableFull)
        } else {
            None
        };
        if let Some(reason) = skip {
            return Verdict::Skip {
                net,
                reason,
                failures,
            };
        }
        let offense = self.offenses.get(&net).copied().unwrap_or(0) + 1;
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
        self.banned.insert(net, now + duration);
        let known = self.offenses.entry(net).or_insert(0);
        *known = (*known).max(offense);
    }

    pub fn lift(&mut self, net: &IpNet) -> bool {
        self.failures.remove(net);
        self.banned.remove(net).is_some()
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
                    .is_some_and(|t| now.duration_since(*t) < window);
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
        for _ in 0..12 {
            if let Some(Verdict::Ban { duration, .. }) =
                fail_n(&mut engine, now, "198.51.100.1", 5).pop()
            {
                durations.push(duration.as_secs());
                now += duration + Duration::from_secs(1);
            }
        }
        assert_eq!(&durations[..4], &[600, 1200, 2400, 4800]);
        assert_eq!(*durations.last().unwrap(), 7 * 86400);
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
    }
}
