//! Service labels for cgroups, with bounded cardinality, and per-service totals that stay
//! monotonic when cgroups come and go.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use hashbrown::hash_map::EntryRef;

use sentinel_common::ServiceCounters;

use super::tree::{CgroupTree, Lookup};

/// Label for services beyond the configured maximum.
pub const OTHER: &str = "other";
/// Label for cgroups whose path could not be found (removed before Sentinel saw them).
pub const UNKNOWN: &str = "unknown";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceTotals {
    pub service: String,
    pub counters: ServiceCounters,
    pub oom_kills: u64,
}

struct Service {
    /// Counts of this service's cgroups that no longer exist.
    retired: ServiceCounters,
    /// Counts of its live cgroups, as of the latest [`Attribution::totals`].
    live: ServiceCounters,
    oom_kills: u64,
    last_live: Instant,
}

impl Service {
    fn new(now: Instant) -> Self {
        Self {
            retired: ServiceCounters::default(),
            live: ServiceCounters::default(),
            oom_kills: 0,
            last_live: now,
        }
    }
}

/// The services that have a label, at most `max` of them named after their cgroup.
struct Services {
    /// hashbrown's map: its hasher is several times faster than std's on the short keys
    /// looked up for every cgroup at each scrape.
    by_label: hashbrown::HashMap<String, Service>,
    /// How many of `by_label` are named after their cgroup (not `other` or `unknown`).
    named: usize,
    max: usize,
}

impl Services {
    /// The label of the service at `path`: its name, or `other` once every named slot is
    /// taken by others.
    fn label<'p>(&self, path: &'p str) -> &'p str {
        let name = service_name(path);
        if is_named(name) && self.named >= self.max && !self.by_label.contains_key(name) {
            OTHER
        } else {
            name
        }
    }

    /// The service labelled `label`, created if new, seen live at `now`.
    fn touch(&mut self, label: &str, now: Instant) -> &mut Service {
        let service = match self.by_label.entry_ref(label) {
            EntryRef::Occupied(entry) => entry.into_mut(),
            EntryRef::Vacant(entry) => {
                if is_named(label) {
                    self.named += 1;
                }
                entry.insert(Service::new(now))
            }
        };
        service.last_live = now;
        service
    }
}

pub struct Attribution {
    tree: CgroupTree,
    /// How long a service whose cgroups are all gone keeps its series, so that scrapes see
    /// its final values before it is dropped.
    retention: Duration,
    services: Services,
    /// When each not-yet-resolvable cgroup id was first seen.
    unresolved_since: HashMap<u64, Instant>,
}

/// `system.slice/nginx.service` for `/system.slice/nginx.service`; `/` for the root.
pub fn service_name(path: &str) -> &str {
    match path.trim_start_matches('/') {
        "" => "/",
        relative => relative,
    }
}

/// Whether a label names its service, rather than standing for many (`other`, `unknown`).
fn is_named(label: &str) -> bool {
    label != OTHER && label != UNKNOWN
}

impl Attribution {
    pub fn new(tree: CgroupTree, max_services: usize, retention: Duration) -> Self {
        Self {
            tree,
            retention,
            services: Services {
                by_label: hashbrown::HashMap::new(),
                named: 0,
                max: max_services,
            },
            unresolved_since: HashMap::new(),
        }
    }

    pub fn tree_mut(&mut self) -> &mut CgroupTree {
        &mut self.tree
    }

    /// The label for a service path, claiming one of the bounded label slots if it is new.
    pub fn label_for_path(&mut self, path: &str) -> String {
        self.label_at(path, Instant::now()).to_owned()
    }

    /// [`Self::label_for_path`] with its service seen live at `now`, without a copy: for
    /// thousands of paths labelled at once.
    pub fn label_at<'p>(&mut self, path: &'p str, now: Instant) -> &'p str {
        let label = self.services.label(path);
        self.services.touch(label, now);
        label
    }

    /// The path of a cgroup id, if known (live or recently removed).
    pub fn path_of(&mut self, id: u64) -> Option<String> {
        match self.tree.lookup(id) {
            Lookup::Live(path) | Lookup::Removed(path) => Some(path.to_string()),
            Lookup::Unknown { .. } => None,
        }
    }

    /// The label of a cgroup id, for logs and user-space counters.
    pub fn label_for_id(&mut self, id: u64) -> String {
        let path = self.path_of(id);
        self.label_for_path(path.as_deref().unwrap_or(UNKNOWN))
    }

    pub fn record_oom_kill(&mut self, label: &str) {
        if let Some(service) = self.services.by_label.get_mut(label) {
            service.oom_kills += 1;
        }
    }

    /// Merges the kernel's per-cgroup counters into per-service totals. Returns the totals
    /// and the cgroup ids whose counts were retired here and must now be deleted from the
    /// kernel map (their cgroup is gone; deleting keeps the map from filling up).
    pub fn totals(
        &mut self,
        per_cgroup: impl IntoIterator<Item = (u64, ServiceCounters)>,
    ) -> (Vec<ServiceTotals>, Vec<u64>) {
        let now = Instant::now();
        let Self {
            tree,
            retention,
            services,
            unresolved_since,
        } = self;
        for service in services.by_label.values_mut() {
            service.live = ServiceCounters::default();
        }
        let mut retired_ids = Vec::new();
        for (id, counters) in per_cgroup {
            let (path, is_live) = match tree.lookup(id) {
                Lookup::Live(path) => (path, true),
                Lookup::Removed(path) => (path, false),
                Lookup::Unknown { last_scan } => {
                    let first_seen = *unresolved_since.entry(id).or_insert(now);
                    // Only give up on an id once a scan made after we first saw it missed it
                    // too; until then its mkdir event may simply not have arrived yet.
                    if last_scan.is_none_or(|scan| scan < first_seen) {
                        continue;
                    }
                    (UNKNOWN, false)
                }
            };
            if !unresolved_since.is_empty() {
                unresolved_since.remove(&id);
            }
            let service = services.touch(services.label(path), now);
            if is_live {
                service.live.add(&counters);
            } else {
                service.retired.add(&counters);
                retired_ids.push(id);
            }
        }
        // A service touched now is kept: its cgroups are live, or were just retired.
        services
            .by_label
            .retain(|_, service| now.duration_since(service.last_live) < *retention);
        services.named = services
            .by_label
            .keys()
            .filter(|label| is_named(label))
            .count();
        let totals = services
            .by_label
            .iter()
            .map(|(label, service)| {
                let mut counters = service.retired;
                counters.add(&service.live);
                ServiceTotals {
                    service: label.clone(),
                    counters,
                    oom_kills: service.oom_kills,
                }
            })
            .collect();
        (totals, retired_ids)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    fn attribution(max: usize) -> Attribution {
        let mut tree = CgroupTree::new(PathBuf::from("/nonexistent"));
        tree.rescan();
        Attribution::new(tree, max, Duration::from_secs(600))
    }

    fn execs(n: u64) -> ServiceCounters {
        ServiceCounters {
            execs: n,
            ..Default::default()
        }
    }

    fn total_for<'a>(totals: &'a [ServiceTotals], service: &str) -> Option<&'a ServiceTotals> {
        totals.iter().find(|t| t.service == service)
    }

    #[test]
    fn names_services_relative_to_the_root() {
        assert_eq!(service_name("/"), "/");
        assert_eq!(
            service_name("/system.slice/nginx.service"),
            "system.slice/nginx.service"
        );
    }

    #[test]
    fn totals_stay_monotonic_when_a_cgroup_is_removed() {
        let mut a = attribution(10);
        a.tree_mut().created(1, "/svc".into());
        let (totals, retired) = a.totals([(1, execs(3))]);
        assert_eq!(total_for(&totals, "svc").unwrap().counters.execs, 3);
        assert!(retired.is_empty());

        a.tree_mut().removed(1);
        let (totals, retired) = a.totals([(1, execs(4))]);
        assert_eq!(retired, vec![1]);
        assert_eq!(total_for(&totals, "svc").unwrap().counters.execs, 4);

        // The same path created again gets a new id; counts add up.
        a.tree_mut().created(2, "/svc".into());
        let (totals, _) = a.totals([(2, execs(5))]);
        assert_eq!(total_for(&totals, "svc").unwrap().counters.execs, 9);
    }

    #[test]
    fn labels_beyond_the_maximum_become_other() {
        let mut a = attribution(2);
        for (id, path) in [(1, "/a"), (2, "/b"), (3, "/c"), (4, "/d")] {
            a.tree_mut().created(id, path.into());
        }
        let (totals, _) = a.totals([(1, execs(1)), (2, execs(1)), (3, execs(1)), (4, execs(1))]);
        let real: Vec<_> = totals.iter().filter(|t| t.service != OTHER).collect();
        assert_eq!(real.len(), 2);
        assert_eq!(total_for(&totals, OTHER).unwrap().counters.execs, 2);
    }

    #[test]
    fn unknown_ids_wait_for_a_fresh_scan() {
        let mut a = attribution(10);
        // The scan in `attribution()` predates this id: keep its counts in the kernel map.
        let (totals, retired) = a.totals([(99, execs(1))]);
        assert!(retired.is_empty());
        assert!(total_for(&totals, UNKNOWN).is_none());
    }

    #[test]
    fn oom_kills_are_counted_per_service() {
        let mut a = attribution(10);
        a.tree_mut().created(5, "/job".into());
        let label = a.label_for_id(5);
        a.record_oom_kill(&label);
        let (totals, _) = a.totals([]);
        assert_eq!(total_for(&totals, "job").unwrap().oom_kills, 1);
    }
}
