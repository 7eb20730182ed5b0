//! The host side of xtask's tasks and of the bench: running commands, root, and Debian packages.

use std::{
    fs,
    os::unix::fs::MetadataExt,
    process::{Command, ExitStatus},
};

use anyhow::{Context, Result, bail};

/// Runs `command`, inheriting stdio; fails unless it exits 0.
pub fn run(command: &mut Command) -> Result<()> {
    let status = status(command)?;
    if !status.success() {
        bail!("`{}` failed: {status}", describe(command));
    }
    Ok(())
}

pub fn status(command: &mut Command) -> Result<ExitStatus> {
    command
        .status()
        .with_context(|| format!("cannot start `{}`", describe(command)))
}

/// Runs `command` and returns its standard output; fails unless it exits 0.
pub fn command_output(command: &mut Command) -> Result<String> {
    let output = command
        .output()
        .with_context(|| format!("cannot start `{}`", describe(command)))?;
    if !output.status.success() {
        bail!(
            "`{}` failed: {}\n{}",
            describe(command),
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    String::from_utf8(output.stdout)
        .with_context(|| format!("`{}` printed non-UTF-8", describe(command)))
}

pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|word| word.to_string_lossy())
        .collect::<Vec<_>>()
        .join(" ")
}

pub fn is_root() -> bool {
    // /proc/self belongs to the effective user of the process reading it.
    fs::metadata("/proc/self").is_ok_and(|metadata| metadata.uid() == 0)
}

/// A command run as root: directly when we are root, through sudo otherwise. sudo resets
/// the environment, so the variables named in `keep_env` are passed on explicitly.
pub fn privileged(program: impl AsRef<std::ffi::OsStr>, keep_env: &[&str]) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut command = Command::new("sudo");
        if !keep_env.is_empty() {
            command.arg(format!("--preserve-env={}", keep_env.join(",")));
        }
        command.arg(program);
        command
    }
}

/// Installs the Debian packages of `packages` that are missing; `purpose` says why in the
/// progress messages. Does nothing, and touches no package list, when all are installed.
pub fn ensure_packages(purpose: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|package| !is_installed(package))
        .collect();
    if missing.is_empty() {
        println!(
            "[xtask] {purpose}: {} already installed",
            packages.join(", ")
        );
        return Ok(());
    }
    println!("[xtask] {purpose}: installing {}", missing.join(", "));
    run(privileged("apt-get", &[]).arg("update").arg("-q"))
        .context("apt-get update failed (are Debian's package servers reachable?)")?;
    run(privileged("apt-get", &["DEBIAN_FRONTEND"])
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(&missing))
    .with_context(|| format!("installing {} failed", missing.join(", ")))?;
    if let Some(package) = missing.iter().find(|package| !is_installed(package)) {
        bail!("apt-get reported success but {package} is still not installed");
    }
    Ok(())
}

pub fn is_installed(package: &str) -> bool {
    // dpkg-query fails for a package it has never seen: that is "not installed" too.
    Command::new("dpkg-query")
        .args(["--show", "--showformat=${db:Status-Status}", package])
        .output()
        .is_ok_and(|query| query.status.success() && query.stdout == b"installed")
}
