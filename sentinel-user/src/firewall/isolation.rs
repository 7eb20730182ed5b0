//! Isolation of contained services: their packets are dropped, except on loopback, by rules
//! matching the service's cgroup (`socket cgroupv2`). The rules live in a table of their own,
//! `table inet sentinel_containment`, so that the ban table's repair (which recreates
//! `inet sentinel` when its shape changes) never lifts an isolation, and an isolation does not
//! depend on the SSH guard running:
//!
//! ```text
//! table inet sentinel_containment {
//!     chain output {
//!         type filter hook output priority -10; policy accept;
//!         oif != "lo" socket cgroupv2 level 2 "system.slice/web.service" counter drop comment "system.slice/web.service"
//!     }
//!     chain input {
//!         type filter hook input priority -10; policy accept;
//!         iif != "lo" socket cgroupv2 level 2 "system.slice/web.service" counter drop comment "system.slice/web.service"
//!     }
//! }
//! ```
//!
//! Each rule's comment names the service, so that isolations survive a restart of the daemon
//! and are found again at start.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
};

use super::{netns::NetNamespace, nft::Nft};
use crate::Error;

pub(crate) const ISOLATION_TABLE: &str = "sentinel_containment";

/// nft names a cgroup by its path under this directory, whatever the cgroup2 mount.
const NFT_CGROUP_BASE: &str = "/sys/fs/cgroup";

const CHAINS: [(&str, &str, &str); 2] = [("output", "output", "oif"), ("input", "input", "iif")];

#[derive(Debug)]
pub struct Isolation {
    nft: Nft,
    /// The cgroup2 mount, relative to [`NFT_CGROUP_BASE`] (`unified` on hybrid hosts).
    cgroup2_under_base: PathBuf,
}

impl Isolation {
    /// Makes sure the table exists (keeping the isolations in it) in the namespace `netns`
    /// (the daemon's own when `None`); `cgroup2` is the cgroup2 mount.
    pub fn open(netns: Option<&Path>, cgroup2: &Path) -> Result<Self, Error> {
        let cgroup2_under_base = cgroup2
            .strip_prefix(NFT_CGROUP_BASE)
            .map_err(|_| Error::IsolationUnavailable {
                cgroup2: cgroup2.to_path_buf(),
            })?
            .to_path_buf();
        let netns = netns.map(NetNamespace::open).transpose()?;
        let isolation = Self {
            nft: Nft::new(netns),
            cgroup2_under_base,
        };
        let mut script = format!("add table inet {ISOLATION_TABLE}\n");
        for (chain, hook, _) in CHAINS {
            script.push_str(&format!(
                "add chain inet {ISOLATION_TABLE} {chain} {{ type filter hook {hook} priority \
                 -10; policy accept; }}\n"
            ));
        }
        isolation.nft.run_script(&script)?;
        Ok(isolation)
    }

    /// The services isolated now, by the comments of the table's rules.
    pub fn isolated(&self) -> Result<BTreeSet<String>, Error> {
        let rules = self.nft.rules(ISOLATION_TABLE)?.unwrap_or_default();
        Ok(rules.into_iter().filter_map(|rule| rule.comment).collect())
    }

    /// Drops every packet of `service` (a cgroup path relative to the cgroup2 root) that does
    /// not go through loopback. The cgroup must exist: nft resolves it when adding the rules.
    pub fn isolate(&self, service: &str) -> Result<(), Error> {
        let service = service.trim_matches('/');
        let level = service.split('/').count();
        let path = self.cgroup2_under_base.join(service);
        let path = path.display();
        let mut script = String::new();
        for (chain, _, interface) in CHAINS {
            script.push_str(&format!(
                "add rule inet {ISOLATION_TABLE} {chain} {interface} != \"lo\" socket cgroupv2 \
                 level {level} \"{path}\" counter drop comment \"{service}\"\n"
            ));
        }
        self.nft.run_script(&script)
    }

    /// Removes the rules of `service`; nothing to remove is not an error.
    pub fn release(&self, service: &str) -> Result<(), Error> {
        let service = service.trim_matches('/');
        let rules = self.nft.rules(ISOLATION_TABLE)?.unwrap_or_default();
        let script: String = rules
            .iter()
            .filter(|rule| rule.comment.as_deref() == Some(service))
            .map(|rule| {
                format!(
                    "delete rule inet {ISOLATION_TABLE} {} handle {}\n",
                    rule.chain, rule.handle
                )
            })
            .collect();
        if script.is_empty() {
            return Ok(());
        }
        self.nft.run_script(&script)
    }
}
