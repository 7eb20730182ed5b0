//! The bench's own cgroup under the cgroup2 mount. The loops run inside it, so Sentinel's
//! counters for it must equal the iteration counts exactly: that is the proof that no event
//! was lost.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result};

/// Also the `service` label Sentinel gives the cgroup: its path below the cgroup2 root.
pub const SERVICE: &str = "sentinel-bench";

pub struct BenchCgroup {
    dir: PathBuf,
    /// Where this process was before, and returns to between loops.
    home: PathBuf,
}

impl BenchCgroup {
    pub fn create() -> Result<Self> {
        let mount = cgroup2_mount()?;
        let home = mount.join(own_cgroup()?.trim_start_matches('/'));
        let dir = mount.join(SERVICE);
        if dir.exists() {
            // Left by a bench that was killed; an empty cgroup can simply be removed.
            fs::remove_dir(&dir).with_context(|| {
                format!(
                    "{} exists (left by an earlier bench?) and cannot be removed",
                    dir.display()
                )
            })?;
        }
        fs::create_dir(&dir).with_context(|| format!("cannot create cgroup {}", dir.display()))?;
        println!("[bench] cgroup for the loops: {}", dir.display());
        Ok(Self { dir, home })
    }

    /// Moves this process into the cgroup until the returned guard leaves or is dropped.
    pub fn enter(&self) -> Result<Membership<'_>> {
        move_self_to(&self.dir)?;
        Ok(Membership {
            cgroup: self,
            left: false,
        })
    }
}

impl Drop for BenchCgroup {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_dir(&self.dir) {
            eprintln!(
                "[bench] WARNING: could not remove cgroup {}: {error}",
                self.dir.display()
            );
        }
    }
}

pub struct Membership<'a> {
    cgroup: &'a BenchCgroup,
    left: bool,
}

impl Membership<'_> {
    pub fn leave(mut self) -> Result<()> {
        self.left = true;
        move_self_to(&self.cgroup.home)
    }
}

impl Drop for Membership<'_> {
    fn drop(&mut self) {
        if !self.left
            && let Err(error) = move_self_to(&self.cgroup.home)
        {
            eprintln!("[bench] WARNING: {error:#}");
        }
    }
}

fn move_self_to(dir: &Path) -> Result<()> {
    // Writing the pid moves every thread of this process.
    let procs = dir.join("cgroup.procs");
    fs::write(&procs, std::process::id().to_string())
        .with_context(|| format!("cannot move the bench into {}", procs.display()))
}

fn cgroup2_mount() -> Result<PathBuf> {
    let mountinfo =
        fs::read_to_string("/proc/self/mountinfo").context("cannot read /proc/self/mountinfo")?;
    mountinfo
        .lines()
        .find_map(|line| {
            // "<id> <parent> <dev> <root> <mount point> ... - <fs type> <source> <options>"
            let (mount, filesystem) = line.split_once(" - ")?;
            let mount_point = mount.split(' ').nth(4)?;
            filesystem
                .starts_with("cgroup2 ")
                .then(|| PathBuf::from(mount_point))
        })
        .context("no cgroup2 hierarchy is mounted (nothing in /proc/self/mountinfo)")
}

fn own_cgroup() -> Result<String> {
    let cgroups =
        fs::read_to_string("/proc/self/cgroup").context("cannot read /proc/self/cgroup")?;
    cgroups
        .lines()
        .find_map(|line| line.strip_prefix("0::"))
        .map(str::to_owned)
        .context("/proc/self/cgroup has no cgroup2 entry (0::)")
}
