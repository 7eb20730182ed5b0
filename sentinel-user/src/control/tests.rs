//! The control socket end to end: a real socket in a temporary directory, served to the real
//! client by a fake SSH guard thread that keeps its bans in memory.

use std::{
    collections::BTreeMap,
    env, fs,
    io::{BufRead, BufReader, Read, Write},
    os::unix::{
        fs::{FileTypeExt, PermissionsExt},
        net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream},
    },
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use prometheus_client::{encoding::text::encode, registry::Registry};
use tokio::{runtime::Runtime, task::JoinHandle};
use tokio_util::sync::CancellationToken;

use super::{
    ControlSocket, DaemonView, Request, Response, ban, bans, protocol::to_line,
    report::ServiceStats, request, server::MAX_CLIENTS, unban,
};
use crate::{
    Error,
    cgroup::stats::{CgroupStats, Figure},
    metrics::ConnectionMetrics,
    policy::{Mode, enforcer::AppliedSummary, resources::ResourceSnapshot},
    queue::{self, Inbox, Queue, QueueDrops},
    recent::{RecentEvent, RecentLog},
    ssh_guard::{BanInfo, Control, GuardMode, GuardStatus, Input, Unbanned},
};

/// A fresh directory under the system's temporary directory, removed with its contents.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let path = env::temp_dir().join(format!(
            "sentinel-control-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        fs::create_dir(&path).unwrap();
        Self(path)
    }

    /// In a directory that does not exist yet, so that binding creates it.
    fn socket_path(&self) -> PathBuf {
        self.0.join("run/control.sock")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A queue to the SSH guard, as the daemon makes it.
fn test_queue() -> (Queue<Input>, Inbox<Input>) {
    queue::bounded("ssh_guard", 64, &QueueDrops::new(&mut Registry::default()))
}

/// Answers `Control` messages from an in-memory list of bans until every sender is gone.
fn fake_guard() -> Queue<Input> {
    let (guard, inputs) =
        queue::bounded("ssh_guard", 16, &QueueDrops::new(&mut Registry::default()));
    thread::spawn(move || {
        let mut bans: Vec<BanInfo> = Vec::new();
        while let Ok(input) = inputs.recv_timeout(Duration::MAX) {
            let Input::Control(control) = input else {
                continue;
            };
            match control {
                Control::List(reply) => {
                    let _ = reply.send(bans.clone());
                }
                Control::Status(reply) => {
                    let _ = reply.send(GuardStatus {
                        mode: GuardMode::Enforce,
                        tracked_addresses: 0,
                        bans_in_force: bans.len() as u64,
                    });
                }
                Control::Ban {
                    net,
                    duration,
                    reply,
                } => {
                    bans.retain(|ban| ban.address != net.to_string());
                    bans.push(BanInfo {
                        address: net.to_string(),
                        reason: "operator".into(),
                        failures: 0,
                        expires_in_seconds: duration.as_secs(),
                    });
                    let _ = reply.send(Ok(net));
                }
                Control::Unban { net, reply } => {
                    let before = bans.len();
                    bans.retain(|ban| ban.address != net.to_string());
                    let _ = reply.send(if bans.len() < before {
                        Ok(Unbanned {
                            net,
                            fleet_override: None,
                        })
                    } else {
                        Err(format!("{net} is not banned"))
                    });
                }
            }
        }
    });
    guard
}

/// The one event the test daemon has seen.
fn sigterm_event() -> RecentEvent {
    RecentEvent {
        time: "2026-11-21T15:04:05.123Z".into(),
        kind: "sigterm".into(),
        subject: "web".into(),
        detail: String::new(),
    }
}

/// What the daemon would publish: no probes, no policies, no reload yet, one service whose
/// memory the resource refresh read 1.5 s after the start, and one event.
fn view(guard: Queue<Input>) -> DaemonView {
    let (reload, _) = tokio::sync::mpsc::channel(1);
    let started = Instant::now();
    let snapshot = ResourceSnapshot {
        read_at: Some(started + Duration::from_millis(1500)),
        policed: Arc::new(BTreeMap::from([(
            "/web".into(),
            AppliedSummary {
                policy: "web".into(),
                mode: Mode::Enforce,
                memory_max: None,
                id: 0,
            },
        )])),
        stats: vec![CgroupStats::default().with(Figure::MemoryCurrent, 4096)],
        from_files: 0,
    };
    let mut events = RecentLog::default();
    events.push(sigterm_event());
    DaemonView {
        guard,
        ssh_guard_enabled: true,
        started,
        probes: tokio::sync::watch::channel(Vec::new()).1,
        policies: tokio::sync::watch::channel(Default::default()).1,
        last_reload: tokio::sync::watch::channel(None).1,
        reload,
        stats: Arc::new(|snapshot: &ResourceSnapshot| {
            vec![ServiceStats {
                service: "web".into(),
                execs: 3,
                memory_bytes: snapshot.stats[0].get(Figure::MemoryCurrent),
                ..ServiceStats::default()
            }]
        }),
        contained: tokio::sync::watch::channel(Vec::new()).1,
        containment: queue::bounded("containment", 1, &QueueDrops::new(&mut Registry::default())).0,
        resources: tokio::sync::watch::channel(Arc::new(snapshot)).1,
        events: tokio::sync::watch::channel(events).1,
    }
}

/// A control socket served on its own runtime, as the daemon would.
struct Daemon {
    path: PathBuf,
    runtime: Runtime,
    cancel: CancellationToken,
    server: JoinHandle<Result<(), Error>>,
    registry: Registry,
    _dir: TempDir,
}

impl Daemon {
    fn start(guard: Queue<Input>) -> Self {
        Self::start_with(guard, |_| {})
    }

    fn start_with(guard: Queue<Input>, adjust: impl FnOnce(&mut ControlSocket)) -> Self {
        let dir = TempDir::new();
        let path = dir.socket_path();
        let mut socket = ControlSocket::bind(&path).unwrap();
        adjust(&mut socket);
        let runtime = Runtime::new().unwrap();
        let cancel = CancellationToken::new();
        let mut registry = Registry::default();
        let connections = ConnectionMetrics::new(&mut registry);
        let server = runtime.spawn(socket.serve(view(guard), connections, cancel.clone()));
        Self {
            path,
            runtime,
            cancel,
            server,
            registry,
            _dir: dir,
        }
    }

    /// The value of one of the control endpoint's connection counters, e.g.
    /// `sentinel_connections_rejected_total{endpoint="control",reason="busy"}`.
    fn counter(&self, series: &str) -> u64 {
        let mut text = String::new();
        encode(&mut text, &self.registry).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
            .parse()
            .unwrap()
    }

    /// Sends `request` exactly as given and decodes the answer.
    fn exchange(&self, request: &[u8]) -> Response {
        let mut stream = StdUnixStream::connect(&self.path).unwrap();
        stream.write_all(request).unwrap();
        serde_json::from_str(&read_answer(stream)).unwrap()
    }

    /// Stops serving and checks that the socket file went with it.
    fn stop(self) {
        self.cancel.cancel();
        self.runtime.block_on(self.server).unwrap().unwrap();
        assert!(!self.path.exists(), "the socket file outlived the server");
    }
}

/// One line, as the client reads it: the server may close without reading all of an
/// over-long request, and then the kernel reports a reset after the answer.
fn read_answer(stream: StdUnixStream) -> String {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(stream).read_line(&mut answer).unwrap();
    answer
}

fn error_message(response: Response) -> String {
    match response {
        Response::Error(message) => message,
        other => panic!("expected an error, got {other:?}"),
    }
}

fn mode(path: &Path) -> u32 {
    fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[test]
fn bans_ban_and_unban_round_trip() {
    let daemon = Daemon::start(fake_guard());
    let path = &daemon.path;
    assert_eq!(bans(path).unwrap(), "no bans in force");
    assert_eq!(
        ban(path, "192.0.2.7", "1h").unwrap(),
        "banned 192.0.2.7 for 1h"
    );
    assert_eq!(
        ban(path, "2001:db8::7", "10m").unwrap(),
        "banned 2001:db8::7 for 10m"
    );
    assert_eq!(
        bans(path).unwrap(),
        "ADDRESS      REASON    FAILURES  EXPIRES\n\
         192.0.2.7    operator  0         in 1h\n\
         2001:db8::7  operator  0         in 10m"
    );
    assert_eq!(
        unban(path, "192.0.2.7").unwrap(),
        Unbanned {
            net: "192.0.2.7".parse().unwrap(),
            fleet_override: None
        }
    );
    match unban(path, "192.0.2.7") {
        Err(Error::ControlRejected(message)) => assert_eq!(message, "192.0.2.7 is not banned"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        bans(path).unwrap(),
        "ADDRESS      REASON    FAILURES  EXPIRES\n\
         2001:db8::7  operator  0         in 10m"
    );
    daemon.stop();
}

#[test]
fn malformed_requests_get_an_error_and_the_server_keeps_serving() {
    let daemon = Daemon::start(fake_guard());
    for request in [
        "{not json\n",
        "\n",
        "{\"command\":\"reboot\"}\n",
        "{\"command\":\"ban\",\"address\":\"192.0.2.7\"}\n",
    ] {
        let message = error_message(daemon.exchange(request.as_bytes()));
        assert!(message.starts_with("malformed request: "), "{message}");
    }
    assert_eq!(
        daemon.exchange(b"{\"command\":\"bans\"}\n"),
        Response::Bans(Vec::new())
    );
    daemon.stop();
}

#[test]
fn over_long_request_is_refused() {
    let daemon = Daemon::start(fake_guard());
    let padding = "x".repeat(super::protocol::MAX_REQUEST_BYTES);
    let request = format!("{{\"command\":\"bans\",\"padding\":\"{padding}\"}}\n");
    assert_eq!(
        error_message(daemon.exchange(request.as_bytes())),
        "request too long: the limit is 4096 bytes"
    );
    assert_eq!(bans(&daemon.path).unwrap(), "no bans in force");
    daemon.stop();
}

#[test]
fn silent_client_is_timed_out_and_counted() {
    let daemon = Daemon::start_with(fake_guard(), |socket| {
        socket.timeouts.client = Duration::from_millis(200);
    });
    let stream = StdUnixStream::connect(&daemon.path).unwrap();
    let answer = serde_json::from_str(&read_answer(stream)).unwrap();
    assert_eq!(error_message(answer), "timed out waiting for the request");
    assert_eq!(
        daemon
            .counter(r#"sentinel_connections_timed_out_total{endpoint="control",stage="request"}"#),
        1
    );
    daemon.stop();
}

/// Clients that connect and say nothing hold every slot; each new client closes the oldest.
#[test]
fn silent_clients_make_room_for_a_client_that_asks() {
    let daemon = Daemon::start(fake_guard());
    const EXTRA: usize = 3;
    let silent: Vec<StdUnixStream> = (0..MAX_CLIENTS + EXTRA)
        .map(|_| StdUnixStream::connect(&daemon.path).unwrap())
        .collect();
    assert_eq!(bans(&daemon.path).unwrap(), "no bans in force");

    // The oldest EXTRA + 1 were closed (one for each newer silent client, one for `bans`).
    let evicted = EXTRA + 1;
    for stream in &silent[..evicted] {
        let answer = serde_json::from_str(&read_answer(stream.try_clone().unwrap())).unwrap();
        assert_eq!(
            error_message(answer),
            "closed to make room for another client: send the request at once"
        );
    }
    for stream in &silent[evicted..] {
        stream.set_nonblocking(true).unwrap();
        let mut byte = [0u8];
        let still_open = (&*stream).read(&mut byte).unwrap_err();
        assert_eq!(still_open.kind(), std::io::ErrorKind::WouldBlock);
    }
    assert_eq!(
        daemon.counter(
            r#"sentinel_connections_rejected_total{endpoint="control",reason="idle_evicted"}"#
        ),
        evicted as u64
    );
    assert_eq!(
        daemon.counter(r#"sentinel_connections_rejected_total{endpoint="control",reason="busy"}"#),
        0
    );
    daemon.stop();
}

/// When every slot is waiting on the SSH guard, a new client is told at once to come back.
#[test]
fn clients_beyond_the_cap_are_refused_when_all_are_being_answered() {
    let (guard, inputs) = test_queue();
    let daemon = Daemon::start(guard);
    let waiting: Vec<StdUnixStream> = (0..MAX_CLIENTS)
        .map(|_| {
            let mut stream = StdUnixStream::connect(&daemon.path).unwrap();
            stream.write_all(b"{\"command\":\"bans\"}\n").unwrap();
            stream
        })
        .collect();
    // Every request has reached the guard, so every slot is being answered.
    let held: Vec<Input> = (0..MAX_CLIENTS)
        .map(|_| inputs.recv_timeout(Duration::MAX).expect("a request"))
        .collect();
    match bans(&daemon.path) {
        Err(Error::ControlRejected(message)) => assert_eq!(
            message,
            format!("busy: {MAX_CLIENTS} clients are being answered; try again")
        ),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        daemon.counter(r#"sentinel_connections_rejected_total{endpoint="control",reason="busy"}"#),
        1
    );
    for input in held {
        let Input::Control(Control::List(reply)) = input else {
            panic!("expected a list request");
        };
        reply.send(Vec::new()).unwrap();
    }
    for stream in waiting {
        let answer = serde_json::from_str::<Response>(&read_answer(stream)).unwrap();
        assert_eq!(answer, Response::Bans(Vec::new()));
    }
    daemon.stop();
}

/// A daemon that refuses a client answers and closes at once, maybe before the request is
/// written: the client shows that answer, not a broken pipe. A request bigger than the socket
/// takes makes the race certain.
#[test]
fn an_answer_sent_before_the_request_was_read_is_shown() {
    let dir = TempDir::new();
    let path = dir.0.join("control.sock");
    let listener = StdUnixListener::bind(&path).unwrap();
    let busy = Response::Error("busy: try again".into());
    let answer = busy.clone();
    let daemon = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        stream.write_all(&to_line(&answer)).unwrap();
        // Closed with the request unread.
    });
    let service = "s".repeat(4 << 20);
    assert_eq!(request(&path, &Request::Release { service }).unwrap(), busy);
    daemon.join().unwrap();
}

#[test]
fn guard_that_does_not_answer_times_out() {
    let (guard, inputs) = test_queue();
    let daemon = Daemon::start_with(guard, |socket| {
        socket.timeouts.guard = Duration::from_millis(200);
    });
    let message = |result: Result<String, Error>| match result {
        Err(Error::ControlRejected(message)) => message,
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert_eq!(message(bans(&daemon.path)), "the SSH guard did not answer");
    drop(inputs);
    assert_eq!(
        message(unban(&daemon.path, "192.0.2.7").map(|unbanned| unbanned.net.to_string())),
        "the SSH guard is not running"
    );
    daemon.stop();
}

#[test]
fn second_daemon_fails_and_stale_socket_is_replaced() {
    let dir = TempDir::new();
    let path = dir.socket_path();
    let first = ControlSocket::bind(&path).unwrap();
    let Err(error) = ControlSocket::bind(&path) else {
        panic!("a second daemon bound the same socket");
    };
    assert_eq!(
        error.to_string(),
        format!(
            "another sentinel is running: it is listening on {}",
            path.display()
        )
    );
    assert!(path.exists(), "the running daemon's socket was removed");
    drop(first);
    assert!(!path.exists());

    // What a daemon that was killed leaves behind: the file, with nobody listening.
    drop(StdUnixListener::bind(&path).unwrap());
    assert!(matches!(bans(&path), Err(Error::DaemonUnreachable { .. })));
    let replacement = ControlSocket::bind(&path).unwrap();
    StdUnixStream::connect(&path).unwrap();
    drop(replacement);

    fs::write(&path, "not a socket").unwrap();
    let Err(error) = ControlSocket::bind(&path) else {
        panic!("a regular file was replaced by the socket");
    };
    assert!(
        error
            .to_string()
            .ends_with("the path exists and is not a socket")
    );
    assert_eq!(fs::read_to_string(&path).unwrap(), "not a socket");
}

#[test]
fn socket_is_0600_in_a_0700_directory() {
    let daemon = Daemon::start(fake_guard());
    assert!(fs::metadata(&daemon.path).unwrap().file_type().is_socket());
    assert_eq!(mode(&daemon.path), 0o600);
    assert_eq!(mode(daemon.path.parent().unwrap()), 0o700);
    daemon.stop();
}

#[test]
fn status_stats_and_reload_are_answered_from_what_the_daemon_publishes() {
    let daemon = Daemon::start(fake_guard());
    let path = &daemon.path;
    ban(path, "192.0.2.0/24", "1h").unwrap();
    let status = super::status(path).unwrap();
    assert_eq!(status.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(
        status.ssh_guard,
        super::report::GuardReport::Running(GuardStatus {
            mode: GuardMode::Enforce,
            tracked_addresses: 0,
            bans_in_force: 1,
        })
    );
    assert!(status.problems().is_empty());
    assert!(
        super::status_text(&status).ends_with(
            "ssh guard: enforcing, 0 tracked addresses, 1 ban in force\n\
             containment: no service is held\n\
             last reload: none since the start\n\
             everything Sentinel is asked to do works"
        ),
        "{}",
        super::status_text(&status)
    );
    let stats = super::stats(path).unwrap();
    assert_eq!(stats.services.len(), 1);
    assert_eq!(stats.services[0].service, "web");
    assert_eq!(stats.services[0].execs, 3);
    assert_eq!(stats.services[0].memory_bytes, Some(4096));
    assert_eq!(stats.resources_read_at_ms, Some(1500));
    assert_eq!(stats.events, [sigterm_event()]);
    // Nobody takes reload requests in this daemon, as while the daemon shuts down.
    match super::reload(path) {
        Err(Error::ControlRejected(message)) => assert_eq!(message, "the daemon is shutting down"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    daemon.stop();
}
