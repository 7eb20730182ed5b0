//! Sentinel's daemon: reads kernel events from its eBPF programs, attributes them to services
//! (cgroups) and serves them as Prometheus metrics.

pub mod cgroup;
mod components;
pub mod config;
pub mod containment;
pub mod control;
pub mod crowdsec;
pub mod daemon;
mod error;
pub mod events;
pub mod files;
pub mod firewall;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod kernel;
pub mod metrics;
pub mod policy;
pub mod port_scan;
pub mod probes;
pub mod queue;
pub mod recent;
pub mod service;
mod slots;
pub mod ssh_guard;
mod state;
pub mod systemd;
pub mod top;
mod yaml;

pub use error::Error;
