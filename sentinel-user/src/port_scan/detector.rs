//! The scan decision: an address that hits `ports` distinct closed ports within `window` is a
//! scanner. Pure logic: time comes in as an argument; memory is bounded by `max_tracked`
//! addresses of fewer than `ports` ports each.

use std::{
    collections::{HashMap, VecDeque},
    net::IpAddr,
    time::{Duration, Instant},
};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRules {
    /// Distinct closed ports within `window` that make an address a scanner.
    pub ports: u32,
    pub window: Duration,
    /// Addresses tracked at once; beyond it the oldest are forgotten (and counted).
    pub max_tracked: usize,
}

/// An address found scanning, with the distinct closed ports it hit within the window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanner {
    pub addr: IpAddr,
    pub ports: u32,
}

pub struct ScanDetector {
    rules: ScanRules,
    /// Per address, each closed port hit within the window and when it was last hit.
    hits: HashMap<IpAddr, Vec<(u16, Instant)>>,
    /// Addresses in the order they were first tracked, for eviction (may hold stale keys).
    order: VecDeque<IpAddr>,
    /// Addresses with live hits forgotten because `max_tracked` was reached.
    pub evicted: u64,
}

impl ScanDetector {
    pub fn new(rules: ScanRules) -> Self {
        Self {
            rules,
            hits: HashMap::new(),
            order: VecDeque::new(),
            evicted: 0,
        }
    }

    /// Takes new rules (a reload); what is tracked stays and is judged by them.
    pub fn set_rules(&mut self, rules: ScanRules) {
        self.rules = rules;
    }

    /// One closed-port hit from `addr` at `now`: the scanner once it reaches the threshold,
    /// after which the address starts over.
    pub fn hit(&mut self, now: Instant, addr: IpAddr, port: u16) -> Option<Scanner> {
        if !self.hits.contains_key(&addr) {
            self.make_room(now);
            self.order.push_back(addr);
        }
        let window = self.rules.window;
        let ports = self.hits.entry(addr).or_default();
        ports.retain(|(_, at)| now.duration_since(*at) < window);
        match ports.iter_mut().find(|(known, _)| *known == port) {
            Some((_, at)) => *at = now,
            None => ports.push((port, now)),
        }
        let distinct = ports.len() as u32;
        if distinct < self.rules.ports {
            return None;
        }
        self.hits.remove(&addr);
        Some(Scanner {
            addr,
            ports: distinct,
        })
    }

    pub fn tracked(&self) -> usize {
        self.hits.len()
    }

    /// Forgets the oldest tracked addresses to stay within `max_tracked`.
    fn make_room(&mut self, now: Instant) {
        let window = self.rules.window;
        while self.hits.len() >= self.rules.max_tracked {
            let Some(oldest) = self.order.pop_front() else {
                break;
            };
            if let Some(ports) = self.hits.remove(&oldest)
                && ports.iter().any(|(_, at)| now.duration_since(*at) < window)
            {
                self.evicted += 1;
            }
        }
        if self.order.len() > 2 * self.rules.max_tracked.max(1) {
            let hits = &self.hits;
            self.order.retain(|addr| hits.contains_key(addr));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(ports: u32) -> ScanRules {
        ScanRules {
            ports,
            window: Duration::from_secs(10),
            max_tracked: 3,
        }
    }

    fn addr(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    #[test]
    fn distinct_ports_within_the_window_make_a_scanner() {
        let start = Instant::now();
        let mut detector = ScanDetector::new(rules(3));
        assert_eq!(detector.hit(start, addr(1), 22), None);
        assert_eq!(
            detector.hit(start, addr(1), 22),
            None,
            "the same port twice"
        );
        assert_eq!(detector.hit(start, addr(1), 23), None);
        assert_eq!(
            detector.hit(start + Duration::from_secs(9), addr(1), 24),
            Some(Scanner {
                addr: addr(1),
                ports: 3
            })
        );
        assert_eq!(detector.tracked(), 0, "a scanner starts over");
    }

    #[test]
    fn hits_older_than_the_window_do_not_count() {
        let start = Instant::now();
        let mut detector = ScanDetector::new(rules(3));
        detector.hit(start, addr(1), 1);
        detector.hit(start, addr(1), 2);
        assert_eq!(
            detector.hit(start + Duration::from_secs(10), addr(1), 3),
            None
        );
        assert_eq!(
            detector.hit(start + Duration::from_secs(11), addr(1), 4),
            None
        );
        assert!(
            detector
                .hit(start + Duration::from_secs(12), addr(1), 5)
                .is_some()
        );
    }

    #[test]
    fn addresses_are_counted_apart_and_memory_is_bounded() {
        let start = Instant::now();
        let mut detector = ScanDetector::new(rules(2));
        for last in 1..=4 {
            assert_eq!(detector.hit(start, addr(last), 80), None);
        }
        assert_eq!(detector.tracked(), 3);
        assert_eq!(detector.evicted, 1);
        // The evicted first address starts over; the last is still tracked.
        assert_eq!(detector.hit(start, addr(1), 81), None);
        assert!(detector.hit(start, addr(4), 81).is_some());
    }

    #[test]
    fn a_reload_applies_the_new_threshold() {
        let start = Instant::now();
        let mut detector = ScanDetector::new(rules(5));
        detector.hit(start, addr(1), 1);
        detector.set_rules(rules(2));
        assert!(detector.hit(start, addr(1), 2).is_some());
    }
}
