//! The guard's side of the fleet (see `crate::crowdsec`): the fleet's bans go into the same
//! table as the local ones, under the same rules (the allow list and open sessions win), and
//! the local bans go out to the watcher.

use std::{
    collections::HashMap,
    time::{Duration, Instant, SystemTime},
};

use tracing::{error, info, warn};

use super::{
    SshGuard,
    audit::{AuditAction, AuditRecord},
};
use crate::{
    crowdsec::{BanHandoff, FleetBan, FleetMetrics, FleetUpdate, LocalBan, is_fleet_reason},
    firewall::{Ban, IpNet},
};

/// A decision listed again ends a moment later than when first seen, by the time its answer
/// took: not a longer ban.
const RELISTED_SLACK: Duration = Duration::from_secs(2);

/// What `sentinel unban` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unbanned {
    /// The network lifted: the ban in force on exactly the address given, or else the address
    /// widened as a ban of it would be (an IPv6 address to its prefix).
    pub net: IpNet,
    /// For a ban from the fleet: how long it stays lifted on this host only, until it would
    /// have ended; the decision stays in LAPI.
    pub fleet_override: Option<Duration>,
}

pub(super) struct FleetLink {
    metrics: FleetMetrics,
    /// `None` when the watcher is off.
    handoff: Option<BanHandoff>,
    /// Fleet bans that `sentinel unban` lifted on this host, until they would have ended: the
    /// fleet's next full sync must not bring them back.
    overrides: HashMap<IpNet, Instant>,
}

impl SshGuard {
    /// Joins the fleet: its decisions arrive as `Input::Fleet`, and with `handoff` the local
    /// bans are shared.
    pub fn join_fleet(&mut self, metrics: FleetMetrics, handoff: Option<BanHandoff>) {
        self.fleet = Some(FleetLink {
            metrics,
            handoff,
            overrides: HashMap::new(),
        });
    }

    pub(super) fn on_fleet(&mut self, now: Instant, update: FleetUpdate) {
        let Some(link) = &mut self.fleet else {
            return;
        };
        link.overrides.retain(|_, until| *until > now);
        let mut lifts = update.lifts;
        if update.complete {
            // Fleet bans held here that the fleet no longer lists ended while it was away.
            lifts.extend(
                self.reasons
                    .iter()
                    .filter(|(net, (reason, _))| {
                        is_fleet_reason(reason) && !update.bans.iter().any(|ban| ban.net == **net)
                    })
                    .map(|(net, _)| *net),
            );
        }
        self.lift_fleet_bans(&lifts);
        let wanted: Vec<FleetBan> = update
            .bans
            .into_iter()
            .filter(|ban| self.fleet_ban_allowed(now, ban))
            .collect();
        if !wanted.is_empty() {
            self.make_fleet_bans(now, wanted);
        }
    }

    /// Whether the fleet's ban may be made here; a refusal is counted and audited.
    fn fleet_ban_allowed(&mut self, now: Instant, ban: &FleetBan) -> bool {
        let ends = now + ban.remaining;
        let held = match (self.reasons.get(&ban.net), self.engine.ban_end(&ban.net)) {
            // This host's own ban (often the very one it pushed): it stays as it is.
            (Some((reason, _)), Some(end)) if !is_fleet_reason(reason) => end > now,
            // Listed again by a full sync: already in force for as long.
            (Some(_), Some(end)) => end + RELISTED_SLACK >= ends,
            _ => false,
        };
        if held {
            return false;
        }
        let skip = if self.engine.covers_allowed(&ban.net) {
            Some("allowlisted")
        } else if self.engine.has_open_session(&ban.net) {
            Some("active_session")
        } else if self
            .fleet
            .as_ref()
            .is_some_and(|link| link.overrides.contains_key(&ban.net))
        {
            Some("lifted_here")
        } else {
            None
        };
        let Some(reason) = skip else {
            return true;
        };
        if let Some(link) = &self.fleet {
            link.metrics.skipped(reason).inc();
        }
        // An operator's override is audited once, when it is made.
        if reason != "lifted_here" {
            info!(address = %ban.net, origin = ban.origin, reason, "fleet ban skipped");
            self.audit(AuditRecord::new(
                AuditAction::Skip,
                &ban.net,
                format!("{}: {reason}", ban.reason),
                0,
                None,
            ));
        }
        false
    }

    /// Commits the fleet's bans in one transaction; only then are they held, counted and audited.
    fn make_fleet_bans(&mut self, now: Instant, bans: Vec<FleetBan>) {
        let batch: Vec<Ban> = bans
            .iter()
            .map(|ban| Ban {
                net: ban.net,
                timeout: ban.remaining,
            })
            .collect();
        let Some(firewall) = &mut self.firewall else {
            // Observe mode: the firewall is not touched, for the fleet either.
            return;
        };
        if let Err(error) = firewall.ban(&batch) {
            error!(
                "committing {} fleet ban(s) to nftables failed; they are not in force: {error}",
                batch.len()
            );
            self.metrics.commit_failures.inc_by(batch.len() as u64);
            return;
        }
        for ban in bans {
            self.engine.hold(ban.net, now + ban.remaining);
            if let Some(link) = &self.fleet {
                link.metrics.applied(&ban.origin).inc();
            }
            self.audit(AuditRecord::new(
                AuditAction::Ban,
                &ban.net,
                ban.reason.clone(),
                0,
                Some(SystemTime::now() + ban.remaining),
            ));
            self.reasons.insert(ban.net, (ban.reason, 0));
        }
        self.state.mark_changed();
    }

    /// Lifts the fleet bans among `nets`; a local ban of the same network stays.
    fn lift_fleet_bans(&mut self, nets: &[IpNet]) {
        let mut lifted: Vec<IpNet> = nets
            .iter()
            .filter(|net| {
                self.reasons
                    .get(net)
                    .is_some_and(|(reason, _)| is_fleet_reason(reason))
            })
            .copied()
            .collect();
        lifted.sort();
        lifted.dedup();
        if lifted.is_empty() {
            return;
        }
        if let Some(firewall) = &mut self.firewall
            && let Err(error) = firewall.unban(&lifted)
        {
            error!(
                bans = lifted.len(),
                "lifting the bans the fleet ended failed; they stay until they expire: {error}"
            );
            return;
        }
        for net in &lifted {
            self.engine.lift(net);
            let (reason, _) = self.reasons.remove(net).unwrap_or_default();
            self.audit(AuditRecord::new(AuditAction::Unban, net, reason, 0, None));
        }
        self.state.mark_changed();
    }

    /// `sentinel unban` of a fleet ban: lifted on this host only, until it would have ended;
    /// the decision stays in LAPI, where `cscli decisions delete` ends it for the whole fleet.
    /// Returns how long the override lasts.
    pub(super) fn override_fleet_ban(
        &mut self,
        net: IpNet,
        now: Instant,
        until: Option<Instant>,
    ) -> Option<Duration> {
        let (Some(link), Some(until)) = (&mut self.fleet, until) else {
            return None;
        };
        link.overrides.insert(net, until);
        warn!(
            address = %net,
            "a fleet ban was lifted on this host only, until it would have ended; the decision \
             stays in CrowdSec's Local API (`cscli decisions delete --ip` ends it for the fleet)"
        );
        Some(until.saturating_duration_since(now))
    }

    /// Hands a ban just made to the watcher, which pushes it to LAPI; never waits.
    pub(super) fn share(&self, net: IpNet, until: SystemTime, reason: &'static str, failures: u32) {
        if let Some(handoff) = self.fleet.as_ref().and_then(|link| link.handoff.as_ref()) {
            handoff.offer(LocalBan {
                net,
                until,
                reason,
                failures,
            });
        }
    }
}
