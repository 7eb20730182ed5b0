//! Installing what building and testing Sentinel needs on a fresh Debian 12 host,
//! idempotently: each step checks first and says what it does. The toolchains are the ones
//! pinned in the two `rust-toolchain.toml` files (see `sentinel-toolchain`), never whatever
//! `nightly` the machine happens to have.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};
use sentinel_toolchain::{BPF_LINKER_VERSION, EbpfToolchain, Pin, ebpf_pin, stable_pin};

use crate::host::{command_output, ensure_packages, run};

/// Tools the privileged tests drive: iproute2 and nftables build the firewall tests' network
/// namespaces; the SSH suite runs a real sshd and attacks it with ssh through sshpass; the
/// operator suite drives `sentinel top` in tmux; the fleet suite makes its LAPI's certificates
/// with openssl.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "openssh-server",
    "openssh-client",
    "sshpass",
    "tmux",
    "openssl",
    "nmap",
];

/// Everything `cargo build` of the daemon needs: both pinned toolchains with their components,
/// and a bpf-linker built for the eBPF toolchain's LLVM.
pub fn build_tools(workspace: &Path) -> Result<()> {
    ensure_toolchain("user-space toolchain", &stable_pin())?;
    ensure_toolchain("eBPF toolchain", &ebpf_pin())?;
    let toolchain = EbpfToolchain::installed()?;
    println!(
        "[xtask] eBPF toolchain {} emits LLVM {} bitcode",
        toolchain.channel, toolchain.llvm_major
    );
    ensure_bpf_linker(workspace, &toolchain)
}

/// Build tools plus what the test suites run.
pub fn test_tools(workspace: &Path) -> Result<PathBuf> {
    build_tools(workspace)?;
    ensure_packages("test tools", TEST_PACKAGES)?;
    crowdsec(workspace)?;
    promtool(workspace)
}

/// The cargo-fuzz release that builds and runs the fuzz targets.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

/// cargo-fuzz, built into its own root under target/tools unless that version is there. It runs
/// with the eBPF nightly, which needs none of its components for that: the sanitizers' runtimes
/// ship with the compiler, and rust-src would only be needed for `--build-std`.
pub fn cargo_fuzz(workspace: &Path) -> Result<PathBuf> {
    let root = workspace
        .join("target/tools")
        .join(format!("cargo-fuzz-{CARGO_FUZZ_VERSION}"));
    let cargo_fuzz = root.join("bin/cargo-fuzz");
    let expected = format!("cargo-fuzz {CARGO_FUZZ_VERSION}");
    match command_output(Command::new(&cargo_fuzz).arg("--version")) {
        Ok(version) if version.trim() == expected => {
            println!("[xtask] {expected}: already installed");
            return Ok(cargo_fuzz);
        }
        Ok(version) => println!(
            "[xtask] {} is {}; rebuilding it",
            cargo_fuzz.display(),
            version.trim()
        ),
        Err(_) => {}
    }
    println!(
        "[xtask] building cargo-fuzz {CARGO_FUZZ_VERSION} into {} (about 2 minutes, once)",
        root.display()
    );
    run(Command::new("cargo")
        .args(["install", "--locked", "cargo-fuzz", "--version"])
        .arg(format!("={CARGO_FUZZ_VERSION}"))
        .arg("--root")
        .arg(&root))
    .context("building cargo-fuzz failed")?;
    Ok(cargo_fuzz)
}

/// Installs a pinned toolchain and the components its file lists, unless all are there.
fn ensure_toolchain(purpose: &str, pin: &Pin) -> Result<()> {
    let installed = Command::new("rustup")
        .args([
            "component",
            "list",
            "--installed",
            "--toolchain",
            pin.channel,
        ])
        .output()
        .context("rustup is required (https://rustup.rs): it installs the pinned toolchains")?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    let missing: Vec<&str> = pin
        .components
        .iter()
        .copied()
        .filter(|component| {
            // Components are listed with their target (`clippy-x86_64-unknown-linux-gnu`),
            // except target-independent ones (`rust-src`).
            !listed.lines().any(|line| {
                line.strip_prefix(component)
                    .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
            })
        })
        .collect();
    if installed.status.success() && missing.is_empty() {
        println!(
            "[xtask] {purpose} {} with {}: already installed",
            pin.channel,
            pin.components.join(", ")
        );
        return Ok(());
    }
    println!(
        "[xtask] installing the {purpose} {} with {}",
        pin.channel,
        pin.components.join(", ")
    );
    run(Command::new("rustup")
        .args(["toolchain", "install", pin.channel, "--profile", "minimal"])
        .args(
            pin.components
                .iter()
                .flat_map(|component| ["--component", component]),
        ))
    .with_context(|| format!("installing the toolchain {} failed", pin.channel))
}

/// Builds bpf-linker for the eBPF toolchain's LLVM into its own root under target/tools, unless
/// a working one made for that LLVM is there; a broken or mismatched one is rebuilt.
fn ensure_bpf_linker(workspace: &Path, toolchain: &EbpfToolchain) -> Result<()> {
    let major = toolchain.llvm_major;
    match toolchain.bpf_linker(workspace) {
        Ok(path) => {
            println!(
                "[xtask] bpf-linker {BPF_LINKER_VERSION} for LLVM {major}: already installed ({})",
                path.display()
            );
            return Ok(());
        }
        Err(sentinel_toolchain::Error::LinkerMissing { .. }) => {}
        Err(problem) => println!("[xtask] {problem}; rebuilding it"),
    }
    ensure_packages(
        &format!("LLVM {major} to build bpf-linker against"),
        &[
            &format!("llvm-{major}-dev"),
            &format!("libpolly-{major}-dev"),
            "libzstd-dev",
            "zlib1g-dev",
        ],
    )
    .with_context(|| {
        format!(
            "the eBPF toolchain {} emits LLVM {major} bitcode, so bpf-linker must be built \
             against LLVM {major} from Debian's llvm-{major}-dev; if Debian has no such package, \
             pin a nightly whose LLVM it has (README: Toolchains)",
            toolchain.channel
        )
    })?;
    let root = toolchain.bpf_linker_root(workspace);
    if root.exists() {
        std::fs::remove_dir_all(&root)
            .with_context(|| format!("cannot remove the old {}", root.display()))?;
    }
    println!(
        "[xtask] building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} into {} \
         (1-2 minutes, once)",
        root.display()
    );
    let llvm_prefix = format!("/usr/lib/llvm-{major}");
    // Without LLVM's bin directory first on PATH, llvm-sys looks in /usr and fails.
    let path = format!(
        "{llvm_prefix}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args(["install", "--locked", "bpf-linker", "--version"])
        .arg(format!("={BPF_LINKER_VERSION}"))
        .args(["--no-default-features", "--features"])
        .arg(format!("llvm-{major}"))
        .arg("--root")
        .arg(&root)
        .env("PATH", path)
        .env(format!("LLVM_SYS_{major}1_PREFIX"), &llvm_prefix))
    .context("building bpf-linker failed")?;
    let linker = toolchain.bpf_linker(workspace)?;
    println!(
        "[xtask] bpf-linker: {}",
        command_output(Command::new(&linker).arg("--version"))?.trim()
    );
    Ok(())
}
/// promtool, unpacked from Debian's prometheus package into the target directory instead of
/// installing the package, which would also start a Prometheus server on the host.
fn promtool(workspace: &Path) -> Result<PathBuf> {
    unpacked_tool(workspace, "prometheus", None, "usr/bin/promtool")
}

/// The Debian crowdsec release the fleet suite runs: its Local API's quirks are pinned with it.
pub const CROWDSEC_VERSION: &str = "1.4.6-6~deb12u1+b1";

/// `crowdsec` and `cscli`, unpacked from Debian's crowdsec package (pinned) into the target
/// directory: installing it would start a CrowdSec service on the host. Returns the directory
/// the package was unpacked into.
pub fn crowdsec(workspace: &Path) -> Result<PathBuf> {
    let crowdsec = unpacked_tool(
        workspace,
        "crowdsec",
        Some(CROWDSEC_VERSION),
        "usr/bin/crowdsec",
    )?;
    Ok(crowdsec
        .ancestors()
        .nth(3)
        .context("usr/bin/crowdsec has a root")?
        .to_path_buf())
}

/// The Debian crowdsec-firewall-bouncer release the fleet bench compares Sentinel with.
pub const FIREWALL_BOUNCER_VERSION: &str = "0.0.25-4~deb12u1";

/// CrowdSec's own nftables bouncer, unpacked from Debian's package (pinned) into the target
/// directory: installing it would start it on the host, against the host's ruleset. Returns
/// its binary.
pub fn firewall_bouncer(workspace: &Path) -> Result<PathBuf> {
    unpacked_tool(
        workspace,
        "crowdsec-firewall-bouncer",
        Some(FIREWALL_BOUNCER_VERSION),
        "usr/bin/crowdsec-firewall-bouncer",
    )
}

/// `binary` of Debian's `package` (at `version`, when pinned), unpacked once into
/// target/tools/<package>[-<version>].
fn unpacked_tool(
    workspace: &Path,
    package: &str,
    version: Option<&str>,
    binary: &str,
) -> Result<PathBuf> {
    let tools = workspace.join("target/tools");
    let root = match version {
        Some(version) => tools.join(format!("{package}-{version}")),
        None => tools.join(package),
    };
    let tool = root.join(binary);
    let name = binary.rsplit('/').next().unwrap_or(binary);
    if tool.exists() {
        println!("[xtask] {name}: already unpacked");
        return Ok(tool);
    }
    println!("[xtask] {name}: downloading Debian's {package} package to unpack it");
    let download = tools.join(format!("download-{package}"));
    std::fs::create_dir_all(&download)?;
    let wanted = match version {
        Some(version) => format!("{package}={version}"),
        None => package.to_owned(),
    };
    run(Command::new("apt-get")
        .current_dir(&download)
        .args(["download", &wanted]))
    .with_context(|| format!("apt-get download {wanted} failed (run `apt-get update` first?)"))?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .with_context(|| format!("apt-get download left no {package} .deb"))?;
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    std::fs::remove_dir_all(&download)?;
    anyhow::ensure!(tool.exists(), "the {package} package has no {binary}");
    Ok(tool)
}
