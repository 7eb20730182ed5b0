//! The `ssh_guard:` section of the configuration file.

use std::{path::PathBuf, time::Duration};

use serde::{Deserialize, Deserializer};

use super::{GuardMode, SshGuardSettings, engine::GuardRules};
use crate::{
    firewall::{FirewallOptions, IpNet},
    policy::parse_duration_setting,
};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SshGuardConfig {
    /// Off: no nftables table is created and nothing is banned.
    pub enabled: bool,
    pub mode: ModeSetting,
    /// Failures from one address within `window` that trigger a ban.
    pub max_failures: u32,
    #[serde(deserialize_with = "duration")]
    pub window: Duration,
    #[serde(deserialize_with = "duration")]
    pub ban_for: Duration,
    /// Each further ban of the same address lasts this many times longer...
    pub multiplier: f64,
    /// ...up to this.
    #[serde(deserialize_with = "duration")]
    pub max_ban: Duration,
    /// Addresses and networks never banned; loopback always is.
    #[serde(deserialize_with = "networks")]
    pub allow: Vec<IpNet>,
    /// IPv6 offenders are counted and banned per prefix of this length.
    pub ipv6_prefix: u8,
    pub max_tracked: usize,
    pub max_banned: usize,
    /// Remove every ban when the daemon stops (by default they stay until they expire).
    pub flush_on_exit: bool,
    pub audit_log: PathBuf,
    /// Manage the firewall of this network namespace (`/run/netns/NAME`) instead of the
    /// daemon's own.
    pub netns: Option<PathBuf>,
    /// The sshd executables whose authentications count; a process merely named sshd does not.
    pub sshd_paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModeSetting {
    Enforce,
    Observe,
}

impl Default for SshGuardConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: ModeSetting::Enforce,
            max_failures: 5,
            window: Duration::from_secs(600),
            ban_for: Duration::from_secs(600),
            multiplier: 2.0,
            max_ban: Duration::from_secs(7 * 86_400),
            allow: Vec::new(),
            ipv6_prefix: 64,
            max_tracked: 100_000,
            max_banned: 100_000,
            flush_on_exit: false,
            audit_log: PathBuf::from("/var/log/sentinel/audit.log"),
            netns: None,
            sshd_paths: crate::probes::DEFAULT_SSHD_PATHS
                .iter()
                .map(PathBuf::from)
                .collect(),
        }
    }
}

impl SshGuardConfig {
    /// Problems serde cannot see: values that parse but make no sense.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        if self.max_failures == 0 {
            problems.push("ssh_guard.max_failures must be at least 1".to_string());
        }
        if self.ban_for.is_zero() {
            problems.push("ssh_guard.ban_for must be longer than 0s".to_string());
        }
        if self.max_ban < self.ban_for {
            problems.push("ssh_guard.max_ban must not be shorter than ban_for".to_string());
        }
        if !(self.multiplier >= 1.0 && self.multiplier.is_finite()) {
            problems.push("ssh_guard.multiplier must be a number of at least 1".to_string());
        }
        if !(1..=128).contains(&self.ipv6_prefix) {
            problems.push("ssh_guard.ipv6_prefix must be between 1 and 128".to_string());
        }
        if self.max_tracked == 0 || self.max_banned == 0 {
            problems.push("ssh_guard.max_tracked and max_banned must be at least 1".to_string());
        }
        problems
    }

    /// The guard's settings; its state is kept in `state_dir`.
    pub fn settings(&self, state_dir: &std::path::Path) -> SshGuardSettings {
        SshGuardSettings {
            mode: match self.mode {
                ModeSetting::Enforce => GuardMode::Enforce,
                ModeSetting::Observe => GuardMode::Observe,
            },
            rules: GuardRules {
                max_failures: self.max_failures,
                window: self.window,
                ban_for: self.ban_for,
                multiplier: self.multiplier,
                max_ban: self.max_ban,
                allow: self.allow.clone(),
                ipv6_prefix_len: self.ipv6_prefix,
                max_tracked: self.max_tracked,
                max_banned: self.max_banned,
            },
            firewall: FirewallOptions {
                flush_on_exit: self.flush_on_exit,
                netns: self.netns.clone(),
            },
            audit_log: self.audit_log.clone(),
            state_file: state_dir.join("ssh-guard.json"),
        }
    }
}

fn duration<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(deserializer)?;
    parse_duration_setting(&text).map_err(serde::de::Error::custom)
}

fn networks<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<IpNet>, D::Error> {
    Vec::<String>::deserialize(deserializer)?
        .iter()
        .map(|text| {
            text.parse().map_err(|_| {
                serde::de::Error::custom(format!(
                    "{text:?} is not an address or network (like 192.0.2.7, 10.0.0.0/8, 2001:db8::/32)"
                ))
            })
        })
        .collect()
}
