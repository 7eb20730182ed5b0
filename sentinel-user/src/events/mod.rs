//! Per-event records from the kernel's ring buffers: decoding and handling.

mod decode;
mod reader;

pub use decode::{Event, SshAuth, SshOutcome, decode};
pub use reader::{read_ring, readable};

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    sync::{Arc, Mutex},
};

use sentinel_common::{EventRecords, TcpEvent};
use tracing::{Level, debug, enabled, warn};

use crate::{
    cgroup::{Attribution, UNKNOWN, cgroup_of_pid},
    containment::Input as ContainmentInput,
    policy::enforcer::{AppliedView, Input as EnforcerInput},
    port_scan::Input as PortScanInput,
    queue::Queue,
    recent::Recorder,
    ssh_guard::Input as SshInput,
};

/// The per-event records the handler reads. Exec and TCP records feed only its debug lines,
/// so the programs write them only while those lines are logged
/// (`SENTINEL_LOG=info,sentinel_user::events=debug`); otherwise they only count.
pub fn records_wanted() -> EventRecords {
    let debug = u32::from(enabled!(Level::DEBUG));
    EventRecords {
        exec: debug,
        tcp: debug,
    }
}

/// What the daemon does with each event.
pub struct EventHandler {
    attribution: Arc<Mutex<Attribution>>,
    applied: Arc<Mutex<AppliedView>>,
    enforcer: Queue<EnforcerInput>,
    ssh_guard: Option<Queue<SshInput>>,
    containment: Queue<ContainmentInput>,
    /// `None` unless `port_scan` is configured.
    port_scan: Option<Queue<PortScanInput>>,
    recent: Recorder,
}

impl EventHandler {
    pub fn new(
        attribution: Arc<Mutex<Attribution>>,
        applied: Arc<Mutex<AppliedView>>,
        enforcer: Queue<EnforcerInput>,
        ssh_guard: Option<Queue<SshInput>>,
        containment: Queue<ContainmentInput>,
        port_scan: Option<Queue<PortScanInput>>,
        recent: Recorder,
    ) -> Self {
        Self {
            attribution,
            applied,
            enforcer,
            ssh_guard,
            containment,
            port_scan,
            recent,
        }
    }

    pub fn handle(&self, event: Event) {
        if let Event::Ssh(auth) = event {
            self.to_ssh_guard(auth);
            return;
        }
        if let Event::ClosedPort(hit) = event {
            if let Some(detector) = &self.port_scan {
                // A full queue is counted in sentinel_queue_dropped_total{queue="port_scan"}.
                let _ = detector.offer(PortScanInput::Hit(hit));
            }
            return;
        }
        if let Event::ExecViolation(violation) = event {
            // A full queue is counted; the kernel has already killed where it was asked to.
            let _ = self
                .containment
                .offer(ContainmentInput::Violation(violation));
            return;
        }
        let mut attribution = self.attribution.lock().expect("attribution lock");
        match event {
            Event::CgroupCreated { id, path } => match path {
                Some(path) => {
                    // A full queue is counted; the enforcer's periodic walk finds the cgroup.
                    let _ = self
                        .enforcer
                        .offer(EnforcerInput::CgroupCreated(path.clone()));
                    let _ = self.containment.offer(ContainmentInput::CgroupCreated {
                        id,
                        path: path.clone(),
                    });
                    attribution.tree_mut().created(id, path);
                }
                // The path did not fit in the event: read the hierarchy instead.
                None => {
                    let _ = self.enforcer.offer(EnforcerInput::Rescan);
                    let _ = self.containment.offer(ContainmentInput::Rescan);
                    attribution.tree_mut().rescan();
                }
            },
            Event::CgroupRemoved { id } => {
                let _ = self.containment.offer(ContainmentInput::CgroupRemoved(id));
                attribution.tree_mut().removed(id);
            }
            Event::OomKill {
                pid,
                cgroup_id,
                comm,
            } => {
                let path = match cgroup_id {
                    Some(id) => attribution.path_of(id),
                    // The kernel could not tell the victim's cgroup; it may already be gone.
                    None => cgroup_of_pid(pid as i32),
                };
                let service = attribution.label_for_path(path.as_deref().unwrap_or(UNKNOWN));
                attribution.record_oom_kill(&service);
                let applied = path.and_then(|path| {
                    let view = self.applied.lock().expect("applied view lock");
                    view.cgroups.get(path.as_str()).cloned()
                });
                let (policy, memory_max) = applied
                    .map(|a| (a.policy, a.memory_max.unwrap_or_else(|| "max".into())))
                    .unwrap_or_else(|| ("none".into(), "not set by Sentinel".into()));
                let (policy, memory_max) = (&*policy, &*memory_max);
                warn!(
                    pid,
                    comm, service, policy, memory_max, "OOM killer killed a process"
                );
                self.recent.record(
                    "oom_kill",
                    &service,
                    format!("pid {pid} ({comm}), memory.max {memory_max}"),
                );
            }
            Event::Exec(exec) if enabled!(Level::DEBUG) => {
                let service = attribution.label_for_id(exec.cgroup_id);
                debug!(
                    pid = exec.pid,
                    ppid = exec.ppid,
                    uid = exec.uid,
                    service,
                    comm = %exec.comm,
                    filename = %exec.filename,
                    "exec"
                );
            }
            Event::TcpConnect(tcp) | Event::TcpAccept(tcp) if enabled!(Level::DEBUG) => {
                let service = attribution.label_for_id(tcp.cgroup_id);
                let kind = if matches!(event, Event::TcpConnect(_)) {
                    "tcp connect"
                } else {
                    "tcp accept"
                };
                debug!(
                    service,
                    local = %address(&tcp, &tcp.local_addr),
                    local_port = tcp.local_port,
                    remote = %address(&tcp, &tcp.remote_addr),
                    remote_port = tcp.remote_port,
                    "{kind}"
                );
            }
            Event::Exec(_)
            | Event::TcpConnect(_)
            | Event::TcpAccept(_)
            | Event::Ssh(_)
            | Event::ExecViolation(_)
            | Event::ClosedPort(_) => {}
        }
    }
}

impl EventHandler {
    fn to_ssh_guard(&self, auth: SshAuth) {
        debug!(
            outcome = ?auth.outcome,
            remote = auth.remote_host,
            pid = auth.pid,
            pam_result = auth.pam_result,
            "ssh authentication"
        );
        if let Some(guard) = &self.ssh_guard {
            let _ = guard.offer(SshInput::Auth(auth));
        }
    }
}

fn address(tcp: &TcpEvent, bytes: &[u8; 16]) -> IpAddr {
    if tcp.family == libc::AF_INET6 as u16 {
        IpAddr::V6(Ipv6Addr::from(*bytes))
    } else {
        IpAddr::V4(Ipv4Addr::new(bytes[0], bytes[1], bytes[2], bytes[3]))
    }
}
