//! What runs in the guest: the suites of `sentinel-tests` with the daemon, built
//! as static executables, or (for harness development) a directory of arbitrary
//! executables and commands.

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, Result};
use serde_json::Value;

use super::elf::require_static_executable;

const GUEST_TRIPLE: &str = "x86_64-unknown-linux-gnu";
const DAEMON_PACKAGE: &str = "sentinel-user";
const DAEMON_BIN: &str = "sentinel";
const TESTS_PACKAGE: &str = "sentinel-tests";
/// Guest directories; guest_init.sh puts the first two on PATH. Test executables
/// sit in deps/ below the bins, as in cargo's target directory, where tests look
/// for helper executables one level up.
const GUEST_BIN_DIR: &str = "/sentinel/bin";
const GUEST_PAYLOAD_DIR: &str = "/sentinel/payload";
const GUEST_TESTS_DIR: &str = "/sentinel/bin/deps";

/// One command the guest runs; each gets its own exit status in the verdict.
pub struct Job {
    pub name: String,
    pub command: String,
}

pub struct Payload {
    /// Host files or directory trees, and where they appear in the guest.
    pub copies: Vec<(PathBuf, String)>,
    /// Guest symlinks: (link, target).
    pub links: Vec<(String, String)>,
    pub jobs: Vec<Job>,
}

/// A directory of the developer's executables, placed at /sentinel/payload, and
/// shell commands to run there.
pub fn from_dir(dir: &Path, commands: &[String]) -> Result<Payload> {
    anyhow::ensure!(
        dir.is_dir(),
        "--payload-dir {} is not a directory",
        dir.display()
    );
    let jobs = commands
        .iter()
        .enumerate()
        .map(|(index, command)| Job {
            name: format!("payload-{}", index + 1),
            command: command.clone(),
        })
        .collect();
    Ok(Payload {
        copies: vec![(dir.to_owned(), GUEST_PAYLOAD_DIR.to_owned())],
        links: Vec::new(),
        jobs,
    })
}

/// The suites that run in the VM: the cgroup v2 suite, which needs its controllers, and the
/// foundation and firewall suites, which prove the same programs on this second kernel. (The
/// SSH suite runs on the host, which has OpenSSH.)
const VM_SUITES: [&str; 3] = ["vm_cgroup", "foundation", "firewall"];

/// Builds the daemon, the bins of sentinel-tests and the VM suites as static executables;
/// one job per suite.
pub fn build_suites(workspace: &Path, build_dir: &Path, filter: Option<&str>) -> Result<Payload> {
    let (mut payload, mut guest_paths) = build_bins(workspace, build_dir)?;
    let mut test_build = vec!["test", "--release", "-p", TESTS_PACKAGE, "--no-run"];
    test_build.extend(VM_SUITES.iter().flat_map(|suite| ["--test", suite]));
    let tests = cargo_executables(workspace, build_dir, &test_build)?;
    let filter_argument = filter.map(shell_quote).unwrap_or_default();
    for test in tests.iter().filter(|artifact| artifact.test_harness) {
        // A bin and its unit-test harness share a target name; the kind tells them apart.
        let name = format!("{}-{}", test.kind, test.target);
        let guest_path = format!("{GUEST_TESTS_DIR}/{name}");
        payload.jobs.push(Job {
            name,
            command: format!("{guest_path} --test-threads=1 {filter_argument}")
                .trim_end()
                .to_owned(),
        });
        add_executable(&mut payload, &mut guest_paths, test, guest_path)?;
    }
    payload.jobs.sort_by(|a, b| a.name.cmp(&b.name));
    anyhow::ensure!(
        !payload.jobs.is_empty(),
        "cargo built no test executable for {TESTS_PACKAGE}: nothing to run in the VM"
    );
    Ok(payload)
}

/// Builds the daemon and the bins of sentinel-tests as static executables, to run `job`.
pub fn build_for_job(workspace: &Path, build_dir: &Path, job: Job) -> Result<Payload> {
    let (mut payload, _) = build_bins(workspace, build_dir)?;
    payload.jobs.push(job);
    Ok(payload)
}

/// The daemon and the bins of sentinel-tests, built as static executables, in a payload
/// without jobs; with the guest paths they take.
fn build_bins(workspace: &Path, build_dir: &Path) -> Result<(Payload, HashSet<String>)> {
    println!(
        "[xtask] building static guest executables in {} (target {GUEST_TRIPLE})",
        build_dir.display()
    );
    let bins = cargo_executables(
        workspace,
        build_dir,
        &[
            "build",
            "--release",
            "-p",
            DAEMON_PACKAGE,
            "-p",
            TESTS_PACKAGE,
            "--bins",
        ],
    )?;
    let mut payload = Payload {
        copies: Vec::new(),
        links: Vec::new(),
        jobs: Vec::new(),
    };
    let mut guest_paths = HashSet::new();
    for bin in &bins {
        let guest_path = format!("{GUEST_BIN_DIR}/{}", bin.target);
        // Tests find helpers through env!("CARGO_BIN_EXE_<name>"), a host path
        // compiled in: the same path in the guest leads to the copy.
        let host_path = bin.path.to_str().context("executable path is not UTF-8")?;
        payload
            .links
            .push((host_path.to_owned(), guest_path.clone()));
        add_executable(&mut payload, &mut guest_paths, bin, guest_path)?;
    }
    anyhow::ensure!(
        guest_paths.contains(&format!("{GUEST_BIN_DIR}/{DAEMON_BIN}")),
        "cargo built no `{DAEMON_BIN}` executable for {DAEMON_PACKAGE}"
    );
    Ok((payload, guest_paths))
}

struct Artifact {
    target: String,
    kind: String,
    test_harness: bool,
    path: PathBuf,
}

fn add_executable(
    payload: &mut Payload,
    guest_paths: &mut HashSet<String>,
    artifact: &Artifact,
    guest_path: String,
) -> Result<()> {
    require_static_executable(&artifact.path)?;
    anyhow::ensure!(
        guest_paths.insert(guest_path.clone()),
        "two executables would both be {guest_path} in the guest"
    );
    payload.copies.push((artifact.path.clone(), guest_path));
    Ok(())
}

/// Runs a cargo command for the guest target and returns the executables it
/// reports in its JSON messages.
fn cargo_executables(workspace: &Path, build_dir: &Path, args: &[&str]) -> Result<Vec<Artifact>> {
    let mut cargo = crate::cargo(workspace);
    cargo
        .args(args)
        .args([
            "--target",
            GUEST_TRIPLE,
            "--message-format=json-render-diagnostics",
        ])
        .arg("--target-dir")
        .arg(build_dir)
        // With --target, RUSTFLAGS reaches only target code: build scripts and
        // proc macros stay dynamic, as they run on the host.
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .stdout(Stdio::piped());
    let command_line = format!("cargo {}", args.join(" "));
    println!("[xtask] {command_line} --target {GUEST_TRIPLE}");
    let mut child = cargo
        .spawn()
        .with_context(|| format!("cannot start {command_line}"))?;
    let stdout = child.stdout.take().context("cargo stdout is not piped")?;
    let mut artifacts = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let message: Value = match serde_json::from_str(&line?) {
            Ok(message) => message,
            // Build scripts may print plain text on stdout: not ours to parse.
            Err(_) => continue,
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let Some(path) = message["executable"].as_str() else {
            continue;
        };
        artifacts.push(Artifact {
            target: message["target"]["name"]
                .as_str()
                .context("cargo artifact without a target name")?
                .to_owned(),
            kind: message["target"]["kind"][0]
                .as_str()
                .context("cargo artifact without a target kind")?
                .to_owned(),
            test_harness: message["profile"]["test"].as_bool().unwrap_or(false),
            path: PathBuf::from(path),
        });
    }
    let status = child.wait()?;
    anyhow::ensure!(
        status.success(),
        "{command_line} failed ({status}); the compiler errors are above"
    );
    Ok(artifacts)
}

/// Quotes a word for the guest's sh.
fn shell_quote(word: &str) -> String {
    format!("'{}'", word.replace('\'', r"'\''"))
}
