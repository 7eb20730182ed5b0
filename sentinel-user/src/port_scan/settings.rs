//! The `port_scan:` section of the configuration file.

use std::time::Duration;

use serde_saphyr::Spanned;

use super::detector::ScanRules;
use crate::{
    ssh_guard::{
        GuardMode,
        settings::{ModeSetting, parse_mode},
    },
    yaml::{Checker, Invalid, Node, parse_duration, parse_whole},
};

/// The section's settings, as written in the file.
pub(crate) const PORT_SCAN_KEYS: &[&str] = &["mode", "ports", "window"];

const EXPECTED_MODE: &str = "enforce or observe";
const EXPECTED_PORTS: &str = "a whole number from 2 to 1000";
const EXPECTED_WINDOW: &str = "a duration from 1s to 1h, such as 10s";

/// Fewer than two ports would call a single mistyped connection a scan.
const MIN_PORTS: u64 = 2;
/// Each tracked address keeps fewer than `ports` ports: this bounds the memory per address.
const MAX_PORTS: u64 = 1000;
const MIN_WINDOW: Duration = Duration::from_secs(1);
const MAX_WINDOW: Duration = Duration::from_secs(3600);
/// Addresses tracked at once.
const MAX_TRACKED: usize = 10_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortScanConfig {
    pub mode: ModeSetting,
    /// Distinct closed ports within `window` that make an address a scanner.
    pub ports: u32,
    pub window: Duration,
}

impl Default for PortScanConfig {
    fn default() -> Self {
        Self {
            mode: ModeSetting::Enforce,
            ports: 20,
            window: Duration::from_secs(10),
        }
    }
}

impl PortScanConfig {
    pub fn mode(&self) -> GuardMode {
        match self.mode {
            ModeSetting::Enforce => GuardMode::Enforce,
            ModeSetting::Observe => GuardMode::Observe,
        }
    }

    pub fn rules(&self) -> ScanRules {
        ScanRules {
            ports: self.ports,
            window: self.window,
            max_tracked: MAX_TRACKED,
        }
    }
}

/// `port_scan` itself is read at start (its kernel program is attached then or not at all);
/// its settings apply on reload.
pub(crate) fn differences(
    running: Option<&PortScanConfig>,
    new: Option<&PortScanConfig>,
) -> Vec<(&'static str, bool)> {
    vec![("port_scan", running.is_some() != new.is_some())]
}

impl Checker {
    /// The `port_scan` section; every setting is checked even after one has failed.
    pub(crate) fn port_scan(&mut self, node: &Spanned<Node>) -> Option<PortScanConfig> {
        let mut fields = self.section(node, "port_scan", PORT_SCAN_KEYS)?;
        let defaults = PortScanConfig::default();
        let mode = self.setting(&mut fields, "mode", defaults.mode, |checker, field| {
            checker.value(field, EXPECTED_MODE, parse_mode)
        });
        let ports = self.setting(&mut fields, "ports", defaults.ports, |checker, field| {
            checker.value(field, EXPECTED_PORTS, |text| match parse_whole(text)? {
                ports if ports < MIN_PORTS => Err(Invalid::Because("must be at least 2")),
                ports if ports > MAX_PORTS => Err(Invalid::Because("must be at most 1000")),
                ports => Ok(ports as u32),
            })
        });
        let window = self.setting(&mut fields, "window", defaults.window, |checker, field| {
            checker.value(field, EXPECTED_WINDOW, |text| match parse_duration(text)? {
                window if window < MIN_WINDOW => Err(Invalid::Because("must be at least 1s")),
                window if window > MAX_WINDOW => Err(Invalid::Because("must be at most 1h")),
                window => Ok(window),
            })
        });
        Some(PortScanConfig {
            mode: mode?,
            ports: ports?,
            window: window?,
        })
    }
}
