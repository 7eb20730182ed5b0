//! The `ssh_guard:` section of the configuration file.

use std::{path::PathBuf, time::Duration};

use serde_saphyr::Spanned;

use super::{
    GuardMode, LiveSettings, SshGuardSettings,
    engine::{GuardRules, Weight},
};
use crate::{
    firewall::{FirewallOptions, IpNet, MAX_BAN_TIMEOUT},
    yaml::{Checker, Invalid, Node, absolute_path, format_duration, parse_duration, parse_whole},
};

/// The section's settings, as written in the file.
pub(crate) const SSH_GUARD_KEYS: &[&str] = &[
    "enabled",
    "mode",
    "max_failures",
    "preauth_weight",
    "window",
    "ban_for",
    "multiplier",
    "max_ban",
    "allow",
    "ipv6_prefix",
    "max_tracked",
    "max_banned",
    "flush_on_exit",
    "audit_log",
    "netns",
    "sshd_paths",
];

const EXPECTED_MODE: &str = "enforce or observe";
const EXPECTED_COUNT: &str = "a whole number of at least 1";
const EXPECTED_DURATION: &str = "a duration such as 10m, 4h or 7d, or a number of seconds";
const EXPECTED_MULTIPLIER: &str = "a number of at least 1, such as 2 or 1.5";
const EXPECTED_WEIGHT: &str = "a number from 0 to 1, such as 0.5";
const EXPECTED_PREFIX: &str = "a prefix length from 1 to 128";
const EXPECTED_PATH: &str = "an absolute path";
const EXPECTED_NETWORK: &str =
    "an address or network such as 192.0.2.7, 10.0.0.0/8 or 2001:db8::/32";
const EXPECTED_NETWORKS: &str = "a list of addresses and networks";
const EXPECTED_PATHS: &str = "a list of absolute paths";

// The message in `ban_length` names the firewall's bound; keep them together.
const _: () = assert!(MAX_BAN_TIMEOUT.as_secs() == 36_500 * 86_400);

#[derive(Debug, Clone, PartialEq)]
pub struct SshGuardConfig {
    /// Off: no nftables table is created and nothing is banned.
    pub enabled: bool,
    pub mode: ModeSetting,
    /// Failures from one address within `window` that trigger a ban.
    pub max_failures: u32,
    /// What an SSH connection that ended without authenticating counts toward
    /// `max_failures`, from 0 (nothing) to 1 (as much as a failed password).
    pub preauth_weight: Weight,
    pub window: Duration,
    pub ban_for: Duration,
    /// Each further ban of the same address lasts this many times longer...
    pub multiplier: f64,
    /// ...up to this.
    pub max_ban: Duration,
    /// Addresses and networks never banned; loopback always is.
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
            preauth_weight: Weight(50),
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
    /// The guard's settings; its state is kept in `state_dir`.
    pub fn settings(&self, state_dir: &std::path::Path) -> SshGuardSettings {
        SshGuardSettings {
            mode: match self.mode {
                ModeSetting::Enforce => GuardMode::Enforce,
                ModeSetting::Observe => GuardMode::Observe,
            },
            rules: self.live().rules,
            firewall: FirewallOptions {
                flush_on_exit: self.flush_on_exit,
                netns: self.netns.clone(),
            },
            audit_log: self.audit_log.clone(),
            state_file: state_dir.join("ssh-guard.json"),
        }
    }

    /// The settings a running guard takes on reload.
    pub fn live(&self) -> LiveSettings {
        LiveSettings {
            rules: GuardRules {
                max_failures: self.max_failures,
                preauth_weight: self.preauth_weight,
                window: self.window,
                ban_for: self.ban_for,
                multiplier: self.multiplier,
                max_ban: self.max_ban,
                allow: self.allow.clone(),
                ipv6_prefix_len: self.ipv6_prefix,
                max_tracked: self.max_tracked,
                max_banned: self.max_banned,
            },
            flush_on_exit: self.flush_on_exit,
        }
    }

    /// Every setting read only at start, by its name in the file, and whether `other` sets it
    /// differently. The rest is applied on reload (see [`Self::live`]).
    pub(crate) fn differences(&self, other: &Self) -> Vec<(&'static str, bool)> {
        // Destructured, so that a new setting cannot be left out here.
        let Self {
            enabled,
            mode,
            audit_log,
            netns,
            sshd_paths,
            max_failures: _,
            preauth_weight: _,
            window: _,
            ban_for: _,
            multiplier: _,
            max_ban: _,
            allow: _,
            ipv6_prefix: _,
            max_tracked: _,
            max_banned: _,
            flush_on_exit: _,
        } = self;
        vec![
            ("ssh_guard.enabled", *enabled != other.enabled),
            ("ssh_guard.mode", *mode != other.mode),
            ("ssh_guard.audit_log", *audit_log != other.audit_log),
            ("ssh_guard.netns", *netns != other.netns),
            ("ssh_guard.sshd_paths", *sshd_paths != other.sshd_paths),
        ]
    }
}

impl Checker {
    /// The `ssh_guard` section; every setting is checked even after one has failed.
    pub(crate) fn ssh_guard(&mut self, node: &Spanned<Node>) -> Option<SshGuardConfig> {
        let mut fields = self.section(node, "ssh_guard", SSH_GUARD_KEYS)?;
        let defaults = SshGuardConfig::default();
        let enabled = self.setting(&mut fields, "enabled", defaults.enabled, Self::flag);
        let mode = self.setting(&mut fields, "mode", defaults.mode, |checker, field| {
            checker.value(field, EXPECTED_MODE, parse_mode)
        });
        let max_failures = self.setting(
            &mut fields,
            "max_failures",
            defaults.max_failures,
            |checker, field| checker.value(field, EXPECTED_COUNT, |text| count(text, u32::MAX)),
        );
        let preauth_weight = self.setting(
            &mut fields,
            "preauth_weight",
            defaults.preauth_weight,
            |checker, field| checker.value(field, EXPECTED_WEIGHT, parse_weight),
        );
        let window = self.setting(&mut fields, "window", defaults.window, |checker, field| {
            checker.value(field, EXPECTED_DURATION, |text| {
                match parse_duration(text)? {
                    Duration::ZERO => Err(Invalid::Because("must be longer than 0s")),
                    window => Ok(window),
                }
            })
        });
        let ban_for_field = fields.remove("ban_for");
        let ban_for = match &ban_for_field {
            Some(field) => self.value(field, EXPECTED_DURATION, ban_length),
            None => Some(defaults.ban_for),
        };
        let multiplier = self.setting(
            &mut fields,
            "multiplier",
            defaults.multiplier,
            |checker, field| checker.value(field, EXPECTED_MULTIPLIER, parse_multiplier),
        );
        let max_ban_field = fields.remove("max_ban");
        let max_ban = match &max_ban_field {
            Some(field) => self.value(field, EXPECTED_DURATION, ban_length),
            None => Some(defaults.max_ban),
        };
        if let (Some(ban_for), Some(max_ban)) = (ban_for, max_ban)
            && max_ban < ban_for
        {
            // Reported where the operator wrote the one that is out of line.
            let at = match (&max_ban_field, &ban_for_field) {
                (Some(field), _) | (None, Some(field)) => field.value.referenced,
                (None, None) => node.referenced,
            };
            let (max_ban, ban_for) = (format_duration(max_ban), format_duration(ban_for));
            self.report(
                at,
                format!("max_ban ({max_ban}) must not be shorter than ban_for ({ban_for})"),
            );
        }
        let allow = self.setting(&mut fields, "allow", Vec::new(), |checker, field| {
            checker.list(field, EXPECTED_NETWORKS, EXPECTED_NETWORK, |text| {
                text.parse().map_err(|_| Invalid::Unrecognized)
            })
        });
        let ipv6_prefix = self.setting(
            &mut fields,
            "ipv6_prefix",
            defaults.ipv6_prefix,
            |checker, field| {
                checker.value(field, EXPECTED_PREFIX, |text| {
                    match u8::try_from(parse_whole(text)?) {
                        Ok(prefix @ 1..=128) => Ok(prefix),
                        _ => Err(Invalid::Because("must be between 1 and 128")),
                    }
                })
            },
        );
        let max_tracked = self.setting(
            &mut fields,
            "max_tracked",
            defaults.max_tracked,
            |checker, field| checker.value(field, EXPECTED_COUNT, table_size),
        );
        let max_banned = self.setting(
            &mut fields,
            "max_banned",
            defaults.max_banned,
            |checker, field| checker.value(field, EXPECTED_COUNT, table_size),
        );
        let flush_on_exit = self.setting(
            &mut fields,
            "flush_on_exit",
            defaults.flush_on_exit,
            Self::flag,
        );
        let audit_log = self.setting(
            &mut fields,
            "audit_log",
            defaults.audit_log,
            |checker, field| checker.value(field, EXPECTED_PATH, absolute_path),
        );
        let netns = self.setting(&mut fields, "netns", None, |checker, field| {
            checker.value(field, EXPECTED_PATH, absolute_path).map(Some)
        });
        let sshd_paths = self.setting(
            &mut fields,
            "sshd_paths",
            defaults.sshd_paths,
            |checker, field| checker.list(field, EXPECTED_PATHS, EXPECTED_PATH, absolute_path),
        );
        Some(SshGuardConfig {
            enabled: enabled?,
            mode: mode?,
            max_failures: max_failures?,
            preauth_weight: preauth_weight?,
            window: window?,
            ban_for: ban_for?,
            multiplier: multiplier?,
            max_ban: max_ban?,
            allow: allow?,
            ipv6_prefix: ipv6_prefix?,
            max_tracked: max_tracked?,
            max_banned: max_banned?,
            flush_on_exit: flush_on_exit?,
            audit_log: audit_log?,
            netns: netns?,
            sshd_paths: sshd_paths?,
        })
    }
}

pub(crate) fn parse_mode(text: &str) -> Result<ModeSetting, Invalid> {
    match text {
        "enforce" => Ok(ModeSetting::Enforce),
        "observe" => Ok(ModeSetting::Observe),
        _ => Err(Invalid::Unrecognized),
    }
}

/// A count from 1 to `max`.
fn count<T: TryFrom<u64>>(text: &str, max: T) -> Result<T, Invalid>
where
    u64: From<T>,
{
    match parse_whole(text)? {
        0 => Err(Invalid::Because("must be at least 1")),
        value if value > u64::from(max) => Err(Invalid::Because("is too large")),
        value => T::try_from(value).map_err(|_| Invalid::Because("is too large")),
    }
}

/// The size of a tracking or ban table: at least one entry.
fn table_size(text: &str) -> Result<usize, Invalid> {
    let entries = count(text, u64::MAX)?;
    usize::try_from(entries).map_err(|_| Invalid::Because("is too large"))
}

/// A ban's length: the kernel would refuse zero and lengths beyond the firewall's bound.
fn ban_length(text: &str) -> Result<Duration, Invalid> {
    match parse_duration(text)? {
        Duration::ZERO => Err(Invalid::Because("must be longer than 0s")),
        length if length > MAX_BAN_TIMEOUT => Err(Invalid::Because(
            "must be at most 36500d (100 years), the longest ban the firewall sets",
        )),
        length => Ok(length),
    }
}

/// A weight from 0 to 1, kept in hundredths.
fn parse_weight(text: &str) -> Result<Weight, Invalid> {
    match text.parse::<f64>() {
        Ok(weight) if (0.0..=1.0).contains(&weight) => {
            let hundredths = (weight * 100.0).round();
            if (weight * 100.0 - hundredths).abs() > 1e-6 {
                return Err(Invalid::Because("must have at most two decimal places"));
            }
            Ok(Weight(hundredths as u32))
        }
        Ok(_) => Err(Invalid::Because(
            "must be from 0 (pre-authentication disconnects not counted) to 1 (counted as a \
             failed password)",
        )),
        Err(_) => Err(Invalid::Unrecognized),
    }
}

fn parse_multiplier(text: &str) -> Result<f64, Invalid> {
    match text.parse::<f64>() {
        Ok(multiplier) if multiplier.is_finite() && multiplier >= 1.0 => Ok(multiplier),
        Ok(_) => Err(Invalid::Because(
            "must be at least 1 (1 keeps every ban as long as the first)",
        )),
        Err(_) => Err(Invalid::Unrecognized),
    }
}
