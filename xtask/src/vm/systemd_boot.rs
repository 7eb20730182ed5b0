//! `cargo xtask systemd-test`: installs Sentinel's Debian package on a guest that boots real
//! systemd (systemd_image.rs) and checks it as an operator would: the service reaches READY,
//! serves metrics with every probe attached, scores at most 4.0 in `systemd-analyze
//! security`, refuses a broken reload, is scraped by Debian's Prometheus, sets units' limits
//! through systemd (kept across restarts and daemon-reloads, put back after drift, given back
//! exactly, also after a kill -9), OOM-kills and gracefully stops leaking services with the
//! shipped alert firing, and purges cleanly.
//!
//! The root image is booted read-only (QEMU snapshot), and each run gets a small second disk
//! with the package and the suite (systemd_suite.sh). Results come back on the second serial
//! port and the verdict through the debug-exit device, as in `vm-test`.

use std::fs;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::qemu::{self, Disk, VmConfig};
use super::systemd_image::{self, Image};
use super::{HOST_PACKAGES, cache_dir, in_run_dir, judge, print_timing, vm_dir};
use crate::host::ensure_packages;

/// The suite's assertions, in order: each is `test_NAME` in systemd_suite.sh and must report
/// a pass.
const ASSERTIONS: &[&str] = &[
    "boot",
    "install",
    "active",
    "metrics",
    "probes",
    "exposure",
    "reload_refused",
    "prometheus_scrapes",
    "unit_limits",
    "late_unit",
    "oom_kill",
    "graceful_stop",
    "contain_freeze",
    "bus_unavailable",
    "drift",
    "drift_drop_in",
    "undo",
    "undo_after_kill",
    "oom_alert",
    "purge",
];
const SUITE: &str = include_str!("systemd_suite.sh");
/// Boot takes 15-20 s under TCG, the suite a few minutes; the rest is headroom.
const DEFAULT_TIMEOUT_SECS: u64 = 900;

#[derive(clap::Args)]
pub struct SystemdTestArgs {
    /// Keep target/vm/runs/<id>/ (run disk, console.log, results.log) after a passing run;
    /// it is always kept after a failure.
    #[arg(long)]
    keep: bool,
    /// Fail if the guest has not given its verdict after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Show every kernel message on the console (default: warnings and errors only).
    #[arg(long)]
    kernel_log: bool,
}

/// What a plain `cargo xtask systemd-test` does (`cargo xtask test` runs it so).
impl Default for SystemdTestArgs {
    fn default() -> Self {
        Self {
            keep: false,
            timeout: DEFAULT_TIMEOUT_SECS,
            kernel_log: false,
        }
    }
}

pub fn systemd_test(args: &SystemdTestArgs) -> Result<()> {
    let workspace = crate::workspace_root();
    let deb = crate::deb::build(&workspace)?;
    let started = Instant::now();
    let vm_dir = vm_dir(&workspace);
    ensure_packages("VM host tools", HOST_PACKAGES)?;
    ensure_packages("systemd VM tools", systemd_image::HOST_PACKAGES)?;
    let image = systemd_image::prepare(&cache_dir(&vm_dir))?;
    in_run_dir(&vm_dir, args.keep, started, |run_dir| {
        boot_and_judge(args, &image, &deb, run_dir)
    })
}

fn boot_and_judge(args: &SystemdTestArgs, image: &Image, deb: &Path, run_dir: &Path) -> Result<()> {
    let run_disk = run_dir.join("run-disk.img");
    write_run_disk(deb, &run_dir.join("run-disk"), &run_disk)?;
    let timeout = Duration::from_secs(args.timeout);
    println!(
        "[xtask] booting Linux {} with systemd under QEMU: {} assertions, timeout {} s, \
         console log {}",
        image.kernel.version,
        ASSERTIONS.len(),
        args.timeout,
        run_dir.join("console.log").display()
    );
    let outcome = qemu::run(&VmConfig {
        vmlinux: &image.kernel.vmlinux,
        initramfs: &image.initramfs,
        run_dir,
        disks: &[
            Disk {
                image: &image.rootfs,
                snapshot: true,
            },
            Disk {
                image: &run_disk,
                snapshot: false,
            },
        ],
        kernel_args: "",
        timeout,
        shell: false,
        kernel_log: args.kernel_log,
    })?;
    print_timing("systemd VM", &outcome);
    judge(&outcome, ASSERTIONS.len(), timeout).map(drop)
}

/// A small ext4 disk holding the package, the suite and its list of assertions.
fn write_run_disk(deb: &Path, dir: &Path, image: &Path) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let deb_name = deb
        .file_name()
        .context("the package path has no file name")?;
    fs::copy(deb, dir.join(deb_name))
        .with_context(|| format!("cannot copy {} to the run disk", deb.display()))?;
    fs::write(dir.join("suite.sh"), SUITE)?;
    fs::write(dir.join("assertions"), ASSERTIONS.join("\n") + "\n")?;
    let size_mib = fs::metadata(deb)?.len() / (1 << 20) + 32;
    systemd_image::ext4_from_dir(dir, "sentinel-run", size_mib, image)
}
