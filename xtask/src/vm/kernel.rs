//! The guest kernel: Debian's newest `linux-image-6.1.0-*-amd64-unsigned`, turned
//! into an uncompressed vmlinux plus a base initramfs (busybox and the modules
//! the suites need), cached under `target/vm/cache/` so later runs reuse it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fs::{self, File};
use std::io::ErrorKind;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use super::{BUSYBOX, initramfs};
use crate::host::{command_output, is_root, privileged, run};

/// Modules the guest's /init loads, in this order. crc32c_generic comes first:
/// libcrc32c only soft-depends on a crc32c implementation and busybox modprobe
/// ignores soft dependencies. Built-in ones are skipped.
const PRELOADED_MODULES: &[&str] = &[
    "crc32c_generic",
    "libcrc32c",
    "nfnetlink",
    "nf_tables",
    "nf_defrag_ipv4",
    "nf_defrag_ipv6",
    "nf_conntrack",
    "nf_socket_ipv4",
    "nf_socket_ipv6",
    "nft_socket",
    "veth",
];

/// Shipped whole, so that the guest kernel can load any nftables expression
/// on demand through /sbin/modprobe.
const SHIPPED_MODULE_DIRS: &[&str] = &[
    "kernel/net/netfilter/",
    "kernel/net/ipv4/netfilter/",
    "kernel/net/ipv6/netfilter/",
];

/// Debian builds its 6.1 kernels with CONFIG_KERNEL_XZ: the vmlinuz carries the
/// kernel as an xz stream behind the boot setup code.
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";

pub struct Kernel {
    pub version: String,
    pub vmlinux: PathBuf,
    pub base_initramfs: PathBuf,
}

pub fn prepare(cache_dir: &Path) -> Result<Kernel> {
    fs::create_dir_all(cache_dir)
        .with_context(|| format!("cannot create {}", cache_dir.display()))?;
    remove_abandoned_work_dirs(cache_dir)?;
    let version = newest_available_version()?;
    let entry = cache_dir.join(format!("linux-{version}-{:016x}", cache_key()?));
    let kernel = Kernel {
        vmlinux: entry.join("vmlinux"),
        base_initramfs: entry.join("initramfs-base.cpio"),
        version,
    };
    if entry.is_dir() {
        println!(
            "[xtask] kernel {}: using the cached vmlinux and base initramfs in {}",
            kernel.version,
            entry.display()
        );
        return Ok(kernel);
    }

    let deb = cached_or_downloaded_deb(cache_dir, &kernel.version)?;
    println!(
        "[xtask] kernel {}: unpacking {} (vmlinux, modules, depmod, base initramfs)",
        kernel.version,
        deb.display()
    );
    let work = WorkDir::create(cache_dir, "kernel")?;
    let unpacked = work.path.join("deb");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))
        .with_context(|| format!("cannot unpack {}", deb.display()))?;

    // Everything of the cache entry is written here first and renamed into place
    // last, so an interrupted run never leaves a half-made entry behind.
    let staged_entry = work.path.join("entry");
    fs::create_dir(&staged_entry)?;
    extract_vmlinux(
        &unpacked.join(format!("boot/vmlinuz-{}", kernel.version)),
        &work.path.join("vmlinux.xz"),
        &staged_entry.join("vmlinux"),
    )?;
    let modules_root = work.path.join("modules");
    // The package ships no modules.dep.
    depmod(&unpacked, &kernel.version)?;
    let preload = stage_modules(
        &unpacked,
        &kernel.version,
        PRELOADED_MODULES,
        SHIPPED_MODULE_DIRS,
        &modules_root,
    )?;
    initramfs::write_base(
        &modules_root,
        &kernel.version,
        &preload,
        &staged_entry.join("initramfs-base.cpio"),
    )?;
    match fs::rename(&staged_entry, &entry) {
        // A concurrent run finished the same entry first: theirs is as good.
        Err(error) if entry.is_dir() => {
            println!("[xtask] kernel cache entry appeared meanwhile ({error}); using it")
        }
        result => result.with_context(|| format!("cannot create {}", entry.display()))?,
    }
    remove_superseded(cache_dir, &entry, &deb)?;
    println!(
        "[xtask] kernel {}: cached in {}",
        kernel.version,
        entry.display()
    );
    Ok(kernel)
}

/// The cache entry is keyed by the kernel version and by everything that shapes
/// its files: the code that builds them and the busybox binary.
fn cache_key() -> Result<u64> {
    Ok(fnv1a(&[
        include_str!("kernel.rs").as_bytes(),
        include_str!("initramfs.rs").as_bytes(),
        include_str!("cpio.rs").as_bytes(),
        &busybox_stamp()?,
    ]))
}

/// Size and modification time of the busybox binary that initramfs archives are made of.
pub(super) fn busybox_stamp() -> Result<Vec<u8>> {
    let busybox = fs::metadata(BUSYBOX).with_context(|| format!("cannot stat {BUSYBOX}"))?;
    Ok([busybox.len().to_le_bytes(), busybox.mtime().to_le_bytes()].concat())
}

/// FNV-1a of the concatenated inputs: stable across toolchains, unlike std's DefaultHasher.
pub(super) fn fnv1a(inputs: &[&[u8]]) -> u64 {
    inputs
        .iter()
        .flat_map(|input| input.iter())
        .fold(0xcbf2_9ce4_8422_2325, |hash, byte| {
            (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3)
        })
}

fn newest_available_version() -> Result<String> {
    let mut versions = available_versions()?;
    if versions.is_empty() {
        println!("[xtask] no Debian 6.1 kernel in the package lists: refreshing them");
        run(privileged("apt-get", &[]).arg("update").arg("-q")).context("apt-get update failed")?;
        versions = available_versions()?;
    }
    let (_, version) = versions.into_iter().max().context(
        "apt-cache knows no linux-image-6.1.0-*-amd64-unsigned package: vm-test needs \
         Debian 12 (bookworm) package lists",
    )?;
    Ok(version)
}

/// (ABI number, version such as "6.1.0-56-amd64") of every installable kernel.
fn available_versions() -> Result<Vec<(u32, String)>> {
    let listing = command_output(Command::new("apt-cache").args([
        "search",
        "--names-only",
        r"^linux-image-6\.1\.0-[0-9]+-amd64-unsigned$",
    ]))?;
    Ok(listing
        .lines()
        .filter_map(|line| {
            let package = line.split_whitespace().next()?;
            let version = package
                .strip_prefix("linux-image-")?
                .strip_suffix("-unsigned")?;
            let abi = version
                .strip_prefix("6.1.0-")?
                .strip_suffix("-amd64")?
                .parse()
                .ok()?;
            Some((abi, version.to_owned()))
        })
        .collect())
}

pub(super) fn cached_or_downloaded_deb(cache_dir: &Path, version: &str) -> Result<PathBuf> {
    let package = format!("linux-image-{version}-unsigned");
    let debs = cache_dir.join("debs");
    fs::create_dir_all(&debs)?;
    if let Some(deb) = find_deb(&debs, &package)? {
        return Ok(deb);
    }
    println!("[xtask] kernel {version}: downloading {package} (about 70 MB)");
    let download = WorkDir::create(cache_dir, "download")?;
    let mut apt_download = Command::new("apt-get");
    apt_download.current_dir(&download.path).arg("download");
    if is_root() {
        // apt fetches as the unprivileged _apt user, who cannot write here.
        apt_download.args(["-o", "APT::Sandbox::User=root"]);
    }
    run(apt_download.arg(&package)).with_context(|| {
        format!("cannot download {package}; if the mirror dropped it, run `apt-get update`")
    })?;
    let downloaded = find_deb(&download.path, &package)?
        .with_context(|| format!("apt-get download left no {package} .deb file"))?;
    let deb = debs.join(
        downloaded
            .file_name()
            .context("download has no file name")?,
    );
    fs::rename(&downloaded, &deb)
        .with_context(|| format!("cannot move the download to {}", deb.display()))?;
    Ok(deb)
}

fn find_deb(dir: &Path, package: &str) -> Result<Option<PathBuf>> {
    let prefix = format!("{package}_");
    for entry in fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let path = entry?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        if name.starts_with(&prefix) && name.ends_with(".deb") {
            return Ok(Some(path));
        }
    }
    Ok(None)
}

fn extract_vmlinux(vmlinuz: &Path, compressed: &Path, vmlinux: &Path) -> Result<()> {
    let image = fs::read(vmlinuz).with_context(|| format!("cannot read {}", vmlinuz.display()))?;
    let start = image
        .windows(XZ_MAGIC.len())
        .position(|window| window == XZ_MAGIC)
        .with_context(|| {
            format!(
                "{} holds no xz stream: has Debian changed the kernel compression?",
                vmlinuz.display()
            )
        })?;
    fs::write(compressed, &image[start..])?;
    // --single-stream stops at the end of the kernel and ignores what follows it.
    let output = File::create(vmlinux)?;
    run(Command::new("xz")
        .args(["--decompress", "--stdout", "--single-stream"])
        .arg(compressed)
        .stdout(output))
    .with_context(|| format!("cannot decompress the kernel inside {}", vmlinuz.display()))?;
    let mut magic = [0; 4];
    std::io::Read::read_exact(&mut File::open(vmlinux)?, &mut magic)?;
    anyhow::ensure!(
        &magic == b"\x7fELF",
        "the xz stream in {} did not decompress to an ELF vmlinux",
        vmlinuz.display()
    );
    Ok(())
}

/// Copies `preload_modules`, every module under `shipped_dirs` and their dependencies from the
/// unpacked package (depmod already run on it) into `stage/lib/modules/VERSION` with a matching
/// modules.dep, and returns the modules /init must load, built-in ones left out.
pub(super) fn stage_modules(
    unpacked: &Path,
    version: &str,
    preload_modules: &[&str],
    shipped_dirs: &[&str],
    stage: &Path,
) -> Result<Vec<String>> {
    let source = unpacked.join("lib/modules").join(version);
    let modules_dep = fs::read_to_string(source.join("modules.dep"))?;
    // Each line lists a module and all of its dependencies, transitively.
    let dependencies: HashMap<&str, Vec<&str>> = modules_dep
        .lines()
        .filter_map(|line| {
            let (module, needs) = line.split_once(':')?;
            Some((module, needs.split_whitespace().collect()))
        })
        .collect();
    let module_paths: HashMap<String, &str> = dependencies
        .keys()
        .map(|path| (module_name(path), *path))
        .collect();
    let builtin: HashSet<String> = fs::read_to_string(source.join("modules.builtin"))?
        .lines()
        .map(module_name)
        .collect();

    let mut preload = Vec::new();
    let mut wanted: BTreeSet<&str> = dependencies
        .keys()
        .copied()
        .filter(|path| shipped_dirs.iter().any(|dir| path.starts_with(dir)))
        .collect();
    for module in preload_modules {
        if builtin.contains(*module) {
            continue;
        }
        let path = module_paths.get(*module).with_context(|| {
            format!("kernel {version} has no module {module}, loadable or built in")
        })?;
        wanted.insert(path);
        preload.push((*module).to_owned());
    }
    let closure: BTreeSet<&str> = wanted
        .iter()
        .flat_map(|path| std::iter::once(*path).chain(dependencies[path].iter().copied()))
        .collect();

    let target = stage.join("lib/modules").join(version);
    for path in &closure {
        let destination = target.join(path);
        fs::create_dir_all(destination.parent().context("module path has no parent")?)?;
        fs::copy(source.join(path), &destination)
            .with_context(|| format!("cannot stage module {path}"))?;
    }
    for index in [
        "modules.builtin",
        "modules.builtin.modinfo",
        "modules.order",
    ] {
        fs::copy(source.join(index), target.join(index))
            .with_context(|| format!("cannot stage {index}"))?;
    }
    // Index only what the guest gets, so its modprobe never looks for a missing file.
    depmod(stage, version)?;
    println!(
        "[xtask] kernel {version}: {} modules staged for the guest",
        closure.len()
    );
    Ok(preload)
}

pub(super) fn depmod(root: &Path, version: &str) -> Result<()> {
    run(Command::new("depmod").arg("-b").arg(root).arg(version))
        .with_context(|| format!("depmod failed for {}", root.display()))
}

/// "kernel/net/netfilter/nf_tables.ko" -> "nf_tables" (modprobe treats - and _ alike).
fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    file.trim_end_matches(".ko").replace('-', "_")
}

/// Removes the cache entries and packages other than the current ones: they
/// belong to older kernels or older harness code (rebuilding one from its
/// package takes seconds, so nothing of value is lost).
fn remove_superseded(cache_dir: &Path, entry: &Path, deb: &Path) -> Result<()> {
    let debs = cache_dir.join("debs");
    let entries = fs::read_dir(cache_dir)?.chain(fs::read_dir(&debs)?);
    for candidate in entries {
        let path = candidate?.path();
        let name = path
            .file_name()
            .and_then(|name| name.to_str())
            .unwrap_or("");
        let superseded = (name.starts_with("linux-") && path.is_dir() && path != entry)
            || (name.ends_with(".deb") && path != deb);
        if superseded {
            println!("[xtask] removing the superseded {}", path.display());
            if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            }
            .with_context(|| format!("cannot remove {}", path.display()))?;
        }
    }
    Ok(())
}

/// A scratch directory in the cache, removed when dropped. If the process dies
/// first, the next run removes it (its name holds the dead owner's pid).
pub(super) struct WorkDir {
    pub(super) path: PathBuf,
}

const WORK_DIR_PREFIX: &str = ".work-";

impl WorkDir {
    pub(super) fn create(cache_dir: &Path, purpose: &str) -> Result<Self> {
        let path = cache_dir.join(format!("{WORK_DIR_PREFIX}{purpose}-{}", std::process::id()));
        if path.exists() {
            fs::remove_dir_all(&path)?;
        }
        fs::create_dir(&path).with_context(|| format!("cannot create {}", path.display()))?;
        Ok(Self { path })
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        // Best effort: a leftover is removed by the next run anyway.
        let _ = fs::remove_dir_all(&self.path);
    }
}

fn remove_abandoned_work_dirs(cache_dir: &Path) -> Result<()> {
    for entry in fs::read_dir(cache_dir)? {
        let path = entry?.path();
        let Some(owner) = path
            .file_name()
            .and_then(|name| name.to_str())
            .filter(|name| name.starts_with(WORK_DIR_PREFIX))
            .and_then(|name| name.rsplit('-').next())
        else {
            continue;
        };
        if !Path::new("/proc").join(owner).exists() {
            println!(
                "[xtask] removing {} left by an interrupted run",
                path.display()
            );
            match fs::remove_dir_all(&path) {
                Err(error) if error.kind() != ErrorKind::NotFound => {
                    return Err(error).with_context(|| format!("cannot remove {}", path.display()));
                }
                _ => {}
            }
        }
    }
    Ok(())
}
