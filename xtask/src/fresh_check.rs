//! `cargo xtask fresh-check`: what a new machine does with the project, run here. A clean clone of
//! the committed HEAD is built and tested with empty `RUSTUP_HOME` and `CARGO_HOME` (only rustup's
//! proxies, and a floating `nightly` as the default toolchain, as a machine image may have), by
//! exactly the steps CI runs: `rustup toolchain install` (the pinned stable), `cargo xtask setup`,
//! `cargo xtask test`. Each phase is timed; the check fails on the first step that fails.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};

use crate::host::{command_output, run};

#[derive(clap::Args)]
pub struct FreshCheckArgs {
    /// Leave out the VM suite of `cargo xtask test` (only while iterating).
    #[arg(long)]
    skip_vm: bool,
    /// Keep the clone and the toolchain homes (in target/fresh-check) for inspection.
    #[arg(long)]
    keep: bool,
}

/// Variables that would tie the clone's build to this machine's toolchains: rustup and cargo set
/// them for the commands they run, and `cargo xtask` itself runs under cargo.
fn inherited_from_this_build(name: &str) -> bool {
    name.starts_with("CARGO")
        || name.starts_with("RUSTUP_TOOLCHAIN")
        || name.starts_with("RUSTC")
        || name.starts_with("RUSTDOC")
        || name == "RUSTFLAGS"
}

pub fn fresh_check(workspace: &Path, args: &FreshCheckArgs) -> Result<()> {
    let base = workspace.join("target/fresh-check");
    if base.exists() {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove the previous {}", base.display()))?;
    }
    let clone = base.join("clone");
    let rustup_home = base.join("rustup");
    let cargo_home = base.join("cargo");
    std::fs::create_dir_all(&base)?;

    let dirty = command_output(
        Command::new("git")
            .current_dir(workspace)
            .args(["status", "--porcelain"]),
    )?;
    if !dirty.trim().is_empty() {
        println!("[xtask] note: uncommitted changes are not part of the check (it clones HEAD)");
    }
    run(Command::new("git")
        .args(["clone", "--quiet", "--no-hardlinks"])
        .arg(workspace)
        .arg(&clone))?;
    let head = command_output(Command::new("git").current_dir(&clone).args([
        "log",
        "-1",
        "--format=%h %s",
    ]))?;
    println!("[xtask] fresh-check of {}", head.trim());

    let environment = FreshEnvironment::new(&rustup_home, &cargo_home)?;
    let mut phases: Vec<(&str, Duration)> = Vec::new();

    let started = Instant::now();
    crate::step("fresh-check: rustup's proxies and a floating nightly as the default toolchain");
    let rustup_init = base.join("rustup-init");
    std::fs::copy(find_rustup()?, &rustup_init).context("cannot copy rustup")?;
    run(environment.command(&rustup_init, &base).args([
        "-y",
        "--no-modify-path",
        "--profile",
        "minimal",
        "--default-toolchain",
        "nightly",
    ]))?;
    let default_nightly = command_output(
        environment
            .command(cargo_home.join("bin/rustup"), &base)
            .args(["run", "nightly", "rustc", "-vV"]),
    )?;
    phases.push(("toolchain homes", started.elapsed()));

    let started = Instant::now();
    crate::step("fresh-check: rustup toolchain install (the stable pinned in rust-toolchain.toml)");
    run(environment
        .command(cargo_home.join("bin/rustup"), &clone)
        .args(["toolchain", "install"]))?;
    phases.push(("rustup toolchain install", started.elapsed()));

    let started = Instant::now();
    crate::step("fresh-check: cargo xtask setup");
    run(environment
        .command(cargo_home.join("bin/cargo"), &clone)
        .args(["xtask", "setup"]))?;
    phases.push(("cargo xtask setup", started.elapsed()));

    let started = Instant::now();
    crate::step("fresh-check: cargo xtask test");
    let mut test = environment.command(cargo_home.join("bin/cargo"), &clone);
    test.args(["xtask", "test"]);
    if args.skip_vm {
        test.arg("--skip-vm");
    }
    run(&mut test)?;
    phases.push(("cargo xtask test", started.elapsed()));

    let pin = sentinel_toolchain::ebpf_pin().channel;
    let pinned = command_output(
        environment
            .command(cargo_home.join("bin/rustup"), &clone)
            .args(["run", pin, "rustc", "-vV"]),
    )?;
    println!(
        "[xtask] fresh-check passed{}. Default `nightly`: {} (LLVM {}); eBPF pin {pin}: LLVM {}",
        if args.skip_vm {
            " (VM suite skipped)"
        } else {
            ""
        },
        first_line(&default_nightly),
        llvm(&default_nightly),
        llvm(&pinned),
    );
    for (phase, took) in &phases {
        println!("[xtask]   {phase:<26} {:>7.1} s", took.as_secs_f64());
    }
    let total: Duration = phases.iter().map(|(_, took)| *took).sum();
    println!("[xtask]   {:<26} {:>7.1} s", "total", total.as_secs_f64());
    if !args.keep {
        std::fs::remove_dir_all(&base)
            .with_context(|| format!("cannot remove {}", base.display()))?;
    }
    Ok(())
}

fn first_line(text: &str) -> &str {
    text.lines().next().unwrap_or_default()
}

fn llvm(rustc_verbose_version: &str) -> String {
    sentinel_toolchain::llvm_major(rustc_verbose_version)
        .map_or_else(|| "unknown".to_owned(), |major| major.to_string())
}

/// The rustup executable this machine has (its proxies are copies of it).
fn find_rustup() -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("rustup"))
        .find(|candidate| candidate.is_file())
        .context("rustup is not on PATH: the check starts from rustup alone")
}

/// This process's environment without its toolchains: empty homes, their proxies first on
/// `PATH`, and no directory that holds another rustup or cargo.
struct FreshEnvironment {
    variables: Vec<(OsString, OsString)>,
}

impl FreshEnvironment {
    fn new(rustup_home: &Path, cargo_home: &Path) -> Result<Self> {
        let old_path = std::env::var_os("PATH").unwrap_or_default();
        let kept = std::env::split_paths(&old_path)
            .filter(|dir| !dir.join("rustup").exists() && !dir.join("cargo").exists());
        let path = std::env::join_paths(std::iter::once(cargo_home.join("bin")).chain(kept))
            .context("PATH")?;
        let mut variables: Vec<(OsString, OsString)> = std::env::vars_os()
            .filter(|(name, _)| {
                let name = name.to_string_lossy();
                !inherited_from_this_build(&name) && name != "PATH" && name != "RUSTUP_HOME"
            })
            .collect();
        variables.push(("PATH".into(), path));
        variables.push(("RUSTUP_HOME".into(), rustup_home.into()));
        variables.push(("CARGO_HOME".into(), cargo_home.into()));
        Ok(Self { variables })
    }

    fn command(&self, program: impl AsRef<std::ffi::OsStr>, dir: &Path) -> Command {
        let mut command = Command::new(program);
        command
            .current_dir(dir)
            .env_clear()
            .envs(self.variables.iter().map(|(name, value)| (name, value)));
        command
    }
}
