//! Runs the guest under QEMU: picks the accelerator, streams the serial console
//! to the terminal and to a log, enforces the timeout and turns QEMU's exit
//! status into the guest's verdict.

use std::fs::{self, File};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

const QEMU: &str = "qemu-system-x86_64";
/// qboot boots a vmlinux directly and is much faster than SeaBIOS.
const FIRMWARE: &str = "/usr/share/qemu/qboot.rom";
const DEBUG_EXIT_DEVICE: &str = "isa-debug-exit,iobase=0xf4,iosize=0x04";

/// QEMU exit statuses caused by the guest writing a byte B to port 0xf4:
/// (B << 1) | 1. The bytes are written by guest_init.sh.
const EXIT_PASS: i32 = (0x10 << 1) | 1;
const EXIT_FAIL: i32 = (0x11 << 1) | 1;
const EXIT_SETUP_FAILED: i32 = (0x12 << 1) | 1;
/// With -no-reboot, a guest that powers off or reboots (panic=-1 turns a
/// kernel panic into a reboot) makes QEMU exit with 0: no verdict was written.
const EXIT_WITHOUT_VERDICT: i32 = 0;

/// The first line /init prints; its arrival marks the end of the boot.
const INIT_MARKER: &str = "sentinel-init:";

pub struct VmConfig<'a> {
    pub vmlinux: &'a Path,
    pub initramfs: &'a Path,
    pub run_dir: &'a Path,
    /// Virtio disks, /dev/vda first.
    pub disks: &'a [Disk<'a>],
    /// Appended to the kernel command line.
    pub kernel_args: &'a str,
    pub timeout: Duration,
    /// Interactive shell on this terminal instead of the jobs.
    pub shell: bool,
    /// Show every kernel message on the console, not only warnings and errors.
    pub kernel_log: bool,
}

pub struct Disk<'a> {
    pub image: &'a Path,
    /// Writes go to a temporary overlay and are dropped with QEMU: the image stays unchanged.
    pub snapshot: bool,
}

pub enum GuestEnd {
    Passed,
    Failed,
    SetupFailed,
    /// The guest stopped without writing a verdict: /init died, or the kernel panicked.
    NoVerdict,
    TimedOut,
}

pub struct VmOutcome {
    pub end: GuestEnd,
    /// From QEMU's start to /init's first line.
    pub boot: Option<Duration>,
    pub wall: Duration,
    pub console_log: PathBuf,
    pub results_log: PathBuf,
}

pub fn run(config: &VmConfig) -> Result<VmOutcome> {
    let console_log = config.run_dir.join("console.log");
    let results_log = config.run_dir.join("results.log");
    let mut kernel_cmdline = String::from("console=ttyS0 panic=-1 oops=panic");
    if !config.kernel_log {
        kernel_cmdline.push_str(" loglevel=4");
    }
    if config.shell {
        kernel_cmdline.push_str(" sentinel.shell");
    }
    if !config.kernel_args.is_empty() {
        kernel_cmdline.push(' ');
        kernel_cmdline.push_str(config.kernel_args);
    }

    let mut qemu = Command::new(QEMU);
    qemu.args(accelerator_args(config.run_dir)?)
        .args([
            "-bios",
            FIRMWARE,
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .args(["-m", "2G", "-smp", "2"])
        .arg("-kernel")
        .arg(config.vmlinux)
        .arg("-initrd")
        .arg(config.initramfs)
        .args(["-append", &kernel_cmdline])
        // ttyS0: the console. mon: lets a shell user quit with Ctrl-A x.
        .args(["-serial", if config.shell { "mon:stdio" } else { "stdio" }])
        // ttyS1: the results, straight into a host file.
        .arg("-chardev")
        .arg(format!(
            "file,id=results,path={}",
            qemu_option_value(&results_log)?
        ))
        .args(["-serial", "chardev:results"])
        .args(["-device", DEBUG_EXIT_DEVICE]);
    for disk in config.disks {
        let snapshot = if disk.snapshot { ",snapshot=on" } else { "" };
        qemu.arg("-drive").arg(format!(
            "file={},format=raw,if=virtio{snapshot}",
            qemu_option_value(disk.image)?
        ));
    }

    let started = Instant::now();
    let (status, boot) = if config.shell {
        let status = qemu
            .status()
            .with_context(|| format!("cannot start {QEMU}"))?;
        (Some(status), None)
    } else {
        run_streaming_console(qemu, &console_log, config.timeout)?
    };
    let end = match status {
        None => GuestEnd::TimedOut,
        Some(status) => match status.code() {
            Some(EXIT_PASS) => GuestEnd::Passed,
            Some(EXIT_FAIL) => GuestEnd::Failed,
            Some(EXIT_SETUP_FAILED) => GuestEnd::SetupFailed,
            Some(EXIT_WITHOUT_VERDICT) => GuestEnd::NoVerdict,
            _ => anyhow::bail!(
                "{QEMU} itself failed ({status}), this is not a guest verdict: see its \
                 messages above"
            ),
        },
    };
    Ok(VmOutcome {
        end,
        boot: boot.map(|boot| boot - started),
        wall: started.elapsed(),
        console_log,
        results_log,
    })
}

/// Runs QEMU with its console copied line by line to the terminal and the log.
/// Returns the exit status (None after a timeout) and when /init first spoke.
fn run_streaming_console(
    mut qemu: Command,
    console_log: &Path,
    timeout: Duration,
) -> Result<(Option<ExitStatus>, Option<Instant>)> {
    let mut log = File::create(console_log)
        .with_context(|| format!("cannot create {}", console_log.display()))?;
    let mut child = qemu
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let console = child.stdout.take().context("QEMU stdout is not piped")?;
    let streamer = thread::spawn(move || -> Result<Option<Instant>> {
        let mut init_started = None;
        let mut reader = BufReader::new(console);
        let mut line = Vec::new();
        while reader.read_until(b'\n', &mut line)? > 0 {
            line.retain(|byte| *byte != b'\r');
            if init_started.is_none() && line.starts_with(INIT_MARKER.as_bytes()) {
                init_started = Some(Instant::now());
            }
            log.write_all(&line)?;
            std::io::stdout().write_all(&line)?;
            line.clear();
        }
        Ok(init_started)
    });
    let status = wait_with_timeout(&mut child, timeout)?;
    let init_started = streamer
        .join()
        .map_err(|_| anyhow::anyhow!("the console reader thread panicked"))?
        .context("cannot copy the guest console")?;
    Ok((status, init_started))
}

/// Waits for the child; after `timeout` kills it and returns None.
fn wait_with_timeout(child: &mut Child, timeout: Duration) -> Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            child.kill()?;
            child.wait()?;
            return Ok(None);
        }
        thread::sleep(Duration::from_millis(100));
    }
}

/// KVM only where the stock kvm_intel/kvm_amd module is loaded and a probe
/// guest really runs: other backends (such as PVM) expose a /dev/kvm that
/// aborts a normal guest. Otherwise multi-threaded TCG emulation.
fn accelerator_args(run_dir: &Path) -> Result<Vec<&'static str>> {
    let tcg = vec!["-accel", "tcg,thread=multi", "-cpu", "max"];
    let Some(module) = ["/sys/module/kvm_intel", "/sys/module/kvm_amd"]
        .into_iter()
        .find(|module| Path::new(module).exists())
    else {
        println!(
            "[xtask] accelerator: TCG software emulation (no kvm_intel or kvm_amd module \
             loaded; slower, works everywhere)"
        );
        return Ok(tcg);
    };
    let kvm = vec!["-accel", "kvm", "-cpu", "host"];
    if probe_guest_runs(&kvm, run_dir)? {
        println!("[xtask] accelerator: KVM ({module} loaded, probe guest ran)");
        Ok(kvm)
    } else {
        println!(
            "[xtask] accelerator: TCG software emulation ({module} is loaded but a KVM \
             probe guest did not run)"
        );
        Ok(tcg)
    }
}

/// Boots a 64 KiB firmware whose reset vector writes 0x2a to the debug-exit
/// port: QEMU exits with 85 only if the accelerator really executed guest code.
fn probe_guest_runs(accelerator: &[&str], run_dir: &Path) -> Result<bool> {
    const RESET_VECTOR: usize = 0xfff0;
    const PROBE_BYTE: i32 = 0x2a;
    // mov al, 0x2a; out 0xf4, al; hlt
    const PROBE_CODE: [u8; 5] = [0xb0, 0x2a, 0xe6, 0xf4, 0xf4];
    let mut firmware = vec![0xf4; 64 * 1024];
    firmware[RESET_VECTOR..RESET_VECTOR + PROBE_CODE.len()].copy_from_slice(&PROBE_CODE);
    let firmware_path = run_dir.join("accelerator-probe.rom");
    fs::write(&firmware_path, firmware)?;
    let mut probe = Command::new(QEMU)
        .args(accelerator)
        .arg("-bios")
        .arg(&firmware_path)
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .args(["-device", DEBUG_EXIT_DEVICE])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {QEMU}"))?;
    let status = wait_with_timeout(&mut probe, Duration::from_secs(10))?;
    Ok(status.and_then(|status| status.code()) == Some((PROBE_BYTE << 1) | 1))
}

/// QEMU option values end at a comma unless it is doubled.
fn qemu_option_value(path: &Path) -> Result<String> {
    let path = path
        .to_str()
        .with_context(|| format!("{} is not UTF-8", path.display()))?;
    Ok(path.replace(',', ",,"))
}
