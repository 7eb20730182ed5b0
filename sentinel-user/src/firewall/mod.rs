//! Bans in nftables. Sentinel keeps bans in one table, `table inet sentinel` (isolations of
//! contained services have their own, see `isolation`), and never reads or
//! writes anything else in the ruleset:
//!
//! ```text
//! table inet sentinel {
//!     set banned_v4 { type ipv4_addr; flags interval, timeout; }
//!     set banned_v6 { type ipv6_addr; flags interval, timeout; }
//!     chain input {
//!         type filter hook input priority -10; policy accept;
//!         iif "lo" accept
//!         ip saddr @banned_v4 counter drop
//!         ip6 saddr @banned_v6 counter drop
//!     }
//! }
//! ```
//!
//! A ban is a set element with a timeout, so the kernel lifts it even when the daemon is gone;
//! bans outlive the daemon unless `flush_on_exit` is set. The table is created and read with the
//! `nft` command (rare, and in the syntax operators know); bans are sent over netlink, one
//! transaction per batch, because `nft` must read a whole interval set before adding to it and
//! so slows down as the set grows (see `netlink`).

mod isolation;
mod net;
mod netlink;
mod netns;
mod nft;
mod view;

use std::{
    path::PathBuf,
    time::{Duration, Instant},
};

use tracing::{info, warn};

use crate::Error;

pub use isolation::Isolation;
pub use net::IpNet;
use netlink::SetElementSocket;
pub use netlink::TableWatch;
#[cfg(feature = "fuzzing")]
pub use netlink::abi;
#[cfg(feature = "fuzzing")]
pub(crate) use netlink::{Batch, error_codes, removes_from_our_table};
use netns::NetNamespace;
use nft::Nft;
use view::{BanView, Changes, Expiry};

pub(crate) const TABLE: &str = "sentinel";
pub(crate) const SET_V4: &str = "banned_v4";
pub(crate) const SET_V6: &str = "banned_v6";

/// Far beyond any sensible ban, and far inside what the kernel accepts (about 584 years).
pub(crate) const MAX_BAN_TIMEOUT: Duration = Duration::from_secs(100 * 365 * 24 * 60 * 60);

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirewallOptions {
    /// Delete the table, and so every ban, when the daemon stops. By default bans stay in the
    /// kernel until they expire, protecting the host while the daemon restarts.
    pub flush_on_exit: bool,
    /// The network namespace to work in, e.g. `/run/netns/NAME`; the daemon's own when unset.
    pub netns: Option<PathBuf>,
}

/// Drop every packet from `net` for `timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ban {
    pub net: IpNet,
    pub timeout: Duration,
}

/// A ban in force, as found in the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveBan {
    pub net: IpNet,
    /// `None` for an element added by hand without a timeout.
    pub expires_in: Option<Duration>,
}

/// What the drop rules have dropped since the table was created.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DropCounters {
    pub ipv4: Dropped,
    pub ipv6: Dropped,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Dropped {
    pub packets: u64,
    pub bytes: u64,
}

/// Sentinel's nftables table and the bans in it. Calls block: `ban` and `unban` for tens of
/// microseconds, the others for an `nft` run of a few milliseconds.
#[derive(Debug)]
pub struct Firewall {
    options: FirewallOptions,
    nft: Nft,
    socket: SetElementSocket,
    /// The daemon's mirror of the sets, so that a batch needs no read from the kernel.
    view: BanView,
    /// Until taken by whoever restores what others remove from the table.
    watch: Option<TableWatch>,
}

impl Firewall {
    /// Makes sure the table exists with the right shape and adopts the bans already in it
    /// (`list` returns them). A missing table is created; a table of another shape is replaced
    /// in one transaction that keeps its bans. No other table is read or changed.
    pub fn open(options: FirewallOptions) -> Result<Self, Error> {
        let netns = options
            .netns
            .as_deref()
            .map(NetNamespace::open)
            .transpose()?;
        let open_sockets = || Ok((SetElementSocket::open()?, TableWatch::open()?));
        let (socket, watch) = match &netns {
            Some(netns) => netns.run(open_sockets)?,
            None => open_sockets()?,
        };
        let nft = Nft::new(netns);
        let view = ensure_table(&nft)?;
        Ok(Self {
            options,
            nft,
            socket,
            view,
            watch: Some(watch),
        })
    }

    /// What tells of changes that may have removed bans from the table (see `TableWatch`);
    /// subscribed before the table was read, so no change after that read is missed.
    pub fn take_table_watch(&mut self) -> Option<TableWatch> {
        self.watch.take()
    }

    /// Bans every network of `batch` in one transaction. Banning a banned network again extends
    /// its timeout and never shortens it; overlapping bans merge (see `view`).
    pub fn ban(&mut self, batch: &[Ban]) -> Result<(), Error> {
        let bans = batch
            .iter()
            .map(Self::ban_net)
            .collect::<Result<Vec<_>, _>>()?;
        self.apply(|view, now| {
            let expiring = bans
                .iter()
                .map(|(net, timeout)| (*net, Expiry::At(now + *timeout)));
            view.ban(expiring, now)
        })
    }

    /// Lifts every ban that overlaps one of `nets`, wider or narrower, in one transaction.
    pub fn unban(&mut self, nets: &[IpNet]) -> Result<(), Error> {
        self.apply(|view, now| view.unban(nets.iter().copied(), now))
    }

    /// The bans in force, read from the kernel.
    pub fn list(&mut self) -> Result<Vec<ActiveBan>, Error> {
        self.view = ensure_table(&self.nft)?;
        Ok(self.view.active(Instant::now()))
    }

    pub fn drop_counters(&self) -> Result<DropCounters, Error> {
        self.nft.drop_counters()
    }

    /// A reload changed `flush_on_exit`.
    pub fn set_flush_on_exit(&mut self, flush_on_exit: bool) {
        self.options.flush_on_exit = flush_on_exit;
    }

    /// Stops managing the table: the bans stay unless `flush_on_exit` is set.
    pub fn close(self) -> Result<(), Error> {
        if self.options.flush_on_exit {
            self.remove_table()?;
        }
        Ok(())
    }

    /// Deletes the table with every ban in it.
    pub fn remove_table(self) -> Result<(), Error> {
        self.nft.delete_table()
    }

    /// The network of a ban, with its timeout checked. The caller decides how wide a ban is
    /// (the SSH guard widens IPv6 offenders to their prefix, except next to allowed addresses).
    fn ban_net(ban: &Ban) -> Result<(IpNet, Duration), Error> {
        if ban.timeout.is_zero() || ban.timeout > MAX_BAN_TIMEOUT {
            return Err(Error::InvalidTimeout {
                net: ban.net,
                timeout: ban.timeout,
                max: MAX_BAN_TIMEOUT,
            });
        }
        Ok((ban.net, ban.timeout))
    }

    /// Plans a batch against the mirror and commits it. When the kernel refuses it, the mirror
    /// has drifted (an element expired a moment early, someone edited or deleted the table), so
    /// the table is read again (and recreated if needed) and the batch planned once more.
    fn apply(&mut self, plan: impl Fn(&mut BanView, Instant) -> Changes) -> Result<(), Error> {
        let Err(error) = self.plan_and_commit(&plan) else {
            return Ok(());
        };
        warn!("re-reading the firewall table after a failed update: {error}");
        self.view = ensure_table(&self.nft)?;
        let result = self.plan_and_commit(&plan);
        if result.is_err() {
            // Keep the mirror true to the kernel even though the batch failed.
            self.view = ensure_table(&self.nft)?;
        }
        result
    }

    fn plan_and_commit(
        &mut self,
        plan: &impl Fn(&mut BanView, Instant) -> Changes,
    ) -> Result<(), Error> {
        let now = Instant::now();
        let changes = plan(&mut self.view, now);
        if changes.is_empty() {
            return Ok(());
        }
        self.socket.commit(&changes, now)
    }
}

/// Creates or repairs the table and returns the mirror of its bans.
fn ensure_table(nft: &Nft) -> Result<BanView, Error> {
    let now = Instant::now();
    let Some(table) = nft.table()? else {
        info!("creating nftables table inet {TABLE}");
        nft.recreate_table(&[], now)?;
        return Ok(BanView::default());
    };
    let bans = table.bans(now);
    if !table.has_expected_shape() {
        warn!(
            "nftables table inet {TABLE} has an unexpected shape; recreating it with its {} bans",
            bans.len()
        );
        nft.recreate_table(&bans, now)?;
    }
    Ok(BanView::new(bans))
}
