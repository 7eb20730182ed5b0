//! Developer tasks: `cargo xtask run | test | lint | setup | fuzz | deb | vm-test |
//! systemd-test | fresh-check | bench`.

mod deb;
mod fresh_check;
mod fuzz;
mod setup;
mod vm;

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use sentinel_host as host;

use crate::host::{privileged, run};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark Sentinel")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what is missing, build, and run the daemon in the foreground (as root).
    /// Arguments after `--` go to `sentinel run`, e.g. `cargo xtask run -- --log-format json`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// Install what is missing, then run every check: formatting, lints, unit tests, the
    /// privileged tests on this kernel, the cgroup v2 tests in a VM, and the package on a
    /// systemd VM.
    Test {
        /// Skip the VM suites (they are part of the full test; use only while iterating).
        #[arg(long)]
        skip_vm: bool,
    },
    /// Formatting and clippy, for the user-space crates and the eBPF crate separately.
    Lint,
    /// Install the build and test dependencies only.
    Setup,
    /// Build the Debian package, target/debian/sentinel_<version>_amd64.deb, and lintian it.
    Deb,
    /// Build the fuzz targets in fuzz/ and run each for a while; fails on any crash.
    Fuzz(fuzz::FuzzArgs),
    /// Boot a Debian kernel under QEMU and run the privileged suites inside it.
    VmTest(vm::VmTestArgs),
    /// Boot a Debian 12 guest with real systemd under QEMU, install the package and check the
    /// service (as root: the guest image is built with mmdebstrap).
    SystemdTest(vm::SystemdTestArgs),
    /// Prove that a fresh machine builds and tests Sentinel: a clean clone, empty RUSTUP_HOME
    /// and CARGO_HOME with a floating nightly as default, then the steps CI runs.
    FreshCheck(fresh_check::FreshCheckArgs),
    /// Measure Sentinel's overhead and footprint side by side with its peers (as root).
    Bench(sentinel_bench::BenchArgs),
}

fn main() -> Result<()> {
    let workspace = workspace_root();
    match Cli::parse().command {
        Task::Run { args } => run_daemon(&workspace, &args),
        Task::Test { skip_vm } => test(&workspace, skip_vm),
        Task::Lint => lint(&workspace),
        Task::Setup => {
            setup::test_tools(&workspace)?;
            setup::cargo_fuzz(&workspace).map(drop)
        }
        Task::Fuzz(args) => {
            setup::build_tools(&workspace)?;
            fuzz::fuzz(&workspace, &setup::cargo_fuzz(&workspace)?, &args)
        }
        Task::Deb => deb::build(&workspace).map(drop),
        Task::VmTest(args) => vm::vm_test(&args),
        Task::SystemdTest(args) => vm::systemd_test(&args),
        Task::FreshCheck(args) => fresh_check::fresh_check(&workspace, &args),
        Task::Bench(args) => sentinel_bench::bench(&args, &workspace, &BenchDriver(&workspace)),
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives inside the workspace")
        .to_path_buf()
}

fn cargo(workspace: &Path) -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace);
    command
}

/// Privileged suites that run on the build host's own kernel (the VM suite needs cgroup v2
/// controllers, which build hosts lack).
const HOST_SUITES: [&str; 9] = [
    "foundation",
    "firewall",
    "ssh_guard",
    "exhaustion",
    "config_input",
    "crowdsec",
    "operator_view",
    "containment",
    "probing",
];

/// Each fuzz target's share of `cargo xtask test`; longer runs are `cargo xtask fuzz --seconds N`.
const FUZZ_SECONDS_IN_TEST: u64 = 60;

fn step(title: &str) {
    println!("[xtask] === {title}");
}

fn run_daemon(workspace: &Path, args: &[OsString]) -> Result<()> {
    setup::build_tools(workspace)?;
    step("building the daemon (release)");
    run(cargo(workspace).args(["build", "--release", "-p", "sentinel-user"]))?;
    let daemon = workspace.join("target/release/sentinel");
    step("starting sentinel (Ctrl-C to stop)");
    run(privileged(&daemon, &["SENTINEL_LOG"]).arg("run").args(args))
        .context("sentinel exited with an error")
}

/// What the bench needs of xtask: the release daemon, built as `cargo xtask run` builds it,
/// and the VM.
struct BenchDriver<'a>(&'a Path);

impl sentinel_bench::Driver for BenchDriver<'_> {
    fn build_daemon(&self) -> Result<PathBuf> {
        setup::build_tools(self.0)?;
        run(cargo(self.0).args(["build", "--release", "-p", "sentinel-user"]))?;
        Ok(self.0.join("target/release/sentinel"))
    }

    fn run_vm_job(&self, name: &str, command: &str, timeout: Duration) -> Result<Vec<String>> {
        vm::run_job(name, command, timeout)
    }

    fn fleet_tools(&self) -> Result<sentinel_bench::FleetTools> {
        Ok(sentinel_bench::FleetTools {
            crowdsec: setup::crowdsec(self.0)?,
            firewall_bouncer: setup::firewall_bouncer(self.0)?,
        })
    }
}

fn lint(workspace: &Path) -> Result<()> {
    step("rustfmt");
    run(cargo(workspace).args(["fmt", "--all", "--check"]))?;
    step("clippy: user space");
    run(cargo(workspace).args([
        "clippy",
        "--workspace",
        "--exclude",
        "sentinel-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    step("clippy: eBPF");
    // The eBPF crate builds with its pinned nightly (-Z build-std), through rustup.
    run(Command::new("rustup").current_dir(workspace).args([
        "run",
        sentinel_toolchain::ebpf_pin().channel,
        "cargo",
        "clippy",
        "-p",
        "sentinel-ebpf",
        "--release",
        "--target",
        "bpfel-unknown-none",
        "-Z",
        "build-std=core",
        "--",
        "-D",
        "warnings",
    ]))
}

fn test(workspace: &Path, skip_vm: bool) -> Result<()> {
    let promtool = setup::test_tools(workspace)?;
    let cargo_fuzz = setup::cargo_fuzz(workspace)?;
    lint(workspace)?;
    step("Prometheus rules");
    run(Command::new(&promtool).current_dir(workspace).args([
        "check",
        "rules",
        "deploy/prometheus/sentinel-rules.yml",
    ]))?;
    // Every alert fires when it must and stays quiet when it must.
    run(Command::new(&promtool)
        .current_dir(workspace.join("deploy/prometheus"))
        .args(["test", "rules", "sentinel-rules.test.yml"]))?;
    step("unit tests");
    run(cargo(workspace).args([
        "test",
        "--workspace",
        "--exclude",
        "sentinel-ebpf",
        "--exclude",
        "sentinel-tests",
    ]))?;
    fuzz::fuzz(
        workspace,
        &cargo_fuzz,
        &fuzz::FuzzArgs {
            seconds: FUZZ_SECONDS_IN_TEST,
            target: None,
        },
    )?;
    step("privileged tests on this kernel");
    run(cargo(workspace).args(["build", "-p", "sentinel-user"]))?;
    let mut privileged_tests = cargo(workspace);
    privileged_tests
        .args(["test", "-p", "sentinel-tests"])
        .args(HOST_SUITES.iter().flat_map(|suite| ["--test", suite]))
        .env("SENTINEL_PROMTOOL", &promtool)
        .env("SENTINEL_CROWDSEC", setup::crowdsec(workspace)?);
    if !host::is_root() {
        // Only the test binaries need root; cargo itself runs as the user.
        privileged_tests.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER", "sudo -E");
    }
    run(&mut privileged_tests)?;
    if skip_vm {
        println!(
            "[xtask] VM suites SKIPPED (--skip-vm): cgroup v2 enforcement and the package on \
             systemd were not tested"
        );
        return Ok(());
    }
    step("cgroup v2 tests in a VM");
    vm::vm_test(&vm::VmTestArgs::default())?;
    step("the Debian package on a systemd VM");
    vm::systemd_test(&vm::SystemdTestArgs::default())
}
