//! The audit log: one JSON line per ban, unban and skipped ban, appended and flushed at once.

use std::{
    fs::{File, OpenOptions},
    io::Write,
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
    time::{SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::{Error, firewall::IpNet};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditAction {
    Ban,
    Unban,
    /// A ban that the threshold called for but was not made (allow list, open session, ...).
    Skip,
    /// Observe mode: what enforce mode would have banned.
    WouldBan,
}

impl AuditAction {
    /// As the audit log writes it.
    pub fn label(self) -> &'static str {
        match self {
            Self::Ban => "ban",
            Self::Unban => "unban",
            Self::Skip => "skip",
            Self::WouldBan => "would_ban",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AuditRecord {
    pub time: String,
    pub action: AuditAction,
    pub address: String,
    pub reason: String,
    pub failures: u32,
    /// When the ban ends, for bans.
    pub expires: Option<String>,
}

impl AuditRecord {
    pub fn new(
        action: AuditAction,
        net: &IpNet,
        reason: impl Into<String>,
        failures: u32,
        expires: Option<SystemTime>,
    ) -> Self {
        Self {
            time: rfc3339(SystemTime::now()),
            action,
            address: net.to_string(),
            reason: reason.into(),
            failures,
            expires: expires.map(rfc3339),
        }
    }
}

pub struct AuditLog {
    path: PathBuf,
    file: File,
}

impl AuditLog {
    pub fn open(path: &Path) -> Result<Self, Error> {
        let unwritable = |source| Error::AuditLog {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(unwritable)?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(unwritable)?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Whether [`Self::open`] would succeed for this process, changing nothing: the file opens
    /// for appending, or an unnamed file (`O_TMPFILE`, gone when closed) can be made in the
    /// nearest existing directory on its path.
    pub fn check_writable(path: &Path) -> Result<(), Error> {
        let unwritable = |source| Error::AuditLog {
            path: path.to_path_buf(),
            source,
        };
        if path.exists() {
            return OpenOptions::new()
                .append(true)
                .open(path)
                .map(drop)
                .map_err(unwritable);
        }
        let existing = path
            .ancestors()
            .find(|candidate| candidate.exists())
            .unwrap_or(Path::new("/"));
        OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_TMPFILE)
            .open(existing)
            .map(drop)
            .map_err(unwritable)
    }

    pub fn append(&mut self, record: &impl Serialize) -> Result<(), Error> {
        let mut line = serde_json::to_vec(record).expect("audit records serialize");
        line.push(b'\n');
        // One write per record, so concurrent readers never see half a line.
        self.file
            .write_all(&line)
            .map_err(|source| Error::AuditLog {
                path: self.path.clone(),
                source,
            })
    }
}

/// `2026-11-21T15:04:05.123Z`.
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let seconds = since_epoch.as_secs();
    let (days, day_seconds) = (seconds / 86_400, seconds % 86_400);
    let (year, month, day) = civil_from_days(days as i64);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        day_seconds / 3600,
        day_seconds % 3600 / 60,
        day_seconds % 60,
        since_epoch.subsec_millis()
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097);
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_index + 2) / 5 + 1) as u32;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_rfc3339() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let time = UNIX_EPOCH + Duration::from_millis(1_795_273_445_123);
        assert_eq!(rfc3339(time), "2026-11-21T15:04:05.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn labels_are_what_the_log_writes() {
        for action in [
            AuditAction::Ban,
            AuditAction::Unban,
            AuditAction::Skip,
            AuditAction::WouldBan,
        ] {
            assert_eq!(serde_json::to_value(action).unwrap(), action.label());
        }
    }

    #[test]
    fn appends_one_json_line_per_record() {
        let path = std::env::temp_dir().join(format!("sentinel-audit-{}.log", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut log = AuditLog::open(&path).unwrap();
        let net: IpNet = "203.0.113.9/32".parse().unwrap();
        log.append(&AuditRecord::new(
            AuditAction::Ban,
            &net,
            "ssh_failures",
            5,
            Some(UNIX_EPOCH),
        ))
        .unwrap();
        log.append(&AuditRecord::new(
            AuditAction::Unban,
            &net,
            "operator",
            0,
            None,
        ))
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["action"], "ban");
        assert_eq!(lines[0]["address"], "203.0.113.9");
        assert_eq!(lines[0]["failures"], 5);
        assert_eq!(lines[0]["expires"], "1970-01-01T00:00:00.000Z");
        assert_eq!(lines[1]["action"], "unban");
        assert!(lines[1]["expires"].is_null());
        std::fs::remove_file(&path).unwrap();
    }
}
