//! `cargo xtask deb`: the Debian package, `target/debian/sentinel_<version>_amd64.deb`, built
//! by cargo-deb from `[package.metadata.deb]` in sentinel-user's Cargo.toml and checked with
//! lintian. cargo-deb writes the systemd maintainer-script parts the way debhelper does
//! (deb-systemd-helper, deb-systemd-invoke) into `deploy/debian/`'s scripts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::host::{command_output, ensure_packages, run};

const CARGO_DEB_VERSION: &str = "3.8.0";
/// dpkg-dev gives cargo-deb dpkg-shlibdeps (the libc dependency), binutils strip.
const PACKAGING_PACKAGES: &[&str] = &["dpkg-dev", "binutils", "lintian"];

/// Builds the package and returns its path.
pub fn build(workspace: &Path) -> Result<PathBuf> {
    crate::setup::build_tools(workspace)?;
    ensure_packages("Debian packaging", PACKAGING_PACKAGES)?;
    let cargo_deb = ensure_cargo_deb(workspace)?;
    crate::step("Debian package (release build, stripped)");
    let out_dir = workspace.join("target/debian");
    if out_dir.exists() {
        // Only the package of this build is left there, for `apt install ./target/debian/*.deb`.
        fs::remove_dir_all(&out_dir)
            .with_context(|| format!("cannot empty {}", out_dir.display()))?;
    }
    let printed = command_output(
        Command::new(&cargo_deb)
            .current_dir(workspace)
            .args(["--package", "sentinel-user", "--output"])
            .arg(&out_dir),
    )
    .context("cargo-deb failed")?;
    // cargo-deb prints the path of the package it wrote as its last line.
    let deb = PathBuf::from(
        printed
            .lines()
            .last()
            .context("cargo-deb did not name the package it wrote")?
            .trim(),
    );
    anyhow::ensure!(
        deb.is_file(),
        "cargo-deb named {}, which does not exist",
        deb.display()
    );
    println!("[xtask] package: {}", deb.display());
    crate::step("lintian");
    // Errors fail the build; warnings are printed, and each one left is justified by an
    // override in deploy/debian/.
    run(Command::new("lintian")
        .args(["--fail-on", "error", "--display-info"])
        .arg(&deb))
    .context("lintian found errors in the package")?;
    Ok(deb)
}

/// cargo-deb, pinned, in its own root under target/tools, built once.
fn ensure_cargo_deb(workspace: &Path) -> Result<PathBuf> {
    let root = workspace
        .join("target/tools")
        .join(format!("cargo-deb-{CARGO_DEB_VERSION}"));
    let cargo_deb = root.join("bin/cargo-deb");
    let installed = Command::new(&cargo_deb)
        .arg("--version")
        .output()
        .is_ok_and(|output| {
            output.status.success()
                && String::from_utf8_lossy(&output.stdout).contains(CARGO_DEB_VERSION)
        });
    if installed {
        println!("[xtask] cargo-deb {CARGO_DEB_VERSION}: already installed");
        return Ok(cargo_deb);
    }
    println!(
        "[xtask] building cargo-deb {CARGO_DEB_VERSION} into {} (once)",
        root.display()
    );
    run(crate::cargo(workspace)
        .args(["install", "--locked", "cargo-deb", "--version"])
        .arg(format!("={CARGO_DEB_VERSION}"))
        .arg("--root")
        .arg(&root))
    .context("building cargo-deb failed")?;
    Ok(cargo_deb)
}
