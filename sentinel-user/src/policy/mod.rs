//! Per-service cgroup v2 limits: the `policies` section of the configuration file, its typed
//! model, its checks and its enforcement.
//!
//! ```yaml
//! policies:
//!   - name: web
//!     unit: nginx.service             # and/or cgroup: system.slice/nginx.service
//!     memory.max: 1G                  # or nested: memory: {max: 1G, high: 800M}
//!     memory.high: 800M
//!     cpu.max: 150%                   # 1.5 CPUs; cpu.max: 1.5 is the same
//!     terminate_above: 900M           # SIGTERM the largest process after 10 s above 900M,
//!     for: 10s                        # SIGKILL it 3 s (grace) later
//! ```
//!
//! `deploy/sentinel.yaml` documents every setting; `deploy/sentinel.schema.json` lets editors
//! complete them.

mod drift;
pub mod enforcer;
mod glob;
pub mod metrics;
mod model;
pub mod resources;
mod units;
mod validate;

#[cfg(test)]
mod tests;

pub(crate) use units::parse_duration_setting;
#[cfg(test)]
pub(crate) use validate::{NESTED_GROUPS, POLICY_KEYS};

pub use glob::CgroupGlob;
pub use model::{
    CpuQuota, DEFAULT_GRACE, ExecContainment, GracefulStop, Limit, Limits, Mode, OnViolation,
    Policy, ServicePolicy, Target,
};
