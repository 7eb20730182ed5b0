//! The typed policy: what the enforcement code reads once a file has passed validation.

use std::{path::PathBuf, sync::Arc, time::Duration};

use super::glob::{self, CgroupGlob};

/// Grace between SIGTERM and SIGKILL when a policy does not set `grace`.
pub const DEFAULT_GRACE: Duration = Duration::from_secs(3);

/// The `policies` section: one entry per service.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub services: Vec<Arc<ServicePolicy>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServicePolicy {
    /// Unique within the file; names the service in logs and reports.
    pub name: String,
    pub target: Target,
    pub mode: Mode,
    pub limits: Limits,
    pub graceful_stop: Option<GracefulStop>,
    pub containment: Option<ExecContainment>,
}

/// `exec.allow` and `on_violation`: the executables a service may run, and what happens when
/// it runs anything else.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecContainment {
    /// Absolute paths, never empty. Symlinks are followed: the file they lead to is allowed.
    pub allow: Vec<PathBuf>,
    pub on_violation: OnViolation,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OnViolation {
    /// Log, audit and count; nothing else.
    #[default]
    Alert,
    /// The kernel kills the process before its first instruction.
    Kill,
    /// The whole service is frozen for inspection.
    Freeze,
    /// The service's network traffic is dropped, except loopback.
    Isolate,
}

impl OnViolation {
    /// As written in the file, and as the `action` label of the containment metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Alert => "alert",
            Self::Kill => "kill",
            Self::Freeze => "freeze",
            Self::Isolate => "isolate",
        }
    }
}

/// Which cgroups a policy applies to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Cgroup(CgroupGlob),
    /// A systemd unit: the cgroup whose last path segment is the unit's name, or matches it
    /// when it has `*` or `?` (`php*-fpm.service`).
    Unit(String),
    /// Both must match.
    CgroupAndUnit {
        cgroup: CgroupGlob,
        unit: String,
    },
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// Write the limits and stop processes as configured.
    #[default]
    Enforce,
    /// Change nothing; report what enforcing would do.
    Observe,
}

/// cgroup v2 limits; `None` leaves the kernel's current value alone.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Bytes.
    pub memory_max: Option<Limit<u64>>,
    /// Bytes; never above `memory_max`.
    pub memory_high: Option<Limit<u64>>,
    pub cpu_max: Option<Limit<CpuQuota>>,
    /// 1 to 10000.
    pub cpu_weight: Option<u16>,
    /// At most 4194304, the kernel's limit.
    pub pids_max: Option<Limit<u32>>,
}

/// A limit, or `max`: explicitly none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit<T> {
    Unlimited,
    Limited(T),
}

/// CPU time per [`CpuQuota::PERIOD_MICROS`]: 150000 is 1.5 CPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuQuota {
    pub micros: u64,
}

/// Stop a service gracefully before the kernel's OOM killer picks a victim: once its memory
/// has stayed above `terminate_above` for `sustained_for`, SIGTERM its largest process, then
/// SIGKILL it after `grace`. In the file, `for` defaults to zero (act on the first reading
/// above) and `grace` to [`DEFAULT_GRACE`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GracefulStop {
    /// Bytes; below `memory.max` when that is set.
    pub terminate_above: u64,
    pub sustained_for: Duration,
    pub grace: Duration,
}

impl CpuQuota {
    /// The period Sentinel writes to `cpu.max`, the kernel's default.
    pub const PERIOD_MICROS: u64 = 100_000;
}

impl Target {
    /// Whether the cgroup at `cgroup_path` (relative to the cgroup2 root; a leading `/`, as in
    /// [`CgroupTree`](crate::cgroup::CgroupTree) paths, is ignored) falls under this policy.
    pub fn matches(&self, cgroup_path: &str) -> bool {
        match self {
            Self::Cgroup(glob) => glob.matches(cgroup_path),
            Self::Unit(unit) => is_unit_cgroup(cgroup_path, unit),
            Self::CgroupAndUnit { cgroup, unit } => {
                cgroup.matches(cgroup_path) && is_unit_cgroup(cgroup_path, unit)
            }
        }
    }
}

/// systemd names a unit's cgroup after the unit: `…/nginx.service`.
fn is_unit_cgroup(cgroup_path: &str, unit: &str) -> bool {
    cgroup_path
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .is_some_and(|name| glob::name_matches(unit, name))
}

/// Every interface file a policy writes, in the order `to_cgroup_files` lists them.
pub const INTERFACE_FILES: [&str; 5] = [
    "memory.max",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
];

impl Limits {
    /// The cgroup interface files to write and their contents, in a fixed order. Holds only
    /// the limits that are set; the caller decides whether `Mode::Observe` writes them.
    pub fn to_cgroup_files(&self) -> Vec<(&'static str, String)> {
        fn cgroup_value<T: ToString>(limit: Limit<T>) -> String {
            match limit {
                Limit::Unlimited => "max".into(),
                Limit::Limited(value) => value.to_string(),
            }
        }
        let period = CpuQuota::PERIOD_MICROS;
        let mut files = Vec::new();
        if let Some(limit) = self.memory_max {
            files.push(("memory.max", cgroup_value(limit)));
        }
        if let Some(limit) = self.memory_high {
            files.push(("memory.high", cgroup_value(limit)));
        }
        if let Some(limit) = self.cpu_max {
            let quota = match limit {
                Limit::Unlimited => "max".into(),
                Limit::Limited(quota) => quota.micros.to_string(),
            };
            files.push(("cpu.max", format!("{quota} {period}")));
        }
        if let Some(weight) = self.cpu_weight {
            files.push(("cpu.weight", weight.to_string()));
        }
        if let Some(limit) = self.pids_max {
            files.push(("pids.max", cgroup_value(limit)));
        }
        files
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn glob(pattern: &str) -> CgroupGlob {
        CgroupGlob::new(pattern).unwrap()
    }

    #[test]
    fn units_match_the_last_path_segment() {
        let target = Target::Unit("nginx.service".into());
        assert!(target.matches("system.slice/nginx.service"));
        assert!(target.matches("/system.slice/nginx.service"));
        assert!(!target.matches("system.slice/nginx.service/worker"));
        assert!(!target.matches("system.slice/nginx.service.d"));
        assert!(!target.matches("/"));
    }

    #[test]
    fn unit_patterns_match_one_name() {
        let target = Target::Unit("php*-fpm.service".into());
        assert!(target.matches("system.slice/php8.2-fpm.service"));
        assert!(target.matches("system.slice/php-fpm.service"));
        assert!(!target.matches("system.slice/php8.2-fpm.service/pool"));
        assert!(!target.matches("system.slice/php8.2-fpm.socket"));
        assert!(!target.matches("php.slice/other.service"));
        let one = Target::Unit("worker-?.service".into());
        assert!(one.matches("system.slice/worker-a.service"));
        assert!(!one.matches("system.slice/worker-ab.service"));
    }

    #[test]
    fn cgroup_and_unit_must_both_match() {
        let target = Target::CgroupAndUnit {
            cgroup: glob("system.slice/*"),
            unit: "nginx.service".into(),
        };
        assert!(target.matches("system.slice/nginx.service"));
        assert!(!target.matches("user.slice/nginx.service"));
        assert!(!target.matches("system.slice/sshd.service"));
    }

    #[test]
    fn cgroup_files_in_a_fixed_order() {
        let limits = Limits {
            memory_max: Some(Limit::Limited(512 << 20)),
            memory_high: Some(Limit::Unlimited),
            cpu_max: Some(Limit::Limited(CpuQuota { micros: 150_000 })),
            cpu_weight: Some(200),
            pids_max: Some(Limit::Limited(256)),
        };
        assert_eq!(
            limits.to_cgroup_files(),
            [
                ("memory.max", "536870912".to_string()),
                ("memory.high", "max".into()),
                ("cpu.max", "150000 100000".into()),
                ("cpu.weight", "200".into()),
                ("pids.max", "256".into()),
            ]
        );
    }

    #[test]
    fn unlimited_cpu_keeps_the_period() {
        let limits = Limits {
            cpu_max: Some(Limit::Unlimited),
            ..Limits::default()
        };
        assert_eq!(limits.to_cgroup_files(), [("cpu.max", "max 100000".into())]);
        assert!(Limits::default().to_cgroup_files().is_empty());
    }
}
