//! The systemd backend: on a host booted with systemd, the limits of a unit's cgroup are set
//! through systemd over D-Bus, as `systemctl set-property --runtime` would set them, so that
//! systemd itself keeps them across restarts and daemon-reloads instead of undoing them.
//! Which unit owns a cgroup is systemd's answer (`GetUnitByControlGroup`), never a guess from
//! the path.

mod bus;
mod drop_ins;
mod properties;

use std::path::Path;

pub use bus::SystemdBus;
pub use drop_ins::{RUNTIME_CONTROL_DIR, RuntimeDropIns, UnitRecord};
pub use properties::{UnitProperty, cgroup_files, unit_properties};

/// Whether PID 1 is systemd (what `sd_booted()` checks).
pub fn booted() -> bool {
    Path::new("/run/systemd/system").is_dir()
}
