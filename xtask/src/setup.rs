//! Installing what building and testing Sentinel needs on a fresh Debian 12 host,
//! idempotently: each step checks first and says what it does.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result};

use crate::host::{ensure_packages, run};

/// LLVM 22 to build bpf-linker against (the nightly's LLVM), and the libraries it links.
const BUILD_PACKAGES: &[&str] = &[
    "llvm-22-dev",
    "libpolly-22-dev",
    "libzstd-dev",
    "zlib1g-dev",
];
/// Tools the privileged tests drive: iproute2 and nftables build the firewall tests' network
/// namespaces; the SSH suite runs a real sshd and attacks it with ssh through sshpass.
const TEST_PACKAGES: &[&str] = &[
    "iproute2",
    "nftables",
    "openssh-server",
    "openssh-client",
    "sshpass",
];
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

/// Everything `cargo build` of the daemon needs: the nightly toolchain with rust-src (the
/// eBPF crate is built with -Z build-std=core) and bpf-linker.
pub fn build_tools() -> Result<()> {
    ensure_packages("build dependencies", BUILD_PACKAGES)?;
    ensure_nightly_rust_src()?;
    ensure_bpf_linker()
}

/// Build tools plus what the test suites run.
pub fn test_tools(workspace: &Path) -> Result<PathBuf> {
    build_tools()?;
    ensure_packages("test tools", TEST_PACKAGES)?;
    promtool(workspace)
}

fn ensure_nightly_rust_src() -> Result<()> {
    let installed = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("rustup is required (https://rustup.rs) to build the eBPF programs")?;
    if installed.status.success() && String::from_utf8_lossy(&installed.stdout).contains("rust-src")
    {
        println!("[xtask] nightly toolchain with rust-src: already installed");
        return Ok(());
    }
    println!("[xtask] installing the nightly toolchain with rust-src (builds the eBPF programs)");
    run(Command::new("rustup").args([
        "toolchain",
        "install",
        "nightly",
        "--profile",
        "minimal",
        "--component",
        "rust-src",
    ]))
}

fn ensure_bpf_linker() -> Result<()> {
    if Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|output| output.status.success())
    {
        println!("[xtask] bpf-linker: already installed");
        return Ok(());
    }
    println!("[xtask] building bpf-linker against LLVM 22 (takes 1-2 minutes, once)");
    // Without LLVM's bin directory first on PATH its build script looks in /usr and fails.
    let path = format!(
        "{LLVM_PREFIX}/bin:{}",
        std::env::var("PATH").unwrap_or_default()
    );
    run(Command::new("cargo")
        .args([
            "install",
            "--locked",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("PATH", path)
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))
    .context("installing bpf-linker failed")
}

/// promtool, unpacked from Debian's prometheus package into the target directory instead of
/// installing the package, which would also start a Prometheus server on the host.
fn promtool(workspace: &Path) -> Result<PathBuf> {
    let tools = workspace.join("target/tools");
    let promtool = tools.join("prometheus/usr/bin/promtool");
    if promtool.exists() {
        println!("[xtask] promtool: already unpacked");
        return Ok(promtool);
    }
    println!("[xtask] promtool: downloading Debian's prometheus package to unpack promtool");
    let download = tools.join("download");
    std::fs::create_dir_all(&download)?;
    run(Command::new("apt-get")
        .current_dir(&download)
        .args(["download", "prometheus"]))
    .context("apt-get download prometheus failed (run `apt-get update` first?)")?;
    let deb = std::fs::read_dir(&download)?
        .filter_map(|entry| entry.ok().map(|entry| entry.path()))
        .find(|path| path.extension().is_some_and(|ext| ext == "deb"))
        .context("apt-get download left no prometheus .deb")?;
    run(Command::new("dpkg-deb")
        .arg("-x")
        .arg(&deb)
        .arg(tools.join("prometheus")))?;
    std::fs::remove_dir_all(&download)?;
    anyhow::ensure!(
        promtool.exists(),
        "the prometheus package has no usr/bin/promtool"
    );
    Ok(promtool)
}
