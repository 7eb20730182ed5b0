//! The daemon's side of the control socket.

use std::{
    convert::identity,
    fs::{self, DirBuilder, Permissions},
    io::{self, Write},
    os::unix::{
        fs::{DirBuilderExt, FileTypeExt, PermissionsExt},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        mpsc::{self, RecvTimeoutError, Sender},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader},
    net::{UnixListener, UnixStream},
    sync::{Mutex as AsyncMutex, mpsc as async_mpsc, oneshot, watch},
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::{
    protocol::{MAX_REQUEST_BYTES, Request, Response, to_line},
    report::{GuardReport, ReloadReport, ServiceStats, StatsReport, StatusReport},
};
use crate::{
    Error,
    containment::{ContainedService, Input as ContainmentInput},
    metrics::{ConnectionMetrics, Endpoint, Rejection, Stage},
    policy::{enforcer::PolicyStates, resources::ResourceSnapshot},
    probes::ProbeStatus,
    queue::{Queue, Refused},
    recent::RecentLog,
    slots::{Slot, Slots},
    ssh_guard::{Control, Input},
};

const PERMISSION_DENIED: &str = "permission denied: root only";
const GUARD_STOPPED: &str = "the SSH guard is not running";
const EVICTED: &str = "closed to make room for another client: send the request at once";
/// Clients at a time. Only root gets in and each exchange is one short line, so a few suffice;
/// the bound keeps a misbehaving local client from taking the daemon's file descriptors.
pub(super) const MAX_CLIENTS: usize = 16;
/// A failed accept (e.g. out of file descriptors) would fail again at once; pause before retrying.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// `stats` requests closer together than this share one read of the kernel's counters (while
/// the resource snapshot stays the same), so that clients asking in a loop cost the daemon no
/// more than one reader.
const STATS_REUSE: Duration = Duration::from_millis(500);

/// Reads the per-service figures, with the resource figures from the given snapshot; called off
/// the async workers, at most every [`STATS_REUSE`].
pub type StatsSource = Arc<dyn Fn(&ResourceSnapshot) -> Vec<ServiceStats> + Send + Sync>;

/// A reload request: the reply carries its outcome.
pub type ReloadRequest = oneshot::Sender<ReloadReport>;

/// What the operator's requests read: each part is published by the part of the daemon that
/// owns it.
#[derive(Clone)]
pub struct DaemonView {
    pub guard: Queue<Input>,
    pub ssh_guard_enabled: bool,
    pub started: Instant,
    pub probes: watch::Receiver<Vec<ProbeStatus>>,
    pub policies: watch::Receiver<PolicyStates>,
    pub last_reload: watch::Receiver<Option<ReloadReport>>,
    pub reload: async_mpsc::Sender<ReloadRequest>,
    pub stats: StatsSource,
    /// Services held by containment now.
    pub contained: watch::Receiver<Vec<ContainedService>>,
    pub containment: Queue<ContainmentInput>,
    /// The resource refresh's latest figures.
    pub resources: watch::Receiver<Arc<ResourceSnapshot>>,
    pub events: watch::Receiver<RecentLog>,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Timeouts {
    /// How long a client may take to send its request, and to read the answer.
    pub(super) client: Duration,
    /// How long the SSH guard, or a reload, may take to answer.
    pub(super) guard: Duration,
}

/// The control socket, bound and not yet serving; the socket file goes when this does.
pub struct ControlSocket {
    listener: StdUnixListener,
    socket_file: SocketFile,
    pub(super) timeouts: Timeouts,
}

impl ControlSocket {
    /// Binds the socket at `path`, creating its directory (mode 0700) if needed. Call it before
    /// reporting the daemon as started, so that a second daemon fails at start-up.
    ///
    /// Replaces a socket file nobody listens on (left by a daemon that died); fails if a daemon
    /// is listening on it.
    pub fn bind(path: &Path) -> Result<Self, Error> {
        let error = |source| Error::ControlSocket {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path
            .parent()
            .filter(|parent| !parent.as_os_str().is_empty())
        {
            DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(error)?;
        }
        remove_stale_socket(path)?;
        let listener = StdUnixListener::bind(path).map_err(error)?;
        let socket_file = SocketFile(path.to_owned());
        fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(error)?;
        listener.set_nonblocking(true).map_err(error)?;
        Ok(Self {
            listener,
            socket_file,
            timeouts: Timeouts {
                client: Duration::from_secs(5),
                guard: Duration::from_secs(5),
            },
        })
    }

    /// Answers requests, each connection in its own task, until `cancel`; then removes the
    /// socket file. At most [`MAX_CLIENTS`] at a time: a client that has not sent its request
    /// is closed to make room for a new one, and when all are being answered a new client is
    /// refused at once.
    pub async fn serve(
        self,
        view: DaemonView,
        connections: ConnectionMetrics,
        cancel: CancellationToken,
    ) -> Result<(), Error> {
        let Self {
            listener,
            socket_file,
            timeouts,
        } = self;
        let listener = UnixListener::from_std(listener).map_err(|source| Error::ControlSocket {
            path: socket_file.0.clone(),
            source,
        })?;
        let mut slots = Slots::new(MAX_CLIENTS);
        let daemon = Arc::new(Served {
            view,
            stats: AsyncMutex::new(None),
        });
        loop {
            let accepted = tokio::select! {
                () = cancel.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    warn!("accepting a control connection failed: {error}");
                    tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                    continue;
                }
            };
            let admitted = tokio::select! {
                () = cancel.cancelled() => break,
                admitted = slots.admit() => admitted,
            };
            match admitted {
                Some(slot) => {
                    let client = Client {
                        daemon: daemon.clone(),
                        timeouts,
                        connections: connections.clone(),
                    };
                    tokio::spawn(client.serve(stream, slot));
                }
                None => {
                    connections.rejected(Endpoint::Control, Rejection::Busy);
                    refuse(stream);
                }
            }
        }
        Ok(())
    }
}

/// Answers "busy" if the socket takes it at once, and closes: the accept loop never waits on
/// a client, and a refused client keeps no descriptor.
fn refuse(stream: UnixStream) {
    let busy = Response::Error(format!(
        "busy: {MAX_CLIENTS} clients are being answered; try again"
    ));
    if let Ok(mut stream) = stream.into_std() {
        let _ = stream.write(&to_line(&busy));
    }
}

/// Removes the socket file when dropped, so that neither a clean shutdown nor a failed
/// start-up leaves it behind.
struct SocketFile(PathBuf);

impl Drop for SocketFile {
    fn drop(&mut self) {
        if let Err(error) = fs::remove_file(&self.0) {
            warn!(
                "cannot remove the control socket {}: {error}",
                self.0.display()
            );
        }
    }
}

fn remove_stale_socket(path: &Path) -> Result<(), Error> {
    let error = |source| Error::ControlSocket {
        path: path.to_owned(),
        source,
    };
    match fs::symlink_metadata(path) {
        Err(missing) if missing.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(other) => return Err(error(other)),
        Ok(metadata) if !metadata.file_type().is_socket() => {
            return Err(error(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "the path exists and is not a socket",
            )));
        }
        Ok(_) => {}
    }
    match StdUnixStream::connect(path) {
        Ok(_) => Err(Error::ControlSocketInUse {
            path: path.to_owned(),
        }),
        Err(refused) if refused.kind() == io::ErrorKind::ConnectionRefused => {
            fs::remove_file(path).map_err(error)
        }
        Err(other) => Err(error(other)),
    }
}

/// The daemon's view and the last stats sample, shared by the clients being served.
struct Served {
    view: DaemonView,
    stats: AsyncMutex<Option<(Instant, StatsReport)>>,
}

/// What serving one client needs.
struct Client {
    daemon: Arc<Served>,
    timeouts: Timeouts,
    connections: ConnectionMetrics,
}

impl Client {
    async fn serve(self, mut stream: UnixStream, slot: Slot) {
        let authorized = check_peer(&stream);
        let read = tokio::time::timeout(self.timeouts.client, read_request_line(&mut stream));
        let request = match slot.read_request(read).await {
            None => {
                self.connections
                    .rejected(Endpoint::Control, Rejection::IdleEvicted);
                Err(EVICTED.to_owned())
            }
            Some(Err(_)) => {
                self.connections
                    .timed_out(Endpoint::Control, Stage::Request);
                Err("timed out waiting for the request".to_owned())
            }
            Some(Ok(request)) => request,
        };
        let response = match (authorized, request) {
            // Closed without a word: a starting daemon checking whether this one is alive.
            (_, Ok(None)) => return,
            (Err(denied), _) => Response::Error(denied),
            (Ok(()), Err(unreadable)) => Response::Error(unreadable),
            (Ok(()), Ok(Some(line))) => respond(&line, &self.daemon, self.timeouts.guard).await,
        };
        let answer = to_line(&response);
        match tokio::time::timeout(self.timeouts.client, stream.write_all(&answer)).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!("cannot answer a control client: {error}"),
            Err(_) => {
                self.connections
                    .timed_out(Endpoint::Control, Stage::Response);
                debug!("a control client did not read its answer");
            }
        }
    }
}

/// The socket file's mode already keeps others out; this holds even if it is loosened.
fn check_peer(stream: &UnixStream) -> Result<(), String> {
    let peer = stream
        .peer_cred()
        .map_err(|error| format!("cannot read the client's credentials: {error}"))?;
    if peer.uid() == 0 {
        return Ok(());
    }
    warn!(uid = peer.uid(), pid = ?peer.pid(), "control connection refused: not root");
    Err(PERMISSION_DENIED.into())
}

/// One line of at most [`MAX_REQUEST_BYTES`], without its newline; `None` if the client closed
/// the connection without sending anything. A longer line is refused without reading the rest.
async fn read_request_line(stream: &mut UnixStream) -> Result<Option<Vec<u8>>, String> {
    let mut line = Vec::new();
    let mut reader = BufReader::new(stream.take(MAX_REQUEST_BYTES as u64 + 1));
    let read = reader
        .read_until(b'\n', &mut line)
        .await
        .map_err(|error| format!("cannot read the request: {error}"))?;
    if read == 0 {
        return Ok(None);
    }
    if line.last() == Some(&b'\n') {
        line.pop();
    } else if line.len() > MAX_REQUEST_BYTES {
        return Err(format!(
            "request too long: the limit is {MAX_REQUEST_BYTES} bytes"
        ));
    }
    Ok(Some(line))
}

async fn respond(line: &[u8], daemon: &Served, wait: Duration) -> Response {
    let request = match serde_json::from_slice(line) {
        Ok(request) => request,
        Err(error) => return Response::Error(format!("malformed request: {error}")),
    };
    let guard = &daemon.view.guard;
    let answer = match request {
        Request::Bans {} => ask_guard(guard, wait, Control::List)
            .await
            .map(Response::Bans),
        Request::Ban {
            address,
            for_seconds,
        } => ask_guard(guard, wait, |reply| Control::Ban {
            net: address,
            duration: Duration::from_secs(for_seconds),
            reply,
        })
        .await
        .and_then(identity)
        .map(Response::Changed),
        Request::Unban { address } => ask_guard(guard, wait, |reply| Control::Unban {
            net: address,
            reply,
        })
        .await
        .and_then(identity)
        .map(|unbanned| match unbanned.fleet_override {
            Some(_) => Response::FleetOverride(unbanned),
            None => Response::Changed(unbanned.net),
        }),
        Request::Status {} => Ok(Response::Status(Box::new(status(&daemon.view, wait).await))),
        Request::Stats {} => stats(daemon)
            .await
            .map(|stats| Response::Stats(Box::new(stats))),
        Request::Reload {} => reload(&daemon.view, wait).await.map(Response::Reloaded),
        Request::Release { service } => release(&daemon.view, service, wait)
            .await
            .map(Response::Released),
    };
    answer.unwrap_or_else(Response::Error)
}

async fn status(view: &DaemonView, wait: Duration) -> StatusReport {
    let ssh_guard = if view.ssh_guard_enabled {
        match ask_guard(&view.guard, wait, Control::Status).await {
            Ok(status) => GuardReport::Running(status),
            Err(reason) => GuardReport::NotAnswering { reason },
        }
    } else {
        GuardReport::Disabled
    };
    // Listed from a copy, so that the enforcer never waits for a status request.
    let policies = view.policies.borrow().clone();
    StatusReport {
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_seconds: view.started.elapsed().as_secs(),
        probes: view.probes.borrow().clone(),
        policies: policies.list(),
        ssh_guard,
        last_reload: view.last_reload.borrow().clone(),
        containment: view.contained.borrow().clone(),
    }
}

/// Hands `sentinel release SERVICE` to the containment thread and waits for its answer.
async fn release(view: &DaemonView, service: String, wait: Duration) -> Result<String, String> {
    const STOPPED: &str = "containment is not running";
    let (reply, answer) = oneshot::channel();
    match view
        .containment
        .offer(ContainmentInput::Release { service, reply })
    {
        Ok(()) => {}
        Err(Refused::Full) => return Err("containment is busy; try again".into()),
        Err(Refused::Closed) => return Err(STOPPED.into()),
    }
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(outcome)) => outcome,
        Ok(Err(_)) => Err(STOPPED.into()),
        Err(_) => Err("containment did not answer".into()),
    }
}

/// The last sample if it is recent and has the latest resource snapshot, otherwise a new one;
/// with the recent events as they are now. Clients wait their turn on the lock, so concurrent
/// requests take one sample between them.
async fn stats(daemon: &Served) -> Result<StatsReport, String> {
    let view = &daemon.view;
    let snapshot = Arc::clone(&view.resources.borrow());
    let resources_read_at_ms = snapshot
        .read_at
        .map(|read_at| read_at.saturating_duration_since(view.started).as_millis() as u64);
    let mut last = daemon.stats.lock().await;
    let mut report = match last.as_ref() {
        Some((taken, report))
            if taken.elapsed() < STATS_REUSE
                && report.resources_read_at_ms == resources_read_at_ms =>
        {
            report.clone()
        }
        _ => {
            let source = view.stats.clone();
            let services = tokio::task::spawn_blocking(move || source(&snapshot))
                .await
                .map_err(|_| "reading the statistics failed".to_owned())?;
            let report = StatsReport {
                sampled_at_ms: view.started.elapsed().as_millis() as u64,
                resources_read_at_ms,
                services,
                events: Vec::new(),
            };
            *last = Some((Instant::now(), report.clone()));
            report
        }
    };
    report.events = view.events.borrow().to_vec();
    Ok(report)
}

/// Hands the request to the daemon's main loop, which reloads as it does on SIGHUP.
async fn reload(view: &DaemonView, wait: Duration) -> Result<ReloadReport, String> {
    const STOPPING: &str = "the daemon is shutting down";
    let (reply, answer) = oneshot::channel();
    match view.reload.try_send(reply) {
        Ok(()) => {}
        Err(async_mpsc::error::TrySendError::Full(_)) => {
            return Err("a reload is already under way; try again".into());
        }
        Err(async_mpsc::error::TrySendError::Closed(_)) => return Err(STOPPING.into()),
    }
    match tokio::time::timeout(wait, answer).await {
        Ok(Ok(report)) => Ok(report),
        Ok(Err(_)) => Err(STOPPING.into()),
        Err(_) => Err("the reload did not finish in time".into()),
    }
}

/// Sends the guard's thread the `Control` that `control` makes around a fresh reply channel,
/// and waits for the reply off the async workers.
async fn ask_guard<T: Send + 'static>(
    guard: &Queue<Input>,
    wait: Duration,
    control: impl FnOnce(Sender<T>) -> Control,
) -> Result<T, String> {
    let (reply, answer) = mpsc::channel();
    match guard.offer(Input::Control(control(reply))) {
        Ok(()) => {}
        Err(Refused::Full) => return Err("the SSH guard is busy; try again".into()),
        Err(Refused::Closed) => return Err(GUARD_STOPPED.into()),
    }
    match tokio::task::spawn_blocking(move || answer.recv_timeout(wait)).await {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(RecvTimeoutError::Timeout)) => Err("the SSH guard did not answer".into()),
        Ok(Err(RecvTimeoutError::Disconnected)) | Err(_) => Err(GUARD_STOPPED.into()),
    }
}
