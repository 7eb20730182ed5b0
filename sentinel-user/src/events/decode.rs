//! Turning ring buffer records into typed events.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use sentinel_common::{
    CgroupEvent, ClosedPortEvent, EventKind, ExecEvent, ExecViolationEvent, OomKillEvent,
    SshAuthEvent, TcpEvent,
};

use crate::{containment::Violation, port_scan::ClosedPort};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exec {
    pub pid: u32,
    pub ppid: u32,
    pub uid: u32,
    pub cgroup_id: u64,
    pub comm: String,
    pub filename: String,
}

#[derive(Debug, Clone)]
pub enum Event {
    Exec(Exec),
    TcpConnect(TcpEvent),
    TcpAccept(TcpEvent),
    OomKill {
        pid: u32,
        /// `None` when the kernel could not see the victim's cgroup.
        cgroup_id: Option<u64>,
        comm: String,
    },
    CgroupCreated {
        id: u64,
        /// `None` when the path was too long for the event.
        path: Option<String>,
    },
    CgroupRemoved {
        id: u64,
    },
    Ssh(SshAuth),
    ExecViolation(Violation),
    ClosedPort(ClosedPort),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshAuth {
    pub outcome: SshOutcome,
    /// The sshd process that ran PAM.
    pub pid: u32,
    /// CLOCK_MONOTONIC nanoseconds when PAM returned, or the monitor ended.
    pub timestamp_ns: u64,
    pub pam_result: i32,
    /// `PAM_RHOST` as sshd gave it: the client's address unless sshd resolves names.
    pub remote_host: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SshOutcome {
    Failure,
    SessionOpened,
    /// sshd's monitor for this client ended without a failed password or a session: the
    /// connection ended before authenticating (a refused key, an unknown user).
    PreauthEnd,
}

/// Decodes one record; `None` for a record of unknown kind or wrong size.
pub fn decode(record: &[u8]) -> Option<Event> {
    let kind = EventKind::from_u32(u32::from_ne_bytes(record.get(..4)?.try_into().ok()?))?;
    Some(match kind {
        EventKind::Exec => {
            let exec: ExecEvent = read(record)?;
            Event::Exec(Exec {
                pid: exec.pid,
                ppid: exec.ppid,
                uid: exec.uid,
                cgroup_id: exec.cgroup_id,
                comm: c_string(&exec.comm)?,
                filename: c_string(&exec.filename).unwrap_or_else(|| lossy(&exec.filename)),
            })
        }
        EventKind::TcpConnect => Event::TcpConnect(read(record)?),
        EventKind::TcpAccept => Event::TcpAccept(read(record)?),
        EventKind::OomKill => {
            let oom: OomKillEvent = read(record)?;
            Event::OomKill {
                pid: oom.pid,
                cgroup_id: (oom.cgroup_id != 0).then_some(oom.cgroup_id),
                comm: c_string(&oom.comm).unwrap_or_default(),
            }
        }
        EventKind::CgroupMkdir => {
            let cgroup: CgroupEvent = read(record)?;
            Event::CgroupCreated {
                id: cgroup.cgroup_id,
                path: c_string(&cgroup.path),
            }
        }
        EventKind::SshAuthFailure | EventKind::SshSessionOpened | EventKind::SshPreauthEnd => {
            let ssh: SshAuthEvent = read(record)?;
            Event::Ssh(SshAuth {
                outcome: match kind {
                    EventKind::SshAuthFailure => SshOutcome::Failure,
                    EventKind::SshSessionOpened => SshOutcome::SessionOpened,
                    _ => SshOutcome::PreauthEnd,
                },
                pid: ssh.pid,
                timestamp_ns: ssh.timestamp_ns,
                pam_result: ssh.pam_result,
                remote_host: c_string(&ssh.rhost)?,
            })
        }
        EventKind::ExecViolation => {
            let violation: ExecViolationEvent = read(record)?;
            Event::ExecViolation(Violation {
                pid: violation.pid,
                cgroup_id: violation.cgroup_id,
                policy: violation.policy,
                killed: violation.killed != 0,
                dev: violation.dev,
                ino: violation.ino,
                comm: c_string(&violation.comm).unwrap_or_default(),
                executable: c_string(&violation.filename)
                    .unwrap_or_else(|| lossy(&violation.filename)),
            })
        }
        EventKind::ClosedPort => {
            let hit: ClosedPortEvent = read(record)?;
            let bytes = hit.remote_addr;
            let addr = match i32::from(hit.family) {
                libc::AF_INET => IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3])),
                libc::AF_INET6 => IpAddr::V6(Ipv6Addr::from(bytes)),
                _ => return None,
            };
            Event::ClosedPort(ClosedPort {
                addr,
                port: hit.port,
            })
        }
        EventKind::CgroupRmdir => {
            let cgroup: CgroupEvent = read(record)?;
            Event::CgroupRemoved {
                id: cgroup.cgroup_id,
            }
        }
    })
}

fn read<T: Copy>(record: &[u8]) -> Option<T> {
    if record.len() < size_of::<T>() {
        return None;
    }
    // SAFETY: the length was checked; `T` is plain `#[repr(C)]` data valid for any bytes.
    Some(unsafe { record.as_ptr().cast::<T>().read_unaligned() })
}

/// The NUL-terminated string in `bytes`; `None` when it has no NUL (it was truncated).
fn c_string(bytes: &[u8]) -> Option<String> {
    let end = bytes.iter().position(|&b| b == 0)?;
    Some(String::from_utf8_lossy(&bytes[..end]).into_owned())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[cfg(test)]
mod tests {
    use sentinel_common::{CGROUP_PATH_LEN, COMM_LEN, FILENAME_LEN};

    use super::*;

    fn bytes_of<T>(value: &T) -> Vec<u8> {
        // SAFETY: reading the bytes of a plain-data value.
        unsafe { std::slice::from_raw_parts((value as *const T).cast::<u8>(), size_of::<T>()) }
            .to_vec()
    }

    fn fixed<const N: usize>(text: &str) -> [u8; N] {
        let mut out = [0; N];
        out[..text.len()].copy_from_slice(text.as_bytes());
        out
    }

    #[test]
    fn decodes_exec() {
        let record = ExecEvent {
            kind: EventKind::Exec as u32,
            pid: 10,
            ppid: 1,
            uid: 1000,
            cgroup_id: 42,
            comm: fixed::<COMM_LEN>("true"),
            filename: fixed::<FILENAME_LEN>("/usr/bin/true"),
        };
        let Some(Event::Exec(exec)) = decode(&bytes_of(&record)) else {
            panic!("not an exec event");
        };
        assert_eq!(
            exec,
            Exec {
                pid: 10,
                ppid: 1,
                uid: 1000,
                cgroup_id: 42,
                comm: "true".into(),
                filename: "/usr/bin/true".into(),
            }
        );
    }

    #[test]
    fn truncated_cgroup_path_is_reported_as_unknown() {
        let record = CgroupEvent {
            kind: EventKind::CgroupMkdir as u32,
            _pad: 0,
            cgroup_id: 7,
            path: [b'a'; CGROUP_PATH_LEN],
        };
        assert!(matches!(
            decode(&bytes_of(&record)),
            Some(Event::CgroupCreated { id: 7, path: None })
        ));
    }

    #[test]
    fn rejects_short_and_unknown_records() {
        assert!(decode(&[1, 0, 0, 0]).is_none());
        assert!(decode(&[99, 0, 0, 0, 0, 0, 0, 0]).is_none());
        assert!(decode(&[]).is_none());
    }
}
