//! The systemd guest: a Debian 12 root filesystem made by mmdebstrap (systemd as PID 1, the
//! services a real server runs, nftables for Sentinel's package) in a raw ext4 image, and a
//! busybox initramfs that mounts it and starts systemd. Both are cached under
//! `target/vm/cache/` next to the kernel, and rebuilt only when the package list, this recipe or
//! the kernel changes.

use std::fs::{self, OpenOptions};
use std::io::BufWriter;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};

use super::cpio::CpioWriter;
use super::initramfs;
use super::kernel::{self, Kernel, WorkDir};
use crate::host::{command_output, is_root, run};

const SUITE: &str = "bookworm";
/// mmdebstrap builds the image, e2fsprogs' mke2fs turns directories into ext4 disks.
pub const HOST_PACKAGES: &[&str] = &["mmdebstrap", "e2fsprogs"];
/// What a small server runs, plus what the suite drives: nftables (Sentinel's dependency),
/// Prometheus to scrape it, curl, and python3 to read Prometheus's JSON.
const PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "dbus",
    "udev",
    "nftables",
    "openssh-server",
    "nginx",
    "prometheus",
    "curl",
    "procps",
    "iproute2",
    "kmod",
    "python3-minimal",
];
/// Left out of the image by dpkg: moment-timezone's data alone is 212 MiB (Prometheus's web
/// UI), documentation and translations are never read there.
const EXCLUDED_PATHS: &[&str] = &[
    "/usr/share/javascript/moment-timezone/data/*",
    "/usr/share/doc/*",
    "/usr/share/man/*",
    "/usr/share/locale/*",
];
/// A fixed machine-id: an empty one would make every boot a "first boot".
const MACHINE_ID: &str = "5e471ce15e471ce15e471ce15e471ce1";
/// Loaded by the initramfs to reach the root filesystem. crc32c_generic first: ext4 needs a
/// crc32c implementation only through a soft dependency, which busybox modprobe ignores.
const INITRAMFS_MODULES: &[&str] = &["crc32c_generic", "virtio_pci", "virtio_blk", "ext4"];
/// The kernel modules the image gets (the whole package is four times the rest of the image):
/// file systems, netfilter and the rest of the network stack, virtio, and what they need.
const IMAGE_MODULE_DIRS: &[&str] = &[
    "kernel/arch/",
    "kernel/crypto/",
    "kernel/drivers/block/",
    "kernel/drivers/char/",
    "kernel/drivers/virtio/",
    "kernel/fs/",
    "kernel/lib/",
    "kernel/net/",
];
/// The unit that runs the suite once the system is up (systemd_suite.sh, from the run disk).
pub const SUITE_UNIT: &str = "sentinel-vm-suite.service";
const SUITE_UNIT_TEXT: &str = "\
[Unit]
Description=Sentinel's systemd VM suite (from the run disk, /dev/vdb)
After=multi-user.target

[Service]
# exec, not oneshot: a oneshot unit would hold the boot unfinished while the suite waits for it.
Type=exec
ExecStart=/bin/sh -c 'mkdir -p /run/sentinel-suite && mount -o ro /dev/vdb /run/sentinel-suite && exec /bin/bash /run/sentinel-suite/suite.sh'
StandardOutput=journal+console
StandardError=journal+console

[Install]
WantedBy=multi-user.target
";
const INIT: &str = include_str!("systemd_init.sh");
const NAME_PREFIX: &str = "systemd-";

pub struct Image {
    pub kernel: Kernel,
    pub rootfs: PathBuf,
    pub initramfs: PathBuf,
}

pub fn prepare(cache_dir: &Path) -> Result<Image> {
    let kernel = kernel::prepare(cache_dir)?;
    let key = kernel::fnv1a(&[
        include_str!("systemd_image.rs").as_bytes(),
        INIT.as_bytes(),
        kernel.version.as_bytes(),
        &kernel::busybox_stamp()?,
    ]);
    let entry = cache_dir.join(format!("{NAME_PREFIX}{SUITE}-{key:016x}"));
    let image = Image {
        rootfs: entry.join("rootfs.img"),
        initramfs: entry.join("initramfs.cpio"),
        kernel,
    };
    if entry.is_dir() {
        println!(
            "[xtask] systemd image: using the cached {}",
            entry.display()
        );
        return Ok(image);
    }
    anyhow::ensure!(
        is_root(),
        "building the systemd VM image needs root (mmdebstrap installs packages as root into \
         the image's directory): run this task as root or through sudo"
    );
    let started = Instant::now();
    let work = WorkDir::create(cache_dir, "systemd-image")?;
    let root = work.path.join("root");
    bootstrap(&root)?;
    let staged_entry = work.path.join("entry");
    fs::create_dir(&staged_entry)?;
    add_kernel_parts(
        cache_dir,
        &image.kernel.version,
        &work.path,
        &root,
        &staged_entry.join("initramfs.cpio"),
    )?;
    configure(&root)?;
    root_image(&root, &staged_entry.join("rootfs.img"))?;
    match fs::rename(&staged_entry, &entry) {
        Err(error) if entry.is_dir() => {
            println!("[xtask] systemd image appeared meanwhile ({error}); using it")
        }
        result => result.with_context(|| format!("cannot create {}", entry.display()))?,
    }
    remove_superseded(cache_dir, &entry)?;
    println!(
        "[xtask] systemd image: built in {:.1} s, cached in {}",
        started.elapsed().as_secs_f64(),
        entry.display()
    );
    Ok(image)
}

fn bootstrap(root: &Path) -> Result<()> {
    println!(
        "[xtask] systemd image: mmdebstrap {SUITE} with {}",
        PACKAGES.join(", ")
    );
    let mut mmdebstrap = Command::new("mmdebstrap");
    mmdebstrap
        .args(["--variant=minbase", "--mode=root", "--format=directory"])
        .arg(format!("--include={}", PACKAGES.join(",")));
    for path in EXCLUDED_PATHS {
        mmdebstrap.arg(format!("--dpkgopt=path-exclude={path}"));
    }
    run(mmdebstrap.arg(SUITE).arg(root)).context("mmdebstrap failed")
}

/// Gives the image the kernel's modules and writes the initramfs that loads the disk drivers.
fn add_kernel_parts(
    cache_dir: &Path,
    version: &str,
    work: &Path,
    root: &Path,
    initramfs_out: &Path,
) -> Result<()> {
    let deb = kernel::cached_or_downloaded_deb(cache_dir, version)?;
    let unpacked = work.join("kernel");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))
        .with_context(|| format!("cannot unpack {}", deb.display()))?;
    kernel::depmod(&unpacked, version)?;
    kernel::stage_modules(&unpacked, version, &[], IMAGE_MODULE_DIRS, root)?;

    let initramfs_modules = work.join("initramfs-modules");
    let preload = kernel::stage_modules(
        &unpacked,
        version,
        INITRAMFS_MODULES,
        &[],
        &initramfs_modules,
    )?;
    initramfs::write_base(&initramfs_modules, version, &preload, initramfs_out)?;
    let file = OpenOptions::new().append(true).open(initramfs_out)?;
    let mut cpio = CpioWriter::new(BufWriter::new(file));
    cpio.file("init", 0o755, INIT.as_bytes())?;
    cpio.finish()
        .with_context(|| format!("cannot write {}", initramfs_out.display()))?;
    Ok(())
}

fn configure(root: &Path) -> Result<()> {
    let write = |path: &str, text: &str| {
        fs::write(root.join(path), text).with_context(|| format!("cannot write /{path}"))
    };
    write("etc/machine-id", &format!("{MACHINE_ID}\n"))?;
    write("etc/hostname", "sentinel-vm\n")?;
    write("etc/fstab", "/dev/vda / ext4 rw 0 0\n")?;
    write(&format!("etc/systemd/system/{SUITE_UNIT}"), SUITE_UNIT_TEXT)?;
    let wants = root.join("etc/systemd/system/multi-user.target.wants");
    fs::create_dir_all(&wants)?;
    symlink(
        format!("/etc/systemd/system/{SUITE_UNIT}"),
        wants.join(SUITE_UNIT),
    )
    .context("cannot enable the suite's unit")
}

/// An ext4 image of `root`, with room for the package, its state and Prometheus's data.
fn root_image(root: &Path, image: &Path) -> Result<()> {
    let used = command_output(Command::new("du").args(["-s", "--block-size=1M"]).arg(root))?;
    let used_mib: u64 = used
        .split_whitespace()
        .next()
        .and_then(|size| size.parse().ok())
        .context("cannot read the size of the image's tree from du")?;
    let size_mib = used_mib * 5 / 4 + 512;
    println!("[xtask] systemd image: {used_mib} MiB of files into a {size_mib} MiB ext4 image");
    ext4_from_dir(root, "sentinel-root", size_mib, image)
}

/// Writes an ext4 file system of `size_mib` holding the tree `dir` to `image`, without mounting
/// anything (loop devices are not available everywhere).
pub fn ext4_from_dir(dir: &Path, label: &str, size_mib: u64, image: &Path) -> Result<()> {
    run(Command::new("mke2fs")
        .args(["-q", "-t", "ext4", "-L", label, "-d"])
        .arg(dir)
        .arg(image)
        .arg(format!("{size_mib}M")))
    .with_context(|| format!("cannot make {} from {}", image.display(), dir.display()))
}

/// Images of older recipes or kernels: each is about a gigabyte.
fn remove_superseded(cache_dir: &Path, entry: &Path) -> Result<()> {
    for candidate in fs::read_dir(cache_dir)? {
        let path = candidate?.path();
        let superseded = path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(|name| name.starts_with(NAME_PREFIX))
            && path != entry;
        if superseded {
            println!("[xtask] removing the superseded {}", path.display());
            fs::remove_dir_all(&path)
                .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}
