//! Per-service counters kept in the kernel, plus lost-event counts, copied at scrape time.

use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};

use aya::maps::{IterableMap, MapData, PerCpuArray, PerCpuHashMap};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::counter::ConstCounter,
};
use sentinel_common::{LossKind, ServiceCounters};
use tracing::warn;

use crate::{
    cgroup::{Attribution, ServiceTotals},
    kernel::PerCpuBatchReader,
};

/// Picks one count out of a service's totals.
type CountOf = fn(&ServiceTotals) -> u64;

pub struct KernelCounters {
    maps: Mutex<Maps>,
    attribution: Arc<Mutex<Attribution>>,
}

struct Maps {
    counters: PerCpuHashMap<MapData, u64, ServiceCounters>,
    lost: PerCpuArray<MapData, u64>,
    reader: PerCpuBatchReader<u64, ServiceCounters>,
}

impl std::fmt::Debug for KernelCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelCounters")
    }
}

impl KernelCounters {
    pub fn new(
        counters: PerCpuHashMap<MapData, u64, ServiceCounters>,
        lost: PerCpuArray<MapData, u64>,
        attribution: Arc<Mutex<Attribution>>,
    ) -> Result<Self, crate::Error> {
        // Per-CPU maps hold a value for every possible CPU.
        let cpus = aya::util::nr_cpus().map_err(|(_, error)| crate::Error::Io(error))?;
        Ok(Self {
            maps: Mutex::new(Maps {
                counters,
                lost,
                reader: PerCpuBatchReader::new(cpus),
            }),
            attribution,
        })
    }

    /// Current per-service totals. Folds the counts of removed cgroups into their service and
    /// deletes them from the kernel map, which is what keeps that map bounded; also run
    /// periodically so this happens without scrapes.
    pub fn service_totals(&self) -> Vec<ServiceTotals> {
        let mut maps = self.maps.lock().expect("kernel maps lock");
        let Maps {
            counters, reader, ..
        } = &mut *maps;
        let mut per_cgroup: Vec<(u64, ServiceCounters)> = Vec::new();
        let read = reader.read(counters.map().fd().as_fd(), |id, per_cpu| {
            per_cgroup.push((id, summed(per_cpu)));
        });
        if let Err(error) = read {
            warn!(
                "cannot read the kernel's per-service counters in batches, so entry by entry: {error}"
            );
            per_cgroup = counters
                .iter()
                .filter_map(Result::ok)
                .map(|(id, per_cpu)| (id, summed(&per_cpu)))
                .collect();
        }
        let (totals, retired) = self
            .attribution
            .lock()
            .expect("attribution lock")
            .totals(per_cgroup);
        for id in retired {
            if let Err(error) = maps.counters.remove(&id) {
                warn!(id, "could not delete a removed cgroup's counters: {error}");
            }
        }
        totals
    }

    fn lost_events(&self) -> Vec<(LossKind, u64)> {
        let maps = self.maps.lock().expect("kernel maps lock");
        LossKind::ALL
            .iter()
            .map(|&kind| {
                let lost = maps
                    .lost
                    .get(&(kind as u32), 0)
                    .map(|per_cpu| per_cpu.iter().sum())
                    .unwrap_or(0);
                (kind, lost)
            })
            .collect()
    }
}

/// A cgroup's counts over every CPU.
fn summed(per_cpu: &[ServiceCounters]) -> ServiceCounters {
    let mut sum = ServiceCounters::default();
    per_cpu.iter().for_each(|counters| sum.add(counters));
    sum
}

impl Collector for KernelCounters {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut totals = self.service_totals();
        totals.sort_by(|a, b| a.service.cmp(&b.service));
        let families: [(&str, &str, CountOf); 4] = [
            (
                "sentinel_exec",
                "Processes executed (execve), per service",
                |t| t.counters.execs,
            ),
            (
                "sentinel_tcp_connects",
                "Outbound TCP connections started (SYN sent), per service",
                |t| t.counters.tcp_connects,
            ),
            (
                "sentinel_tcp_accepts",
                "Inbound TCP connections established on a listening socket, per service",
                |t| t.counters.tcp_accepts,
            ),
            (
                "sentinel_oom_kills",
                "Processes killed by the kernel's OOM killer, per service of the victim",
                |t| t.oom_kills,
            ),
        ];
        for (name, help, value) in families {
            let counter = ConstCounter::new(0u64);
            let mut family = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            for total in &totals {
                let labels = [("service", total.service.as_str())];
                ConstCounter::new(value(total)).encode(family.encode_family(&labels)?)?;
            }
        }

        let lost = self.lost_events();
        let mut family = encoder.encode_descriptor(
            "sentinel_events_lost",
            "Kernel events that could not be recorded (ring buffer full or counter map full)",
            None,
            ConstCounter::new(0u64).metric_type(),
        )?;
        for (kind, count) in lost {
            let labels = [("kind", kind.label())];
            ConstCounter::new(count).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}
