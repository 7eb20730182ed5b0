//! The guest's root filesystem: a cached base archive (busybox, kernel modules)
//! followed by a per-run overlay archive (/init, the payload). The kernel
//! unpacks both in order, so overlay files win.

use std::fs::{self, File, OpenOptions};
use std::io::BufWriter;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result};

use super::BUSYBOX;
use super::cpio::CpioWriter;
use super::elf::require_static_executable;
use super::payload::Payload;
use crate::host::command_output;

const GUEST_INIT: &str = include_str!("guest_init.sh");
/// Read by guest_init.sh.
const PRELOAD_LIST: &str = "etc/sentinel/modules-preload";
const JOBS_LIST: &str = "sentinel/jobs";

pub fn write_base(
    modules_root: &Path,
    kernel_version: &str,
    preload: &[String],
    out: &Path,
) -> Result<()> {
    require_static_executable(Path::new(BUSYBOX))?;
    let file = File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    for dir in [
        "dev", "proc", "sys", "tmp", "run", "root", "bin", "sbin", "usr/bin", "usr/sbin",
    ] {
        cpio.dir(dir)?;
    }
    // The kernel opens /dev/console for /init's output before /init can mount
    // devtmpfs; without this node /init runs silently.
    cpio.char_device("dev/console", 0o600, (5, 1))?;
    cpio.host_file("bin/busybox", Path::new(BUSYBOX))?;
    let applets = command_output(Command::new(BUSYBOX).arg("--list-full"))?;
    for applet in applets.lines().filter(|applet| *applet != "bin/busybox") {
        cpio.symlink(applet, "/bin/busybox")?;
    }
    let modules = format!("lib/modules/{kernel_version}");
    cpio.host_tree(&modules, &modules_root.join(&modules))?;
    cpio.file(
        PRELOAD_LIST,
        0o644,
        format!("{}\n", preload.join("\n")).as_bytes(),
    )?;
    cpio.finish()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}

/// Writes base + overlay to `out`, the file QEMU boots as its initrd.
pub fn assemble(base: &Path, payload: &Payload, out: &Path) -> Result<()> {
    fs::copy(base, out)
        .with_context(|| format!("cannot copy {} to {}", base.display(), out.display()))?;
    let file = OpenOptions::new().append(true).open(out)?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    cpio.file("init", 0o755, GUEST_INIT.as_bytes())?;
    let mut jobs = String::new();
    for job in &payload.jobs {
        anyhow::ensure!(
            !job.name.contains(['\t', '\n']) && !job.command.contains(['\t', '\n']),
            "job {:?} contains a tab or newline, which the guest's job list cannot hold",
            job.name
        );
        jobs.push_str(&format!("{}\t{}\n", job.name, job.command));
    }
    cpio.file(JOBS_LIST, 0o644, jobs.as_bytes())?;
    for (host, guest) in &payload.copies {
        cpio.host_tree(guest, host)?;
    }
    for (link, target) in &payload.links {
        cpio.symlink(link, target)?;
    }
    cpio.finish()
        .with_context(|| format!("cannot write {}", out.display()))?;
    Ok(())
}
