//! The systemd backend: on a host booted with systemd, the limits of a unit's cgroup are set
//! through systemd over D-Bus, as `systemctl set-property --runtime` would set them, so that
//! systemd itself keeps them across restarts and daemon-reloads instead of undoing them.
//! Which unit owns a cgroup is systemd's answer (`GetUnitByControlGroup`), never a guess from
//! the path.

mod bus;
mod drop_ins;
mod properties;

use std::{collections::BTreeMap, path::Path};

pub use bus::SystemdBus;
pub use drop_ins::{RUNTIME_CONTROL_DIR, RuntimeDropIns, UnitRecord};
pub use properties::{UnitProperty, cgroup_files, unit_properties};

use crate::Error;

/// Whether PID 1 is systemd (what `sd_booted()` checks).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}

/// A unit's values of the properties Sentinel sets, as `systemctl show` reports them.
pub type PropertyValues = BTreeMap<UnitProperty, u64>;

/// How [`give_back`] went.
#[derive(Debug, Default)]
pub struct GivenBack {
    /// Units whose drop-ins are back as they were and read again by systemd, with their
    /// `systemctl show` values now (to compare with the record's originals).
    pub restored: Vec<(String, Result<PropertyValues, Error>)>,
    /// Units whose drop-ins could not be put back, or that systemd did not reload, and why;
    /// their records must stay, to try again.
    pub failed: Vec<(String, String)>,
}

/// Puts back the runtime drop-ins of `units` as their `records` found them, then has systemd
/// read them again: one daemon-reload for all of them.
pub fn give_back(
    bus: Option<&mut SystemdBus>,
    drop_ins: &RuntimeDropIns,
    records: &BTreeMap<String, UnitRecord>,
    units: &[String],
) -> GivenBack {
    let mut given = GivenBack::default();
    let mut restored = Vec::new();
    for unit in units {
        let Some(record) = records.get(unit) else {
            continue;
        };
        match drop_ins.restore(unit, record) {
            Ok(()) => restored.push(unit.clone()),
            Err(error) => given.failed.push((unit.clone(), error.to_string())),
        }
    }
    if restored.is_empty() {
        return given;
    }
    let reloaded = match bus {
        Some(bus) => bus.reload().map(|()| bus),
        None => Err(Error::SystemdRequired),
    };
    match reloaded {
        Ok(bus) => {
            for unit in restored {
                let now = bus.properties(&unit, records[&unit].originals.keys().copied());
                given.restored.push((unit, now));
            }
        }
        Err(error) => {
            let reason = format!(
                "its drop-ins are back as they were, but systemd did not reload them, so it keeps \
                 Sentinel's limits until its next daemon-reload: {error}"
            );
            given
                .failed
                .extend(restored.into_iter().map(|unit| (unit, reason.clone())));
        }
    }
    given
}
