//! cgroup id to path, kept current by the kernel's mkdir/rmdir events and by rescans.

use hashbrown::HashMap;
use std::{
    collections::VecDeque,
    os::unix::fs::{DirEntryExt, MetadataExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use tracing::debug;

/// Removed cgroups remembered so that counts arriving after removal keep their service.
const TOMBSTONES: usize = 4096;
/// Unknown ids trigger a rescan, at most this often (a flood of unknown ids must not turn
/// into a flood of directory walks).
const RESCAN_INTERVAL: Duration = Duration::from_secs(1);

/// hashbrown's maps: their hasher is several times faster than std's on the ids looked up
/// for every cgroup at each scrape.
pub struct CgroupTree {
    root: PathBuf,
    live: HashMap<u64, String>,
    removed: HashMap<u64, String>,
    removal_order: VecDeque<u64>,
    last_scan: Option<Instant>,
}

impl CgroupTree {
    /// `root` is the cgroup2 mount point; paths are kept relative to it, starting with `/`.
    pub fn new(root: PathBuf) -> Self {
        Self {
            root,
            live: HashMap::new(),
            removed: HashMap::new(),
            removal_order: VecDeque::new(),
            last_scan: None,
        }
    }

    /// Walks the whole hierarchy. A cgroup's id is its directory's inode number.
    pub fn rescan(&mut self) {
        let live: HashMap<u64, String> = walk_hierarchy(&self.root).into_iter().collect();
        debug!(cgroups = live.len(), "scanned the cgroup2 hierarchy");
        self.live = live;
        self.last_scan = Some(Instant::now());
    }

    pub fn created(&mut self, id: u64, path: String) {
        self.removed.remove(&id);
        self.live.insert(id, path);
    }

    pub fn removed(&mut self, id: u64) {
        let Some(path) = self.live.remove(&id) else {
            return;
        };
        if self.removal_order.len() == TOMBSTONES
            && let Some(oldest) = self.removal_order.pop_front()
        {
            self.removed.remove(&oldest);
        }
        self.removal_order.push_back(id);
        self.removed.insert(id, path);
    }

    /// Where `id` stands, rescanning (rate-limited) when it is not known yet.
    pub fn lookup(&mut self, id: u64) -> Lookup<'_> {
        if !self.live.contains_key(&id)
            && !self.removed.contains_key(&id)
            && self
                .last_scan
                .is_none_or(|at| at.elapsed() >= RESCAN_INTERVAL)
        {
            self.rescan();
        }
        if let Some(path) = self.live.get(&id) {
            Lookup::Live(path)
        } else if let Some(path) = self.removed.get(&id) {
            Lookup::Removed(path)
        } else {
            Lookup::Unknown {
                last_scan: self.last_scan,
            }
        }
    }
}

/// Every cgroup under `root` as (id, path relative to the root, starting with `/`). A
/// cgroup's id is its directory's inode number, which the directory listing gives (cgroupfs
/// lists each entry with its inode number). A directory's link count is two plus its
/// subdirectories on cgroupfs, so a cgroup with none (most of them: services, containers) is
/// `stat`ed rather than listed: a listing of its dozens of interface files costs several times
/// more.
pub fn walk_hierarchy(root: &Path) -> Vec<(u64, String)> {
    let mut found = Vec::new();
    let Ok(meta) = std::fs::metadata(root) else {
        return found;
    };
    let mut pending = vec![(root.to_path_buf(), String::from("/"), meta.ino())];
    while let Some((dir, path, ino)) = pending.pop() {
        // A cgroup removed since its parent was listed is left out.
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        found.push((ino, path.clone()));
        for entry in entries.flatten() {
            if !entry.file_type().is_ok_and(|kind| kind.is_dir()) {
                continue;
            }
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let parent = if path == "/" { "" } else { path.as_str() };
            let mut child = String::with_capacity(parent.len() + 1 + name.len());
            child.push_str(parent);
            child.push('/');
            child.push_str(&name);
            // Link count 1: a filesystem that does not count subdirectories.
            if meta.nlink() == 2 {
                found.push((entry.ino(), child));
            } else {
                pending.push((entry.path(), child, entry.ino()));
            }
        }
    }
    found
}

#[derive(Debug, PartialEq, Eq)]
pub enum Lookup<'a> {
    Live(&'a str),
    /// Removed, but recently enough that its path is remembered.
    Removed(&'a str),
    /// Not found by the most recent scan (if any).
    Unknown {
        last_scan: Option<Instant>,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scans_ids_and_relative_paths() {
        let dir = std::env::temp_dir().join(format!("sentinel-tree-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("a/b")).unwrap();
        let mut tree = CgroupTree::new(dir.clone());
        tree.rescan();
        let ino = |p: &str| std::fs::metadata(dir.join(p)).unwrap().ino();
        assert_eq!(tree.lookup(ino("")), Lookup::Live("/"));
        assert_eq!(tree.lookup(ino("a/b")), Lookup::Live("/a/b"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn removed_cgroups_keep_their_path_until_evicted() {
        let mut tree = CgroupTree::new(PathBuf::from("/nonexistent"));
        tree.rescan();
        tree.created(7, "/svc".into());
        tree.removed(7);
        assert_eq!(tree.lookup(7), Lookup::Removed("/svc"));
        for id in 100..100 + TOMBSTONES as u64 {
            tree.created(id, format!("/t{id}"));
            tree.removed(id);
        }
        assert!(matches!(tree.lookup(7), Lookup::Unknown { .. }));
    }
}
