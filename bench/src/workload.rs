//! The two loops the bench times, and the tiny program the exec loop starts.

use std::{
    fs,
    net::{Ipv4Addr, TcpListener, TcpStream},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{Context, Result, bail, ensure};

use super::{cgroup::BenchCgroup, interrupt};
use crate::host::run;

/// The exec loop's program; its file name is also its `comm`, which the peers report.
pub const NOP_PROGRAM: &str = "exec-nop";
/// Exits at once, skipping even the C runtime's start-up, which costs more than the exec
/// itself on a nested VM (every page fault is expensive there).
const NOP_SOURCE: &str = "#include <unistd.h>\nvoid _start(void) { _exit(0); }\n";

/// One run of both loops, per iteration in microseconds; also used for a run's ratios to
/// its baselines, field by field.
#[derive(Debug, Clone, Copy)]
pub struct LoopTimes {
    pub exec: LoopCost,
    pub connect: LoopCost,
}

#[derive(Debug, Clone, Copy)]
pub struct LoopCost {
    /// Elapsed time.
    pub wall: f64,
    /// CPU time of the loop and the programs it starts. Unlike wall time it leaves out the
    /// waits while other processes hold the CPUs, by far the largest noise on a shared VM,
    /// and it still counts the eBPF programs, which run in the loop's own context.
    pub cpu: f64,
}

impl LoopTimes {
    /// Combines matching fields of `self` and `other` with `combine`.
    pub fn zip_with(self, other: Self, combine: impl Fn(f64, f64) -> f64) -> Self {
        let cost = |a: LoopCost, b: LoopCost| LoopCost {
            wall: combine(a.wall, b.wall),
            cpu: combine(a.cpu, b.cpu),
        };
        Self {
            exec: cost(self.exec, other.exec),
            connect: cost(self.connect, other.connect),
        }
    }
}

/// Compiles the exec loop's program. Static, so that each iteration measures exec rather
/// than the dynamic loader.
pub fn build_nop_program(out_dir: &Path) -> Result<PathBuf> {
    let source = out_dir.join(format!("{NOP_PROGRAM}.c"));
    let program = out_dir.join(NOP_PROGRAM);
    fs::write(&source, NOP_SOURCE).with_context(|| format!("cannot write {}", source.display()))?;
    run(Command::new("gcc")
        .args(["-O2", "-static", "-nostartfiles", "-s", "-o"])
        .arg(&program)
        .arg(&source))
    .context("building the exec loop's static program failed (it needs gcc and libc6-dev)")?;
    Ok(program)
}

/// Runs both loops inside `cgroup`.
pub fn run_loops(nop: &Path, iterations: u32, cgroup: &BenchCgroup) -> Result<LoopTimes> {
    let inside = cgroup.enter()?;
    let exec = exec_loop(nop, iterations)?;
    let connect = connect_loop(iterations)?;
    inside.leave()?;
    Ok(LoopTimes { exec, connect })
}

struct Stopwatch {
    wall: Instant,
    cpu_seconds: f64,
}

impl Stopwatch {
    fn start() -> Result<Self> {
        Ok(Self {
            wall: Instant::now(),
            cpu_seconds: cpu_seconds()?,
        })
    }

    fn per_iteration(&self, iterations: u32) -> Result<LoopCost> {
        let micros = |seconds: f64| seconds * 1e6 / f64::from(iterations);
        Ok(LoopCost {
            wall: micros(self.wall.elapsed().as_secs_f64()),
            cpu: micros(cpu_seconds()? - self.cpu_seconds),
        })
    }
}

/// User and system time of this process and of its children that have been waited for.
fn cpu_seconds() -> Result<f64> {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: rusage is plain old data, for which all zeros is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: `usage` is a valid, writable rusage.
        if unsafe { libc::getrusage(who, &mut usage) } != 0 {
            bail!("getrusage failed: {}", std::io::Error::last_os_error());
        }
        for time in [usage.ru_utime, usage.ru_stime] {
            total += time.tv_sec as f64 + time.tv_usec as f64 / 1e6;
        }
    }
    Ok(total)
}

/// Starts the program and waits for it, `iterations` times: one exec each.
fn exec_loop(program: &Path, iterations: u32) -> Result<LoopCost> {
    let mut command = Command::new(program);
    let stopwatch = Stopwatch::start()?;
    for _ in 0..iterations {
        interrupt::check()?;
        let status = command
            .status()
            .with_context(|| format!("cannot start {}", program.display()))?;
        ensure!(status.success(), "{} failed: {status}", program.display());
    }
    stopwatch.per_iteration(iterations)
}

/// Connects to a loopback listener and accepts, `iterations` times. The client closes with
/// a zero linger time (RST), so no TIME_WAIT piles up and port search does not drown the
/// per-connect cost.
fn connect_loop(iterations: u32) -> Result<LoopCost> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot listen on a loopback port")?;
    let address = listener.local_addr()?;
    let stopwatch = Stopwatch::start()?;
    for _ in 0..iterations {
        interrupt::check()?;
        let client =
            TcpStream::connect(address).with_context(|| format!("cannot connect to {address}"))?;
        let (server, _) = listener.accept().context("accept failed")?;
        reset_on_close(&client)?;
        drop(client);
        drop(server);
    }
    stopwatch.per_iteration(iterations)
}

fn reset_on_close(stream: &TcpStream) -> Result<()> {
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: the descriptor is open for the lifetime of `stream`, and the option value is
    // a `linger` of the length passed.
    let result = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&raw const linger).cast(),
            size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    if result != 0 {
        bail!(
            "setsockopt(SO_LINGER) failed: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}
