//! A policy's limits as systemd unit properties (what `systemctl set-property` sets), and the
//! cgroup files systemd writes from them.

use serde::{Deserialize, Serialize};

use crate::policy::{CpuQuota, Limit, Limits};

/// systemd's `infinity` on the bus: no limit.
pub const INFINITY: u64 = u64::MAX;

const MICROS_PER_SECOND: u64 = 1_000_000;
/// systemd keeps `CPUQuota=` in its drop-in as a whole percentage: anything finer would come
/// back different after a daemon-reload, and be taken for drift.
const MICROS_PER_SECOND_PER_PERCENT: u64 = MICROS_PER_SECOND / 100;

/// The unit properties Sentinel sets, one per cgroup interface file; saved by their bus names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum UnitProperty {
    MemoryMax,
    MemoryHigh,
    #[serde(rename = "CPUQuotaPerSecUSec")]
    CpuQuota,
    #[serde(rename = "CPUWeight")]
    CpuWeight,
    TasksMax,
}

impl UnitProperty {
    /// The property's name on the bus and in `systemctl show`.
    pub fn bus_name(self) -> &'static str {
        match self {
            Self::MemoryMax => "MemoryMax",
            Self::MemoryHigh => "MemoryHigh",
            Self::CpuQuota => "CPUQuotaPerSecUSec",
            Self::CpuWeight => "CPUWeight",
            Self::TasksMax => "TasksMax",
        }
    }

    /// The runtime drop-in systemd writes for it: `50-<setting>.conf`.
    pub fn drop_in(self) -> &'static str {
        match self {
            Self::MemoryMax => "50-MemoryMax.conf",
            Self::MemoryHigh => "50-MemoryHigh.conf",
            Self::CpuQuota => "50-CPUQuota.conf",
            Self::CpuWeight => "50-CPUWeight.conf",
            Self::TasksMax => "50-TasksMax.conf",
        }
    }
}

/// The properties for `limits`, in the order of [`Limits::to_cgroup_files`]; values as the bus
/// carries them (bytes, µs of CPU per second, a weight, a count; [`INFINITY`] for `max`).
pub fn unit_properties(limits: &Limits) -> Vec<(UnitProperty, u64)> {
    fn value<T: Into<u64>>(limit: Limit<T>) -> u64 {
        match limit {
            Limit::Unlimited => INFINITY,
            Limit::Limited(value) => value.into(),
        }
    }
    let mut properties = Vec::new();
    if let Some(limit) = limits.memory_max {
        properties.push((UnitProperty::MemoryMax, value(limit)));
    }
    if let Some(limit) = limits.memory_high {
        properties.push((UnitProperty::MemoryHigh, value(limit)));
    }
    if let Some(limit) = limits.cpu_max {
        let per_second = match limit {
            Limit::Unlimited => INFINITY,
            Limit::Limited(quota) => cpu_quota_per_second(quota),
        };
        properties.push((UnitProperty::CpuQuota, per_second));
    }
    if let Some(weight) = limits.cpu_weight {
        properties.push((UnitProperty::CpuWeight, weight.into()));
    }
    if let Some(limit) = limits.pids_max {
        properties.push((UnitProperty::TasksMax, value(limit)));
    }
    properties
}

/// µs of CPU per second, rounded down to a whole percent of a CPU (at least 1%, the policy's
/// floor).
fn cpu_quota_per_second(quota: CpuQuota) -> u64 {
    let per_second = quota.micros * (MICROS_PER_SECOND / CpuQuota::PERIOD_MICROS);
    (per_second - per_second % MICROS_PER_SECOND_PER_PERCENT).max(MICROS_PER_SECOND_PER_PERCENT)
}

/// The interface files systemd writes for `properties`, as the kernel reads them back: memory
/// in whole pages of `page_size`, `cpu.max` with systemd's default period (the kernel's).
pub fn cgroup_files(
    properties: &[(UnitProperty, u64)],
    page_size: u64,
) -> Vec<(&'static str, String)> {
    let count = |value: u64| match value {
        INFINITY => "max".to_string(),
        value => value.to_string(),
    };
    let bytes = |value: u64| match value {
        INFINITY => "max".to_string(),
        value => (value - value % page_size).to_string(),
    };
    let period = CpuQuota::PERIOD_MICROS;
    properties
        .iter()
        .map(|&(property, value)| match property {
            UnitProperty::MemoryMax => ("memory.max", bytes(value)),
            UnitProperty::MemoryHigh => ("memory.high", bytes(value)),
            UnitProperty::CpuQuota => {
                let quota = match value {
                    INFINITY => "max".to_string(),
                    per_second => (per_second * period / MICROS_PER_SECOND).to_string(),
                };
                ("cpu.max", format!("{quota} {period}"))
            }
            UnitProperty::CpuWeight => ("cpu.weight", value.to_string()),
            UnitProperty::TasksMax => ("pids.max", count(value)),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAGE: u64 = 4096;

    fn limits() -> Limits {
        Limits {
            memory_max: Some(Limit::Limited(512 << 20)),
            memory_high: Some(Limit::Limited(400 << 20)),
            cpu_max: Some(Limit::Limited(CpuQuota { micros: 150_000 })),
            cpu_weight: Some(200),
            pids_max: Some(Limit::Limited(64)),
        }
    }

    #[test]
    fn limits_become_the_properties_set_property_takes() {
        assert_eq!(
            unit_properties(&limits()),
            [
                (UnitProperty::MemoryMax, 512 << 20),
                (UnitProperty::MemoryHigh, 400 << 20),
                (UnitProperty::CpuQuota, 1_500_000),
                (UnitProperty::CpuWeight, 200),
                (UnitProperty::TasksMax, 64),
            ]
        );
        assert!(unit_properties(&Limits::default()).is_empty());
    }

    #[test]
    fn max_is_infinity() {
        let limits = Limits {
            memory_max: Some(Limit::Unlimited),
            memory_high: Some(Limit::Unlimited),
            cpu_max: Some(Limit::Unlimited),
            cpu_weight: None,
            pids_max: Some(Limit::Unlimited),
        };
        let properties = unit_properties(&limits);
        assert_eq!(
            properties,
            [
                (UnitProperty::MemoryMax, u64::MAX),
                (UnitProperty::MemoryHigh, u64::MAX),
                (UnitProperty::CpuQuota, u64::MAX),
                (UnitProperty::TasksMax, u64::MAX),
            ]
        );
        assert_eq!(
            cgroup_files(&properties, PAGE),
            [
                ("memory.max", "max".to_string()),
                ("memory.high", "max".into()),
                ("cpu.max", "max 100000".into()),
                ("pids.max", "max".into()),
            ]
        );
    }

    #[test]
    fn cpu_quota_is_microseconds_per_second_in_whole_percents() {
        let per_second = |micros| cpu_quota_per_second(CpuQuota { micros });
        // 150% of a CPU: 150 ms per 100 ms period, 1.5 s per second.
        assert_eq!(per_second(150_000), 1_500_000);
        assert_eq!(per_second(1_000), 10_000);
        // 12.5% is kept by systemd as CPUQuota=12%.
        assert_eq!(per_second(12_500), 120_000);
        assert_eq!(per_second(33_333), 330_000);
    }

    #[test]
    fn cgroup_files_are_what_systemd_writes_and_the_kernel_reads_back() {
        assert_eq!(
            cgroup_files(&unit_properties(&limits()), PAGE),
            [
                ("memory.max", "536870912".to_string()),
                ("memory.high", "419430400".into()),
                ("cpu.max", "150000 100000".into()),
                ("cpu.weight", "200".into()),
                ("pids.max", "64".into()),
            ]
        );
        // The kernel keeps memory limits in whole pages.
        let odd = [(UnitProperty::MemoryMax, (1 << 20) + 1000)];
        assert_eq!(
            cgroup_files(&odd, PAGE),
            [("memory.max", "1048576".to_string())]
        );
        // 1% of a CPU: 1 ms per 100 ms period.
        let low = [(UnitProperty::CpuQuota, 10_000)];
        assert_eq!(
            cgroup_files(&low, PAGE),
            [("cpu.max", "1000 100000".to_string())]
        );
    }

    #[test]
    fn properties_name_their_drop_ins() {
        for property in [
            UnitProperty::MemoryMax,
            UnitProperty::MemoryHigh,
            UnitProperty::CpuQuota,
            UnitProperty::CpuWeight,
            UnitProperty::TasksMax,
        ] {
            // Saved under the bus name.
            let saved = serde_json::to_string(&property).unwrap();
            assert_eq!(saved, format!("\"{}\"", property.bus_name()));
            assert_eq!(
                serde_json::from_str::<UnitProperty>(&saved).unwrap(),
                property
            );
            assert!(property.drop_in().starts_with("50-") && property.drop_in().ends_with(".conf"));
        }
        // systemd names the quota's drop-in after the setting, not the bus property.
        assert_eq!(UnitProperty::CpuQuota.drop_in(), "50-CPUQuota.conf");
    }
}
