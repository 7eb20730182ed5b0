//! Which policed cgroups to check for drift: the kernel says when anyone writes a file in a
//! cgroup's directory (inotify `IN_MODIFY`, which cgroupfs sends for every write through the
//! VFS, be it `echo`, systemd or a container runtime) and when the directory goes
//! (`IN_IGNORED`). So finding a write reads no limit file, instead of every limit of every
//! cgroup twice a second.
//!
//! A directory that cannot be watched (the inotify watch limit reached) is checked on every
//! tick, as all were before; an overflowing event queue makes every cgroup a candidate. As a
//! safety net, a [`Sweep`] reads every policed cgroup once per [`SWEEP_ROUND`], a few at each
//! tick, so that even 5,000 cgroups cost an idle host a few file reads a second, never a burst.
//!
//! The notices wake the enforcer ([`DriftWatch::wake_with`]): with nothing else to do, it does
//! not wake to look for them.

use std::{
    collections::{BTreeSet, HashMap, hash_map::Entry},
    os::fd::AsFd,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use nix::{
    errno::Errno,
    sys::{
        epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout},
        eventfd::{EfdFlags, EventFd},
        inotify::{AddWatchFlags, InitFlags, Inotify, WatchDescriptor},
    },
};
use tracing::warn;

use crate::cgroup::{CgroupPath, cgroupfs::CgroupFs};

/// The kernel's drift notices for the cgroups whose limits the enforcer keeps.
pub struct DriftWatch {
    /// `None` when inotify itself is unavailable: every cgroup is then polled.
    inotify: Option<Inotify>,
    /// By raw watch descriptor, as notices give it. The kernel numbers the watches, so the
    /// faster hasher of hashbrown's map is safe here: no user picks its keys.
    paths: hashbrown::HashMap<i32, CgroupPath>,
    watches: HashMap<CgroupPath, WatchDescriptor>,
    /// Cgroups without a watch, checked on every tick.
    polled: BTreeSet<CgroupPath>,
    /// The queue overflowed since the last look: a notice may be lost.
    overflowed: bool,
    waker: Option<Waker>,
    /// Where notices are read into.
    notices: Vec<u8>,
}

/// The bytes of notices read at once: 512 of a cgroup file (a 16-byte header and the file's
/// name, padded to 16).
const NOTICES_READ: usize = 16 * 1024;
/// `struct inotify_event` without its name: descriptor, mask, cookie, the name's length.
const NOTICE_HEADER: usize = 16;

/// A thread that calls back when the kernel has notices: it waits on the inotify descriptor,
/// armed for one wake at a time, so that notices read in a burst make one call.
struct Waker {
    epoll: Arc<Epoll>,
    stop: Arc<EventFd>,
    /// Cleared when the thread ended on an error: notices must then be looked for.
    alive: Arc<AtomicBool>,
}

/// The epoll data of the two descriptors the waker waits on.
const NOTICES: u64 = 0;
const STOP: u64 = 1;

/// What changed since the last look.
#[derive(Debug, PartialEq, Eq)]
pub enum Changed {
    /// These cgroups (a file written, or the directory gone), and the unwatched ones.
    Cgroups(BTreeSet<CgroupPath>),
    /// Notices were lost: check every cgroup.
    Everything,
}

impl DriftWatch {
    pub fn new() -> Self {
        let inotify = Inotify::init(InitFlags::IN_NONBLOCK | InitFlags::IN_CLOEXEC)
            .inspect_err(|errno| {
                warn!(
                    "cannot watch cgroup limit files ({errno}); every limit is read twice a second"
                )
            })
            .ok();
        Self {
            inotify,
            paths: hashbrown::HashMap::new(),
            watches: HashMap::new(),
            polled: BTreeSet::new(),
            overflowed: false,
            waker: None,
            notices: Vec::new(),
        }
    }

    /// Calls `wake` from a thread of its own when notices come in, once until [`Self::rearm`];
    /// the thread ends when `wake` answers false or the watch is dropped. Without it (no
    /// inotify, or the thread cannot be made), [`Self::wakes`] stays false.
    pub fn wake_with(&mut self, mut wake: impl FnMut() -> bool + Send + 'static) {
        let Some(inotify) = &self.inotify else {
            return;
        };
        let made = (|| -> Result<Waker, String> {
            let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(|e| e.to_string())?;
            let stop = EventFd::from_flags(EfdFlags::EFD_CLOEXEC | EfdFlags::EFD_NONBLOCK)
                .map_err(|e| e.to_string())?;
            let once = EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT;
            epoll
                .add(inotify, EpollEvent::new(once, NOTICES))
                .and_then(|()| epoll.add(&stop, EpollEvent::new(EpollFlags::EPOLLIN, STOP)))
                .map_err(|e| e.to_string())?;
            let waker = Waker {
                epoll: Arc::new(epoll),
                stop: Arc::new(stop),
                alive: Arc::new(AtomicBool::new(true)),
            };
            let (epoll, stop, alive) = (
                Arc::clone(&waker.epoll),
                Arc::clone(&waker.stop),
                Arc::clone(&waker.alive),
            );
            std::thread::Builder::new()
                .name("drift-notices".into())
                .spawn(move || {
                    let _stop = stop;
                    let mut events = [EpollEvent::empty(); 2];
                    loop {
                        match epoll.wait(&mut events, EpollTimeout::NONE) {
                            Err(Errno::EINTR) => continue,
                            Err(errno) => {
                                warn!("cannot wait for cgroup limit notices ({errno})");
                                alive.store(false, Ordering::SeqCst);
                                // Once more, so that the enforcer looks for notices itself.
                                wake();
                                return;
                            }
                            Ok(ready) => {
                                if events[..ready].iter().any(|event| event.data() == STOP)
                                    || !wake()
                                {
                                    return;
                                }
                            }
                        }
                    }
                })
                .map_err(|e| e.to_string())?;
            Ok(waker)
        })();
        match made {
            Ok(waker) => self.waker = Some(waker),
            Err(reason) => warn!(
                "cannot wait for cgroup limit notices ({reason}); they are looked for twice a second"
            ),
        }
    }

    /// Whether notices wake the enforcer; if not, it must look for them at every tick.
    pub fn wakes(&self) -> bool {
        self.waker
            .as_ref()
            .is_some_and(|waker| waker.alive.load(Ordering::SeqCst))
    }

    /// Lets the next notice wake the enforcer again (at once, if one is waiting).
    pub fn rearm(&mut self) {
        let (Some(inotify), Some(waker)) = (&self.inotify, &self.waker) else {
            return;
        };
        let mut once = EpollEvent::new(EpollFlags::EPOLLIN | EpollFlags::EPOLLONESHOT, NOTICES);
        if let Err(errno) = waker.epoll.modify(inotify, &mut once) {
            warn!(
                "cannot wait for cgroup limit notices ({errno}); they are looked for twice a second"
            );
            waker.alive.store(false, Ordering::SeqCst);
        }
    }

    /// Starts watching the cgroup at `path` (relative to the cgroup2 root, as the enforcer
    /// names cgroups: `/`-prefixed).
    pub fn watch(&mut self, fs: &CgroupFs, path: &CgroupPath) {
        let Entry::Vacant(unwatched) = self.watches.entry(CgroupPath::clone(path)) else {
            return;
        };
        let Some(inotify) = &self.inotify else {
            self.polled.insert(CgroupPath::clone(path));
            return;
        };
        let flags = AddWatchFlags::IN_MODIFY | AddWatchFlags::IN_ONLYDIR;
        match fs.with_dir(path, |dir| inotify.add_watch(dir, flags)) {
            Ok(descriptor) => {
                self.paths
                    .insert(descriptor.as_raw(), CgroupPath::clone(path));
                unwatched.insert(descriptor);
            }
            Err(errno) => {
                if errno == Errno::ENOSPC && self.polled.is_empty() {
                    warn!(
                        "the inotify watch limit (fs.inotify.max_user_watches) is reached: \
                         cgroups beyond it are read for drift twice a second"
                    );
                }
                self.polled.insert(CgroupPath::clone(path));
            }
        }
    }

    /// The shared name of `path`, when it is watched.
    pub fn watched(&self, path: &str) -> Option<&CgroupPath> {
        self.watches.get_key_value(path).map(|(shared, _)| shared)
    }

    /// Stops watching `path` (its policy let go, or the cgroup is gone).
    pub fn forget(&mut self, path: &str) {
        self.polled.remove(path);
        if let Some(descriptor) = self.watches.remove(path) {
            self.paths.remove(&descriptor.as_raw());
            if let Some(inotify) = &self.inotify {
                // Fails harmlessly when the kernel already dropped the watch (directory gone).
                let _ = inotify.rm_watch(descriptor);
            }
        }
    }

    /// How many cgroups are read at every check for want of a watch.
    pub fn polled(&self) -> usize {
        self.polled.len()
    }

    /// The cgroups to check now: those with a notice since the last call, and the unwatched.
    pub fn changed(&mut self) -> Changed {
        self.changed_except(&[])
    }

    /// [`Self::changed`], without the notices of the cgroups in `own` (the enforcer's own
    /// writes), which are read and dropped without a copy of their paths. `own` are the names
    /// the cgroups were watched by, known by their address: a cgroup named by another copy
    /// of its path is not taken for its own write, so at worst it is checked for nothing.
    pub fn changed_except(&mut self, own: &[CgroupPath]) -> Changed {
        let mut own: Vec<*const u8> = own.iter().map(|path| Arc::as_ptr(path).cast()).collect();
        own.sort_unstable();
        let is_own = |path: &CgroupPath| own.binary_search(&Arc::as_ptr(path).cast()).is_ok();
        let mut changed = self.polled.clone();
        if let Some(inotify) = &self.inotify {
            // Read raw, names skipped: a pass's own writes make one notice per cgroup, which
            // is all read back here.
            self.notices.resize(NOTICES_READ, 0);
            loop {
                let read = match nix::unistd::read(inotify.as_fd(), &mut self.notices) {
                    Ok(read) => read,
                    Err(Errno::EINTR) => continue,
                    Err(Errno::EAGAIN) => break,
                    Err(errno) => {
                        warn!("cannot read cgroup limit notices ({errno}); checking every cgroup");
                        self.overflowed = true;
                        break;
                    }
                };
                let mut at = 0;
                while let Some(header) = self.notices[..read].get(at..at + NOTICE_HEADER) {
                    let field = |offset: usize| {
                        let bytes = [offset, offset + 1, offset + 2, offset + 3].map(|i| header[i]);
                        u32::from_ne_bytes(bytes)
                    };
                    let (descriptor, mask, name_length) = (field(0) as i32, field(4), field(12));
                    at += NOTICE_HEADER + name_length as usize;
                    let mask = AddWatchFlags::from_bits_truncate(mask);
                    if mask.contains(AddWatchFlags::IN_Q_OVERFLOW) {
                        self.overflowed = true;
                    }
                    if mask.contains(AddWatchFlags::IN_IGNORED) {
                        // The kernel dropped the watch with its directory: a cgroup made again
                        // at the same path (a restarted service) is a new one, watched when the
                        // enforcer applies its policy again.
                        if let Some(path) = self.paths.remove(&descriptor) {
                            self.watches.remove(&path);
                            if !is_own(&path) {
                                changed.insert(path);
                            }
                        }
                    } else if let Some(path) = self.paths.get(&descriptor)
                        && !is_own(path)
                        && !changed.contains(path)
                    {
                        changed.insert(CgroupPath::clone(path));
                    }
                }
            }
        }
        if std::mem::take(&mut self.overflowed) {
            return Changed::Everything;
        }
        Changed::Cgroups(changed)
    }
}

impl Drop for DriftWatch {
    fn drop(&mut self) {
        if let Some(waker) = &self.waker {
            // Ends the thread; it holds no lock and needs no joining.
            let _ = waker.stop.write(1);
        }
    }
}

/// How long a sweep takes to read every policed cgroup once.
pub const SWEEP_ROUND: Duration = Duration::from_secs(300);

/// Every policed cgroup, read once a round whatever the notices say, spread over the round's
/// ticks.
pub struct Sweep {
    /// This round's cgroups not yet read.
    pending: Vec<CgroupPath>,
    /// How many are read at each tick, so that the round ends in time.
    per_tick: usize,
    next_round: Instant,
}

impl Sweep {
    pub fn new(now: Instant) -> Self {
        Self {
            pending: Vec::new(),
            per_tick: 0,
            next_round: now + SWEEP_ROUND,
        }
    }

    /// Whether a round is under way: its share is read at each tick.
    pub fn in_round(&self) -> bool {
        !self.pending.is_empty()
    }

    /// When the next round begins.
    pub fn next_round(&self) -> Instant {
        self.next_round
    }

    /// The cgroups to read at this tick (one `tick` apart); `policed` gives every cgroup when a
    /// round begins.
    pub fn next<I: IntoIterator<Item = CgroupPath>>(
        &mut self,
        now: Instant,
        tick: Duration,
        policed: impl FnOnce() -> I,
    ) -> Vec<CgroupPath> {
        if self.pending.is_empty() && now >= self.next_round {
            self.next_round = now + SWEEP_ROUND;
            self.pending = policed().into_iter().collect();
            let ticks = (SWEEP_ROUND.as_millis() / tick.as_millis().max(1)).max(1) as usize;
            self.per_tick = self.pending.len().div_ceil(ticks);
        }
        let keep = self.pending.len().saturating_sub(self.per_tick);
        self.pending.split_off(keep)
    }
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;

    #[test]
    fn a_write_or_a_removed_directory_names_its_cgroup_and_nothing_else() {
        let root = std::env::temp_dir().join(format!("sentinel-drift-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        for cgroup in ["a", "b"] {
            fs::create_dir_all(root.join(cgroup)).unwrap();
            fs::write(root.join(cgroup).join("memory.max"), "max").unwrap();
        }
        let cgroupfs = CgroupFs::new(root.clone());
        let mut watch = DriftWatch::new();
        // Named as the enforcer names cgroups: from the cgroup2 root, `/`-prefixed.
        watch.watch(&cgroupfs, &"/a".into());
        watch.watch(&cgroupfs, &"/b".into());
        // A directory that does not exist cannot be watched: it is polled.
        watch.watch(&cgroupfs, &"/missing".into());
        let only =
            |paths: &[&str]| Changed::Cgroups(paths.iter().map(|&path| path.into()).collect());
        assert_eq!(watch.changed(), only(&["/missing"]));
        assert_eq!(watch.polled(), 1);

        fs::write(root.join("a/memory.max"), "1048576").unwrap();
        assert_eq!(watch.changed(), only(&["/a", "/missing"]));
        assert_eq!(watch.changed(), only(&["/missing"]));

        fs::remove_file(root.join("b/memory.max")).unwrap();
        fs::remove_dir(root.join("b")).unwrap();
        assert_eq!(watch.changed(), only(&["/b", "/missing"]));

        watch.forget("/b");
        watch.forget("/missing");
        fs::write(root.join("a/memory.max"), "max").unwrap();
        watch.forget("/a");
        // Notices of a forgotten cgroup are dropped.
        assert_eq!(watch.changed(), only(&[]));
        fs::remove_dir_all(&root).unwrap();
    }

    /// Notices wake the enforcer once per arming, so that it need not look for them.
    #[test]
    fn a_write_wakes_once_until_rearmed_and_the_waker_ends_with_the_watch() {
        let root = std::env::temp_dir().join(format!("sentinel-wake-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("a")).unwrap();
        let cgroupfs = CgroupFs::new(root.clone());
        let mut watch = DriftWatch::new();
        watch.watch(&cgroupfs, &"/a".into());
        let (wakes, woken) = std::sync::mpsc::channel();
        watch.wake_with(move || wakes.send(()).is_ok());
        assert!(watch.wakes());
        let hang_guard = Duration::from_secs(60);
        fs::write(root.join("a/memory.max"), "1048576").unwrap();
        woken.recv_timeout(hang_guard).expect("a write wakes");
        // Two writes before the notices are read: one wake; read, rearmed, the next wakes.
        fs::write(root.join("a/memory.max"), "max").unwrap();
        let only = |path: &str| Changed::Cgroups(BTreeSet::from([path.into()]));
        assert_eq!(watch.changed(), only("/a"));
        watch.rearm();
        fs::write(root.join("a/memory.max"), "2097152").unwrap();
        woken
            .recv_timeout(hang_guard)
            .expect("a write wakes once rearmed");
        assert_eq!(woken.try_recv(), Err(std::sync::mpsc::TryRecvError::Empty));
        // Dropped, the watch ends the waker's thread, which drops its sender.
        drop(watch);
        assert_eq!(
            woken.recv_timeout(hang_guard),
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected)
        );
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_cgroup_made_again_at_its_path_is_watched_again() {
        let root = std::env::temp_dir().join(format!("sentinel-rewatch-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("a")).unwrap();
        let cgroupfs = CgroupFs::new(root.clone());
        let mut watch = DriftWatch::new();
        watch.watch(&cgroupfs, &"/a".into());
        // A restarted service: its cgroup goes and comes back under the same path.
        fs::remove_dir(root.join("a")).unwrap();
        fs::create_dir(root.join("a")).unwrap();
        let only = |path: &str| Changed::Cgroups(BTreeSet::from([path.into()]));
        assert_eq!(watch.changed(), only("/a"));
        // The enforcer watches the new cgroup when it applies its policy; its writes are seen.
        watch.watch(&cgroupfs, &"/a".into());
        fs::write(root.join("a/memory.max"), "max").unwrap();
        assert_eq!(watch.changed(), only("/a"));
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn a_sweep_reads_every_cgroup_once_a_round_a_few_at_each_tick() {
        let tick = Duration::from_millis(500);
        let start = Instant::now();
        let mut sweep = Sweep::new(start);
        let policed = || (0..1000).map(|index| CgroupPath::from(format!("/c{index}")));
        let ticks_per_round = (SWEEP_ROUND.as_millis() / tick.as_millis()) as u32;
        // Nothing before the first round is due, then two rounds of ticks.
        assert!(sweep.next(start, tick, policed).is_empty());
        let mut read: Vec<Vec<CgroupPath>> = Vec::new();
        for round in 1..=2 {
            let mut this_round = Vec::new();
            for at in 0..ticks_per_round {
                let now = start + SWEEP_ROUND * round + tick * at;
                let batch = sweep.next(now, tick, policed);
                assert!(batch.len() <= 2, "{} at tick {at}", batch.len());
                this_round.extend(batch);
            }
            this_round.sort();
            read.push(this_round);
        }
        let mut every: Vec<CgroupPath> = policed().collect();
        every.sort();
        assert_eq!(read, [every.clone(), every]);
    }
}
