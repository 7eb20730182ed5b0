//! `cargo xtask vm-test`: boots Debian's 6.1 kernel under QEMU with a busybox
//! initramfs and runs the privileged suites inside it, where cgroup v2 has the
//! cpu, memory, pids and io controllers (build hosts run hybrid cgroups).
//!
//! Layout under `target/vm/`: `cache/` (kernel package, vmlinux, base
//! initramfs), `build/` (static guest executables), `runs/<id>/` (initramfs,
//! console.log, results.log of one run; kept after a failure or with --keep).

mod borrowed;
mod cpio;
mod elf;
mod initramfs;
mod kernel;
mod payload;
mod qemu;
mod report;
mod systemd_boot;
mod systemd_image;

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};

use payload::Payload;
use qemu::{GuestEnd, VmConfig, VmOutcome};
pub use systemd_boot::{SystemdTestArgs, systemd_test};

/// qemu-system-x86 brings qemu-system-x86_64 and the qboot firmware, busybox-static
/// the guest's userland, kmod depmod, xz-utils the kernel image decompressor;
/// the guest borrows ip from iproute2 and nft from nftables.
const HOST_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "busybox-static",
    "kmod",
    "xz-utils",
    "iproute2",
    "nftables",
];
/// From Debian's busybox-static package.
const BUSYBOX: &str = "/bin/busybox";
/// Generous: a full suite under TCG emulation takes minutes, not tens of them.
const DEFAULT_TIMEOUT_SECS: u64 = 1200;

#[derive(clap::Args)]
pub struct VmTestArgs {
    /// Run only the tests whose names contain this string (passed to every test executable).
    #[arg(long, value_name = "NAME")]
    filter: Option<String>,
    /// Keep target/vm/runs/<id>/ (initramfs, console.log, results.log) after a passing run;
    /// it is always kept after a failure.
    #[arg(long)]
    keep: bool,
    /// Fail if the guest has not given its verdict after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT_SECS)]
    timeout: u64,
    /// Open a shell in the guest on this terminal instead of running the tests
    /// (leave it with `exit` or Ctrl-A x).
    #[arg(long)]
    shell: bool,
    /// Show every kernel message on the console (default: warnings and errors only).
    #[arg(long)]
    kernel_log: bool,
    /// Harness development: copy this directory to /sentinel/payload in the guest
    /// instead of building the suites.
    #[arg(
        long,
        hide = true,
        value_name = "DIR",
        requires = "payload_cmd",
        conflicts_with = "filter"
    )]
    payload_dir: Option<PathBuf>,
    /// Harness development: a shell command to run in the guest (repeatable, one verdict each).
    #[arg(long, hide = true, value_name = "CMD", requires = "payload_dir")]
    payload_cmd: Vec<String>,
}

/// What a plain `cargo xtask vm-test` does (`cargo xtask test` runs it so).
impl Default for VmTestArgs {
    fn default() -> Self {
        Self {
            filter: None,
            keep: false,
            timeout: DEFAULT_TIMEOUT_SECS,
            shell: false,
            kernel_log: false,
            payload_dir: None,
            payload_cmd: Vec::new(),
        }
    }
}

pub fn vm_test(args: &VmTestArgs) -> Result<()> {
    let work = match &args.payload_dir {
        Some(dir) => GuestWork::Dir {
            dir,
            commands: &args.payload_cmd,
        },
        None => GuestWork::Suites {
            filter: args.filter.as_deref(),
        },
    };
    run_vm(args, work).map(drop)
}

/// Boots the guest to run `command` next to the daemon and the bins of sentinel-tests, as a
/// job named `name`; returns the lines the command printed (stdout and stderr).
pub fn run_job(name: &str, command: &str, timeout: Duration) -> Result<Vec<String>> {
    let args = VmTestArgs {
        timeout: timeout.as_secs(),
        ..VmTestArgs::default()
    };
    let job = payload::Job {
        name: name.to_owned(),
        command: command.to_owned(),
    };
    let results = run_vm(&args, GuestWork::Job(job))?;
    let job = results
        .jobs
        .into_iter()
        .next()
        .with_context(|| format!("the guest reported nothing of the job {name}"))?;
    Ok(job.output)
}

/// What the guest runs.
enum GuestWork<'a> {
    /// The VM suites, each test filtered by name.
    Suites { filter: Option<&'a str> },
    /// A developer's directory of executables and commands (--payload-dir, --payload-cmd).
    Dir {
        dir: &'a Path,
        commands: &'a [String],
    },
    /// One job, next to the daemon and the bins of sentinel-tests.
    Job(payload::Job),
}

fn run_vm(args: &VmTestArgs, work: GuestWork) -> Result<report::GuestResults> {
    let started = Instant::now();
    let workspace = crate::workspace_root();
    let vm_dir = vm_dir(&workspace);
    let build_dir = vm_dir.join("build");

    crate::host::ensure_packages("VM host tools", HOST_PACKAGES)?;
    let kernel = kernel::prepare(&cache_dir(&vm_dir))?;
    let mut borrowed_programs = borrowed::standard_programs();
    let mut payload = match work {
        GuestWork::Dir { dir, commands } => payload::from_dir(dir, commands)?,
        GuestWork::Suites { filter } => {
            // The daemon's build needs the eBPF toolchain, its metrics test promtool.
            let promtool = crate::setup::test_tools(&workspace)?;
            borrowed_programs.push((promtool, "/usr/bin/promtool".to_owned()));
            payload::build_suites(&workspace, &build_dir, filter)?
        }
        GuestWork::Job(job) => {
            crate::setup::build_tools(&workspace)?;
            payload::build_for_job(&workspace, &build_dir, job)?
        }
    };
    borrowed::add_to(&mut payload, borrowed_programs)?;

    in_run_dir(&vm_dir, args.keep, started, |run_dir| {
        boot_and_judge(args, &kernel, &payload, run_dir)
    })
}

/// Runs `boot` in a fresh `runs/<id>/` directory, which is kept after a failure (or with
/// `keep`) and removed otherwise.
fn in_run_dir<T>(
    vm_dir: &Path,
    keep: bool,
    started: Instant,
    boot: impl FnOnce(&Path) -> Result<T>,
) -> Result<T> {
    let run_dir = vm_dir.join("runs").join(run_id());
    fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let result = boot(&run_dir);
    println!(
        "[xtask] the VM run took {:.1} s in all",
        started.elapsed().as_secs_f64()
    );
    if result.is_err() {
        println!(
            "[xtask] run files kept for the post-mortem: {}",
            run_dir.display()
        );
    } else if keep {
        println!("[xtask] run files kept (--keep): {}", run_dir.display());
    } else {
        fs::remove_dir_all(&run_dir)
            .with_context(|| format!("cannot remove {}", run_dir.display()))?;
    }
    result
}

fn boot_and_judge(
    args: &VmTestArgs,
    kernel: &kernel::Kernel,
    payload: &Payload,
    run_dir: &Path,
) -> Result<report::GuestResults> {
    let initramfs = run_dir.join("initramfs.cpio");
    initramfs::assemble(&kernel.base_initramfs, payload, &initramfs)?;
    let timeout = Duration::from_secs(args.timeout);
    println!(
        "[xtask] booting Linux {} under QEMU: {} job(s), timeout {} s, console log {}",
        kernel.version,
        payload.jobs.len(),
        args.timeout,
        run_dir.join("console.log").display()
    );
    let outcome = qemu::run(&VmConfig {
        vmlinux: &kernel.vmlinux,
        initramfs: &initramfs,
        run_dir,
        disks: &[],
        kernel_args: "",
        timeout,
        shell: args.shell,
        kernel_log: args.kernel_log,
    })?;
    if args.shell {
        println!(
            "[xtask] guest shell session ended after {:.1} s",
            outcome.wall.as_secs_f64()
        );
        return Ok(report::GuestResults::default());
    }
    print_timing("VM", &outcome);
    judge(&outcome, payload.jobs.len(), timeout)
}

fn print_timing(vm: &str, outcome: &VmOutcome) {
    let boot = outcome.boot.map_or_else(
        || "unknown (/init never printed a line)".to_owned(),
        |boot| format!("{:.1} s", boot.as_secs_f64()),
    );
    println!(
        "[xtask] {vm}: boot to /init {boot}, whole VM run {:.1} s",
        outcome.wall.as_secs_f64()
    );
}

/// Turns the QEMU exit and the guest's results into a verdict. Anything short
/// of an explicit pass for every job is an error.
fn judge(
    outcome: &VmOutcome,
    expected_jobs: usize,
    timeout: Duration,
) -> Result<report::GuestResults> {
    let results_text = fs::read_to_string(&outcome.results_log).unwrap_or_default();
    let results = report::parse(&results_text);
    print_job_results(&results);
    let logs = format!(
        "console log: {}; results log: {}",
        outcome.console_log.display(),
        outcome.results_log.display()
    );
    match outcome.end {
        GuestEnd::Passed => {
            let all_passed = results.jobs.len() == expected_jobs
                && results.jobs.iter().all(|job| job.status == Some(0))
                && results.verdict.as_deref() == Some("pass");
            anyhow::ensure!(
                all_passed,
                "the guest signalled PASS but its results log disagrees ({} of {expected_jobs} \
                 jobs reported, verdict {:?}); {logs}",
                results.jobs.len(),
                results.verdict
            );
            println!("[xtask] VM TESTS PASSED: all {expected_jobs} job(s) exited 0");
            Ok(results)
        }
        GuestEnd::Failed => {
            let failed = results
                .jobs
                .iter()
                .filter(|job| job.status != Some(0))
                .count();
            anyhow::bail!("VM TESTS FAILED: {failed} of {expected_jobs} job(s) failed; {logs}")
        }
        GuestEnd::SetupFailed => anyhow::bail!(
            "VM GUEST SETUP FAILED before any test ran: {}; {logs}",
            results
                .verdict
                .as_deref()
                .and_then(|verdict| verdict.strip_prefix("setup-failed "))
                .unwrap_or("no reason recorded")
        ),
        GuestEnd::NoVerdict => {
            let console = fs::read_to_string(&outcome.console_log).unwrap_or_default();
            match report::kernel_panic(&console) {
                Some(panic) => anyhow::bail!("VM GUEST KERNEL PANIC: {panic}; {logs}"),
                None => anyhow::bail!(
                    "the VM guest stopped WITHOUT A VERDICT (did /init die or the payload \
                     power it off?); {logs}"
                ),
            }
        }
        GuestEnd::TimedOut => anyhow::bail!(
            "VM TIMED OUT: no verdict after {} s, QEMU was killed (a test hung, or the boot \
             did; --kernel-log shows the boot, --timeout SECS allows more time); {logs}",
            timeout.as_secs()
        ),
    }
}

fn print_job_results(results: &report::GuestResults) {
    if results.jobs.is_empty() {
        return;
    }
    println!("[xtask] results from the guest:");
    for job in &results.jobs {
        let state = match job.status {
            Some(0) => "PASS".to_owned(),
            Some(status) => format!("FAIL (exit status {status})"),
            None => "UNFINISHED".to_owned(),
        };
        let duration = match &job.seconds {
            Some(seconds) => format!("{seconds} s"),
            None => "still running when the VM stopped".to_owned(),
        };
        println!("[xtask]   {state:<24} {} ({duration})", job.name);
        for summary in &job.summaries {
            println!("[xtask]       {summary}");
        }
        for test in &job.failed_tests {
            println!("[xtask]       failed: {test}");
        }
    }
}

fn vm_dir(workspace: &Path) -> PathBuf {
    target_dir(workspace).join("vm")
}

fn cache_dir(vm_dir: &Path) -> PathBuf {
    vm_dir.join("cache")
}

fn target_dir(workspace: &Path) -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace.join("target"))
}

/// Unique per run and sorted by start time.
fn run_id() -> String {
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs());
    format!("{seconds}-{}", std::process::id())
}
