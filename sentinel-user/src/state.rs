//! State kept on disk across restarts and reboots (in `--state-dir`): the SSH guard's bans and
//! offense counts, and the cgroup values the enforcer must put back. Each file is written whole
//! and atomically (a new file, synced, renamed over the old one), so a crash leaves the old or
//! the new state, never a mix.

use std::{
    fs::{self, File},
    io::Write,
    path::PathBuf,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

use crate::{Error, firewall::IpNet};

/// The format of every state file; a file of another version is refused, not misread.
const VERSION: u32 = 1;

#[derive(Serialize, Deserialize)]
struct Envelope<T> {
    version: u32,
    #[serde(flatten)]
    state: T,
}

/// The SSH guard's state: bans in force, and how often each offender was banned.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedState {
    pub bans: Vec<SavedBan>,
    pub offenses: Vec<SavedOffense>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedBan {
    pub net: IpNet,
    /// Milliseconds since the Unix epoch: wall-clock time survives a reboot, monotonic does not.
    pub expires_unix_ms: u64,
    pub reason: String,
    pub failures: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SavedOffense {
    pub net: IpNet,
    pub count: u32,
    /// When the latest ban ends (or ended), in milliseconds since the Unix epoch.
    pub ends_unix_ms: u64,
}

/// Converts between the engine's monotonic instants and the file's wall-clock times, both
/// read at one moment.
#[derive(Debug, Clone, Copy)]
pub struct Clocks {
    pub now: Instant,
    pub wall: SystemTime,
}

impl Clocks {
    pub fn read() -> Self {
        Self {
            now: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    pub fn to_unix_ms(self, instant: Instant) -> u64 {
        let wall = match instant.checked_duration_since(self.now) {
            Some(ahead) => self.wall + ahead,
            None => self.wall - self.now.duration_since(instant),
        };
        wall.duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_millis() as u64)
    }

    /// The instant of a saved time; times before the machine booted come out as `now` minus
    /// as much as `Instant` can go back, which only matters for "long ago".
    pub fn to_instant(self, unix_ms: u64) -> Instant {
        let wall = UNIX_EPOCH + Duration::from_millis(unix_ms);
        match wall.duration_since(self.wall) {
            Ok(ahead) => self.now + ahead,
            Err(behind) => self
                .now
                .checked_sub(behind.duration())
                .unwrap_or(self.now - self.now.elapsed()),
        }
    }
}

/// Where a state lives, and whether it changed since it was last written.
pub struct StateFile<T> {
    path: PathBuf,
    dirty: bool,
    /// The last write, or attempt: a failing write is tried again no sooner than a successful
    /// one would be.
    written: Option<Instant>,
    kind: std::marker::PhantomData<T>,
}

impl<T: Serialize + DeserializeOwned> StateFile<T> {
    pub fn new(path: PathBuf) -> Self {
        Self {
            path,
            dirty: false,
            written: None,
            kind: std::marker::PhantomData,
        }
    }

    /// The saved state; none if there is no file yet. A file that cannot be read as state is
    /// moved aside (to `<file>.corrupt`) so that it is kept for inspection and not read again.
    pub fn load(&self) -> Result<Option<T>, Error> {
        let text = match fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(self.error(source)),
        };
        match serde_json::from_str::<Envelope<T>>(&text) {
            Ok(saved) if saved.version == VERSION => Ok(Some(saved.state)),
            Ok(saved) => Err(self.error(std::io::Error::other(format!(
                "version {} is not {VERSION}",
                saved.version
            )))),
            Err(problem) => {
                let aside = self.path.with_extension("corrupt");
                fs::rename(&self.path, &aside).map_err(|source| self.error(source))?;
                Err(self.error(std::io::Error::other(format!(
                    "{problem}; moved aside to {}",
                    aside.display()
                ))))
            }
        }
    }

    pub fn mark_changed(&mut self) {
        self.dirty = true;
    }

    /// Whether a change waits and the last write is at least `spacing` old.
    pub fn due(&self, now: Instant, spacing: Duration) -> bool {
        self.dirty
            && self
                .written
                .is_none_or(|written| now.saturating_duration_since(written) >= spacing)
    }

    /// When a waiting change is due ([`Self::due`]), or `None` when none waits.
    pub fn due_at(&self, now: Instant, spacing: Duration) -> Option<Instant> {
        self.dirty.then(|| {
            self.written
                .map_or(now, |written| (written + spacing).max(now))
        })
    }

    /// Replaces the file with `state`: a crash at any moment leaves the old or the new file.
    pub fn write(&mut self, state: &T, now: Instant) -> Result<(), Error> {
        self.written = Some(now);
        let io = |source| self.error(source);
        if let Some(dir) = self.path.parent() {
            fs::create_dir_all(dir).map_err(io)?;
        }
        let staged = self.path.with_extension("new");
        let mut file = File::create(&staged).map_err(io)?;
        let envelope = Envelope {
            version: VERSION,
            state,
        };
        let bytes = serde_json::to_vec(&envelope).map_err(|error| io(error.into()))?;
        file.write_all(&bytes).map_err(io)?;
        file.sync_all().map_err(io)?;
        fs::rename(&staged, &self.path).map_err(io)?;
        if let Some(dir) = self.path.parent() {
            File::open(dir).and_then(|dir| dir.sync_all()).map_err(io)?;
        }
        self.dirty = false;
        Ok(())
    }

    fn error(&self, source: std::io::Error) -> Error {
        Error::State {
            path: self.path.clone(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(text: &str) -> IpNet {
        text.parse().unwrap()
    }

    #[test]
    fn state_round_trips_through_the_file() {
        let dir = std::env::temp_dir().join(format!("sentinel-state-{}", std::process::id()));
        let mut file = StateFile::new(dir.join("ssh-guard.json"));
        assert_eq!(file.load().unwrap(), None);
        let state = SavedState {
            bans: vec![SavedBan {
                net: net("198.51.100.10"),
                expires_unix_ms: 1_900_000_000_000,
                reason: "ssh_failures".into(),
                failures: 5,
            }],
            offenses: vec![SavedOffense {
                net: net("2001:db8:6::/64"),
                count: 3,
                ends_unix_ms: 1_800_000_000_000,
            }],
        };
        file.mark_changed();
        assert!(file.due(Instant::now(), Duration::from_secs(1)));
        file.write(&state, Instant::now()).unwrap();
        assert!(!file.due(Instant::now(), Duration::ZERO));
        assert_eq!(file.load().unwrap(), Some(state));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_change_is_due_at_once_then_no_sooner_than_the_spacing_even_after_a_failed_write() {
        let dir = std::env::temp_dir().join(format!("sentinel-due-{}", std::process::id()));
        // A directory where the file should be: every write fails.
        let path = dir.join("ssh-guard.json");
        fs::create_dir_all(path.with_extension("new")).unwrap();
        let mut file = StateFile::<SavedState>::new(path);
        let spacing = Duration::from_secs(1);
        let now = Instant::now();
        assert_eq!(file.due_at(now, spacing), None);
        file.mark_changed();
        assert_eq!(file.due_at(now, spacing), Some(now));
        assert!(file.write(&SavedState::default(), now).is_err());
        assert_eq!(file.due_at(now, spacing), Some(now + spacing));
        assert!(!file.due(now, spacing));
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_corrupt_file_is_refused_and_moved_aside() {
        let dir = std::env::temp_dir().join(format!("sentinel-corrupt-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ssh-guard.json");
        fs::write(&path, "{\"version\": 1, \"bans\": [tru").unwrap();
        let error = StateFile::<SavedState>::new(path.clone())
            .load()
            .unwrap_err()
            .to_string();
        assert!(error.contains("moved aside"), "{error}");
        assert!(!path.exists());
        assert!(dir.join("ssh-guard.corrupt").exists());
        fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn times_convert_between_the_clocks() {
        let clocks = Clocks::read();
        let later = clocks.now + Duration::from_secs(99);
        let saved = clocks.to_unix_ms(later);
        let back = clocks.to_instant(saved);
        assert!(back.max(later) - back.min(later) < Duration::from_millis(1));
        // Milliseconds are what the file keeps.
        let earlier = clocks.to_instant(clocks.to_unix_ms(clocks.now) - 5_000);
        let behind = clocks.now - earlier;
        assert!(
            behind >= Duration::from_secs(5) && behind < Duration::from_millis(5_001),
            "{behind:?}"
        );
    }
}
