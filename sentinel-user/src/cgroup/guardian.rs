//! Graceful stop before the kernel OOM killer: when a cgroup's memory stays above a threshold
//! for a while, its largest process gets SIGTERM, then SIGKILL if it is still there after a
//! grace period. Signals go through pidfds, so a recycled pid is never signalled.

use std::{
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    time::{Duration, Instant},
};

/// What the guard wants done on this tick.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuardAction {
    /// Send SIGTERM to the largest process.
    Terminate,
    /// The grace period is over: SIGKILL the process that got SIGTERM, if it still runs.
    Kill,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardLimits {
    pub threshold_bytes: u64,
    /// How long memory must stay above the threshold.
    pub sustain: Duration,
    pub grace: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Below,
    AboveSince(Instant),
    Terminated(Instant),
}

#[derive(Debug)]
pub struct MemoryGuard {
    limits: GuardLimits,
    state: State,
}

impl MemoryGuard {
    pub fn new(limits: GuardLimits) -> Self {
        Self {
            limits,
            state: State::Below,
        }
    }

    pub fn limits(&self) -> GuardLimits {
        self.limits
    }

    /// Advances the guard with the cgroup's current memory use.
    pub fn tick(&mut self, now: Instant, memory_bytes: u64) -> Option<GuardAction> {
        let above = memory_bytes > self.limits.threshold_bytes;
        match self.state {
            State::Terminated(at) if now.duration_since(at) >= self.limits.grace => {
                self.state = if above {
                    State::AboveSince(now)
                } else {
                    State::Below
                };
                Some(GuardAction::Kill)
            }
            State::Terminated(_) => None,
            State::Below | State::AboveSince(_) if !above => {
                self.state = State::Below;
                None
            }
            State::Below => {
                self.state = State::AboveSince(now);
                self.fire_if_sustained(now, now)
            }
            State::AboveSince(since) => self.fire_if_sustained(since, now),
        }
    }

    fn fire_if_sustained(&mut self, since: Instant, now: Instant) -> Option<GuardAction> {
        if now.duration_since(since) >= self.limits.sustain {
            self.state = State::Terminated(now);
            Some(GuardAction::Terminate)
        } else {
            None
        }
    }
}

/// A process held by pidfd, so that later signals reach it and never a recycled pid.
#[derive(Debug)]
pub struct ProcessHandle {
    pub pid: i32,
    pidfd: OwnedFd,
}

impl ProcessHandle {
    pub fn open(pid: i32) -> std::io::Result<Self> {
        // SAFETY: plain syscall; a non-negative result is a new descriptor we own.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `fd` was just returned by pidfd_open and is owned by nobody else.
        let pidfd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        Ok(Self { pid, pidfd })
    }

    /// Opens `pid` only while it is in `cgroup` (a cgroup2 path relative to the root) or below
    /// it. Between reading `cgroup.procs` and opening, the process may have exited and its pid
    /// gone to another process, which must never get the signal. The pidfd pins the process: if
    /// it still runs after `/proc/PID/cgroup` was read, what was read was its own.
    pub fn open_in_cgroup(pid: i32, cgroup: &str) -> std::io::Result<Option<Self>> {
        let handle = Self::open(pid)?;
        let member = super::cgroup_of_pid(pid).is_some_and(|path| is_within(&path, cgroup));
        if !member || !handle.signal(0)? {
            return Ok(None);
        }
        Ok(Some(handle))
    }

    /// Sends `signal`; `Ok(false)` when the process is already gone.
    pub fn signal(&self, signal: i32) -> std::io::Result<bool> {
        // SAFETY: plain syscall on a descriptor we own.
        let result = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if result == 0 {
            return Ok(true);
        }
        let error = std::io::Error::last_os_error();
        if error.raw_os_error() == Some(libc::ESRCH) {
            Ok(false)
        } else {
            Err(error)
        }
    }
}

/// Whether cgroup `path` is `cgroup` or lies below it.
fn is_within(path: &str, cgroup: &str) -> bool {
    let (path, cgroup) = (path.trim_matches('/'), cgroup.trim_matches('/'));
    cgroup.is_empty()
        || path == cgroup
        || path
            .strip_prefix(cgroup)
            .is_some_and(|rest| rest.starts_with('/'))
}

/// The process with the largest resident set among `pids`.
pub fn largest_process(pids: &[i32]) -> Option<i32> {
    pids.iter()
        .filter_map(|&pid| Some((resident_pages(pid)?, pid)))
        .max()
        .map(|(_, pid)| pid)
}

fn resident_pages(pid: i32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    statm.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: GuardLimits = GuardLimits {
        threshold_bytes: 100,
        sustain: Duration::from_secs(2),
        grace: Duration::from_secs(3),
    };

    #[test]
    fn terminates_only_after_sustained_pressure_then_kills_after_grace() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut guard = MemoryGuard::new(LIMITS);
        assert_eq!(guard.tick(at(0), 150), None);
        assert_eq!(guard.tick(at(1), 150), None);
        assert_eq!(guard.tick(at(2), 150), Some(GuardAction::Terminate));
        assert_eq!(guard.tick(at(3), 150), None);
        assert_eq!(guard.tick(at(5), 150), Some(GuardAction::Kill));
    }

    #[test]
    fn a_dip_below_the_threshold_resets_the_clock() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut guard = MemoryGuard::new(LIMITS);
        assert_eq!(guard.tick(at(0), 150), None);
        assert_eq!(guard.tick(at(1), 50), None);
        assert_eq!(guard.tick(at(2), 150), None);
        assert_eq!(guard.tick(at(3), 150), None);
        assert_eq!(guard.tick(at(4), 150), Some(GuardAction::Terminate));
    }

    #[test]
    fn kill_is_still_requested_after_the_process_freed_memory() {
        // The Kill step only signals if the terminated process still exists.
        let start = Instant::now();
        let mut guard = MemoryGuard::new(GuardLimits {
            sustain: Duration::ZERO,
            ..LIMITS
        });
        assert_eq!(guard.tick(start, 150), Some(GuardAction::Terminate));
        assert_eq!(
            guard.tick(start + Duration::from_secs(3), 10),
            Some(GuardAction::Kill)
        );
        assert_eq!(guard.tick(start + Duration::from_secs(4), 10), None);
    }

    #[test]
    fn pidfd_signals_a_live_child_and_reports_a_gone_one() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let handle = ProcessHandle::open(child.id() as i32).unwrap();
        assert!(handle.signal(libc::SIGKILL).unwrap());
        child.wait().unwrap();
        assert!(!handle.signal(0).unwrap());
    }

    #[test]
    fn a_process_is_opened_only_inside_the_cgroup_it_was_found_in() {
        let me = std::process::id() as i32;
        let mine = crate::cgroup::cgroup_of_pid(me).expect("this process's cgroup2 path");
        assert!(ProcessHandle::open_in_cgroup(me, &mine).unwrap().is_some());
        let elsewhere = format!("{}-elsewhere", mine.trim_end_matches('/'));
        assert!(
            ProcessHandle::open_in_cgroup(me, &elsewhere)
                .unwrap()
                .is_none()
        );
        assert!(is_within("/a/b/c", "a/b"));
        assert!(is_within("/a/b", "/a/b/"));
        assert!(!is_within("/a/bc", "a/b"));
        assert!(is_within("/anything", "/"));
    }

    /// Processes holding `sizes` bytes of resident memory each, beyond what they inherit;
    /// killed when dropped, so that a failed assertion leaves none behind.
    struct Holders(Vec<i32>);

    impl Holders {
        /// All are forked from one intermediate child that allocates nothing, so that each
        /// inherits the same resident pages: forked from this test process, each would also
        /// inherit whatever the tests running beside it hold at that moment. Returns once
        /// every one has touched its memory; `self.0[i]` holds `sizes[i]`.
        fn new(sizes: &[usize]) -> Self {
            let mut report = [0i32; 2];
            // SAFETY: plain syscalls; only raw system calls run in the forked processes, which
            // write to memory they mapped themselves and to the pipe.
            unsafe {
                assert_eq!(libc::pipe(report.as_mut_ptr()), 0);
                let intermediate = libc::fork();
                assert!(intermediate >= 0, "fork failed");
                if intermediate == 0 {
                    for (index, &bytes) in sizes.iter().enumerate() {
                        match libc::fork() {
                            0 => hold(bytes, index as i32, report[1]),
                            -1 => report_holder(report[1], index as i32, -1),
                            _ => {}
                        }
                    }
                    libc::_exit(0);
                }
                libc::close(report[1]);
                libc::waitpid(intermediate, std::ptr::null_mut(), 0);
                let mut holders = Self(vec![0; sizes.len()]);
                for _ in sizes {
                    let mut pair = [0i32; 2];
                    let wanted = size_of_val(&pair);
                    let read = libc::read(report[0], pair.as_mut_ptr().cast(), wanted);
                    assert_eq!(read, wanted as isize, "a holder did not report");
                    assert!(pair[1] > 0, "holder {} could not be made", pair[0]);
                    holders.0[pair[0] as usize] = pair[1];
                }
                libc::close(report[0]);
                holders
            }
        }
    }

    impl Drop for Holders {
        fn drop(&mut self) {
            for &pid in &self.0 {
                // SAFETY: a plain syscall on a process this test made.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// Writes `(index, pid)` on `report`; a pid of -1 says the holder could not be made.
    unsafe fn report_holder(report: i32, index: i32, pid: i32) {
        let pair = [index, pid];
        // SAFETY: a raw write of a local array.
        unsafe { libc::write(report, pair.as_ptr().cast(), size_of_val(&pair)) };
    }

    /// In a forked process: touches `bytes` of fresh memory, reports `(index, pid)` on
    /// `report` (-1 if the memory cannot be mapped), and sleeps until killed.
    unsafe fn hold(bytes: usize, index: i32, report: i32) -> ! {
        // SAFETY: raw system calls on memory this process maps itself.
        unsafe {
            let memory = libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if memory == libc::MAP_FAILED {
                report_holder(report, index, -1);
                libc::_exit(1);
            }
            for offset in (0..bytes).step_by(4096) {
                *memory.cast::<u8>().add(offset) = 1;
            }
            report_holder(report, index, libc::getpid());
            loop {
                libc::pause();
            }
        }
    }

    #[test]
    fn finds_the_largest_process() {
        const MIB: usize = 1024 * 1024;
        let holders = Holders::new(&[4 * MIB, 32 * MIB, 16 * MIB]);
        let [small, large, medium] = holders.0[..] else {
            unreachable!("three sizes, three holders");
        };
        let sizes: Vec<u64> = [small, medium, large]
            .iter()
            .map(|pid| resident_pages(*pid).unwrap())
            .collect();
        assert!(sizes.is_sorted() && sizes[0] < sizes[2], "{sizes:?}");
        for order in [
            [small, medium, large],
            [large, small, medium],
            [medium, large, small],
        ] {
            assert_eq!(largest_process(&order), Some(large), "{order:?}");
        }
        // A pid that is gone, or never was, is passed over.
        assert_eq!(largest_process(&[small, -5]), Some(small));
        assert_eq!(largest_process(&[]), None);
    }
}
