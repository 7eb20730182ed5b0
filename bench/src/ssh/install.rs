//! The SSH section's packages. Debian starts fail2ban and sshguard as soon as they are
//! installed and enables them at boot, where they would guard the host's own firewall; the
//! bench runs copies of its own inside a namespace instead. So while it installs them a
//! policy-rc.d refuses every service start, and afterwards those it installed are disabled at
//! boot. Nothing is changed when everything is installed already.

use std::{
    fs::{self, Permissions},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::host::{self, is_installed, run};

/// The attack's server, clients and firewall, and the flood's PAM feeder.
const PACKAGES: &[&str] = &[
    "openssh-server",
    "sshpass",
    "nftables",
    "gcc",
    "libpam0g-dev",
];
/// python3-pyinotify gives fail2ban a backend woken by each write (Debian recommends it).
const PEER_PACKAGES: &[&str] = &["fail2ban", "sshguard", "python3-pyinotify"];
/// Packages with a system service of the same name.
const PEER_SERVICES: [&str; 2] = ["fail2ban", "sshguard"];
const POLICY_RC_D: &str = "/usr/sbin/policy-rc.d";
const REFUSE_ALL_STARTS: &str = "#!/bin/sh\n\
    # Written by `cargo xtask bench` while it installs packages; removed right after.\n\
    exit 101\n";

pub fn ensure_packages(with_peers: bool) -> Result<()> {
    host::ensure_packages("SSH benchmark", PACKAGES)?;
    if !with_peers {
        return Ok(());
    }
    ensure_peers("SSH brute-force peers", PEER_PACKAGES, &PEER_SERVICES)
}

/// The port-scan section's: the SSH lab, nmap, and psad (whose service is refused a start and
/// disabled at boot like the SSH peers').
pub fn ensure_scan_packages(with_peers: bool) -> Result<()> {
    host::ensure_packages("port-scan benchmark", PACKAGES)?;
    host::ensure_packages("port-scan benchmark", &["nmap"])?;
    if !with_peers {
        return Ok(());
    }
    ensure_peers("port-scan peers", &["psad"], &["psad"])
}

/// Installs `packages` with every service start refused, then disables at boot each of
/// `services` this installed.
fn ensure_peers(purpose: &str, packages: &[&str], services: &[&str]) -> Result<()> {
    let new_services: Vec<&str> = services
        .iter()
        .copied()
        .filter(|service| !is_installed(service))
        .collect();
    if packages.iter().all(|package| is_installed(package)) {
        return host::ensure_packages(purpose, packages);
    }
    {
        let _refused = ServiceStartsRefused::install()?;
        host::ensure_packages(purpose, packages)?;
    }
    for service in new_services {
        disable_at_boot(service)?;
    }
    Ok(())
}

/// A policy-rc.d refusing every service start while alive; the host's own, if it has one, is
/// moved aside and put back on drop.
struct ServiceStartsRefused {
    saved: Option<PathBuf>,
}

impl ServiceStartsRefused {
    fn install() -> Result<Self> {
        let policy = Path::new(POLICY_RC_D);
        let saved = if policy.symlink_metadata().is_ok() {
            let aside = PathBuf::from(format!("{POLICY_RC_D}.sentinel-bench-saved"));
            fs::rename(policy, &aside)
                .with_context(|| format!("cannot move {POLICY_RC_D} aside"))?;
            Some(aside)
        } else {
            None
        };
        // From here on, drop restores the host's policy whatever fails.
        let refused = Self { saved };
        fs::write(policy, REFUSE_ALL_STARTS)
            .and_then(|()| fs::set_permissions(policy, Permissions::from_mode(0o755)))
            .with_context(|| format!("cannot write {POLICY_RC_D}"))?;
        Ok(refused)
    }
}

impl Drop for ServiceStartsRefused {
    fn drop(&mut self) {
        let restored = match &self.saved {
            Some(aside) => fs::rename(aside, POLICY_RC_D),
            None => fs::remove_file(POLICY_RC_D),
        };
        if let Err(error) = restored {
            eprintln!("[bench] WARNING: could not restore {POLICY_RC_D}: {error}");
        }
    }
}

/// Undoes what the package's installation did for boot. systemctl works without a running
/// systemd and updates the SysV links too; update-rc.d is for hosts without systemd.
fn disable_at_boot(service: &str) -> Result<()> {
    if Path::new("/usr/bin/systemctl").exists() {
        run(Command::new("systemctl").args(["disable", service]))?;
    } else if Path::new("/etc/init.d").join(service).exists() {
        run(Command::new("update-rc.d").args([service, "disable"]))?;
    }
    println!("[bench] {service}: installed without starting it, and disabled at boot");
    Ok(())
}
