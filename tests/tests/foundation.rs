//! The foundation on the real kernel: exact exec and TCP counts per service, probe failure
//! isolation, promtool-clean metrics, clean shutdown and clear start-up errors.

use std::{
    io::{BufRead, BufReader},
    net::SocketAddr,
    process::{Command, Stdio},
    time::Duration,
};

use sentinel_tests::{
    Daemon, NO_FIREWALL, TempDir, TestCgroup, assert_promtool_clean, eventually, free_port,
    http_get, loaded_sentinel_programs, serial, testkit_bin, unique_suffix,
};

const SETTLE: Duration = Duration::from_secs(5);

/// Runs `count` connections from `client` to a listener in `server` at `bind`; returns the
/// listener's port.
fn connect_loop(server: &TestCgroup, client: &TestCgroup, bind: &str, count: usize) -> u16 {
    let mut listener = server
        .command(testkit_bin())
        .args(["listen", bind, &count.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start listener");
    let mut port = String::new();
    BufReader::new(listener.stdout.take().unwrap())
        .read_line(&mut port)
        .expect("read listener port");
    let host = bind.rsplit_once(':').unwrap().0;
    let status = client
        .command(testkit_bin())
        .args([
            "connect",
            &format!("{host}:{}", port.trim()),
            &count.to_string(),
        ])
        .status()
        .expect("run connector");
    assert!(status.success(), "connector failed: {status}");
    assert!(listener.wait().expect("listener").success());
    port.trim().parse().expect("the listener's port")
}

#[test]
fn exec_count_per_service_is_exact() {
    let _serial = serial();
    // The events module's debug lines are the exec records' reader: with them on, the exec
    // program writes a record per exec besides counting.
    let daemon = Daemon::start(&[("SENTINEL_LOG", "info,sentinel_user::events=debug")]);
    assert!(
        records_switch(&daemon),
        "exec records off with debug lines on"
    );
    let cgroup = TestCgroup::new("exec");
    let dir = TempDir::new("sentinel-exec");
    let program = dir.path().join(format!("sntl-{}", unique_suffix()));
    std::fs::copy("/bin/true", &program).expect("copy /bin/true");
    let service = [("service", cgroup.service())];
    // A new cgroup has counted nothing yet.
    daemon
        .scrape()
        .assert_absent("sentinel_exec_total", &service);

    const RUNS: u64 = 25;
    for _ in 0..RUNS {
        assert!(cgroup.command(&program).status().expect("exec").success());
    }

    daemon.await_count("sentinel_exec_total", &service, RUNS, SETTLE);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        daemon.scrape().count("sentinel_exec_total", &service),
        RUNS,
        "kernel counter for {}",
        cgroup.service()
    );

    // Every exec also reached user space as an event, attributed to the same service.
    let filename = program.to_str().unwrap();
    let events = || {
        daemon
            .log_records(&[("message", "exec"), ("filename", filename)])
            .into_iter()
            .filter(|record| record["service"] == cgroup.service())
            .count() as u64
    };
    assert!(
        eventually(SETTLE, || events() >= RUNS),
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(events(), RUNS);
    assert_eq!(
        daemon
            .scrape()
            .count("sentinel_events_lost_total", &[("kind", "exec")]),
        0
    );
}

/// Whether the daemon had the exec and TCP programs write per-event records, from its start line.
#[test]
fn a_removed_cgroups_counts_stay_with_its_service_until_forgotten() {
    let _serial = serial();
    // The SSH guard off, as in every test here (its table would outlive the daemon), and a
    // retention long enough that the scrape right after the removal is surely inside it.
    let daemon = Daemon::start_with_config(
        &format!("{NO_FIREWALL}services:\n  forget_removed_after: 20s\n"),
        &[],
    );
    let cgroup = TestCgroup::new("forget");
    let name = cgroup.service().to_string();
    let service = [("service", name.as_str())];
    const RUNS: u64 = 4;
    for _ in 0..RUNS {
        assert!(
            cgroup
                .command("/bin/true")
                .status()
                .expect("exec")
                .success()
        );
    }
    daemon.await_count("sentinel_exec_total", &service, RUNS, SETTLE);
    drop(cgroup);
    // The cgroup is gone, its count is not: the service keeps what it did.
    assert_eq!(daemon.scrape().count("sentinel_exec_total", &service), RUNS);
    // Then the whole series goes, so that removed cgroups do not pile up label values.
    assert!(
        eventually(Duration::from_secs(120), || daemon
            .scrape()
            .find("sentinel_exec_total", &service)
            .is_none()),
        "the removed service's series is still exported"
    );
    daemon
        .scrape()
        .assert_absent("sentinel_exec_total", &service);
}

fn records_switch(daemon: &Daemon) -> bool {
    let running = daemon.log_records(&[("message", "sentinel is running")]);
    let [running] = running.as_slice() else {
        panic!("not one start line; log:\n{}", daemon.log());
    };
    running["exec_tcp_records"]
        .as_bool()
        .unwrap_or_else(|| panic!("no exec_tcp_records in {running}"))
}

/// TCP event records of `kind` (`tcp connect`, `tcp accept`) from `service` whose `port_field`
/// (`remote_port` for a connect, `local_port` for an accept) is `port`.
/// The `kind` records of `service` whose `side` (`local` or `remote`) is `address`:`port`. The
/// address counts: the IPv4 and the IPv6 listener may well get the same port.
fn tcp_events(
    daemon: &Daemon,
    kind: &str,
    service: &str,
    side: &str,
    address: SocketAddr,
) -> usize {
    daemon
        .log_records(&[("message", kind), ("service", service)])
        .iter()
        .filter(|record| {
            record[side] == address.ip().to_string()
                && record[format!("{side}_port")] == address.port()
        })
        .count()
}

#[test]
fn tcp_connects_and_accepts_per_service_are_exact() {
    let _serial = serial();
    let daemon = Daemon::start(&[("SENTINEL_LOG", "info,sentinel_user::events=debug")]);
    assert!(
        records_switch(&daemon),
        "TCP records off with debug lines on"
    );
    let server = TestCgroup::new("server");
    let client = TestCgroup::new("client");
    const PER_FAMILY: usize = 20;

    let listeners = [("127.0.0.1", "127.0.0.1:0"), ("::1", "[::1]:0")].map(|(host, bind)| {
        let port = connect_loop(&server, &client, bind, PER_FAMILY);
        SocketAddr::new(host.parse().expect("a loopback address"), port)
    });

    let expected = 2 * PER_FAMILY as u64;
    let connects = [("service", client.service())];
    let accepts = [("service", server.service())];
    daemon.await_count("sentinel_tcp_connects_total", &connects, expected, SETTLE);
    daemon.await_count("sentinel_tcp_accepts_total", &accepts, expected, SETTLE);
    std::thread::sleep(Duration::from_millis(300));
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.count("sentinel_tcp_connects_total", &connects),
        expected,
        "outbound connects from {}",
        client.service()
    );
    assert_eq!(
        scrape.count("sentinel_tcp_accepts_total", &accepts),
        expected,
        "accepted connections in {}",
        server.service()
    );
    // Neither side is credited with the other's direction.
    assert_eq!(scrape.count("sentinel_tcp_accepts_total", &connects), 0);
    assert_eq!(scrape.count("sentinel_tcp_connects_total", &accepts), 0);

    // Every connection also reached user space as one event per side, per family.
    for listener in listeners {
        let sides = || {
            (
                tcp_events(&daemon, "tcp connect", client.service(), "remote", listener),
                tcp_events(&daemon, "tcp accept", server.service(), "local", listener),
            )
        };
        assert!(
            eventually(SETTLE, || sides() == (PER_FAMILY, PER_FAMILY)),
            "{listener}: {:?} events (connect, accept); log:\n{}",
            sides(),
            daemon.log()
        );
    }
    let scrape = daemon.scrape();
    for kind in ["tcp_connect", "tcp_accept"] {
        assert_eq!(
            scrape.count("sentinel_events_lost_total", &[("kind", kind)]),
            0
        );
    }
}

#[test]
fn a_probe_that_fails_to_attach_is_reported_and_the_others_keep_working() {
    let _serial = serial();
    let daemon = Daemon::start(&[("SENTINEL_FAULT_INJECT_PROBE", "exec")]);
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.value("sentinel_probe_attached", &[("program", "exec")]),
        0.0
    );
    for program in ["tcp_state", "oom_kill", "cgroup_mkdir", "cgroup_rmdir"] {
        assert_eq!(
            scrape.value("sentinel_probe_attached", &[("program", program)]),
            1.0,
            "{program} should be attached"
        );
    }
    // The failed exec program is wanted everywhere, so it is alerted on; the SSH programs only
    // where there is a libpam (the build host has one, the VM guest none), so that a host
    // without sshd is not paged (sentinel-rules.test.yml proves the alert's side of it).
    assert_eq!(
        scrape.value("sentinel_probe_wanted", &[("program", "exec")]),
        1.0
    );
    // The loader's cache, as sshd's own loader finds libpam; no ldconfig, no cache.
    let has_libpam = ["ldconfig", "/sbin/ldconfig"]
        .iter()
        .find_map(|program| Command::new(program).arg("-p").output().ok())
        .is_some_and(|cache| String::from_utf8_lossy(&cache.stdout).contains("libpam.so.0 "));
    assert_eq!(
        scrape.value("sentinel_probe_wanted", &[("program", "ssh_auth_result")]),
        if has_libpam { 1.0 } else { 0.0 },
        "libpam in the loader's cache: {has_libpam}"
    );
    assert!(
        !daemon
            .log_records(&[("level", "WARN"), ("probe", "exec")])
            .is_empty(),
        "no warning about the exec probe in:\n{}",
        daemon.log()
    );

    let server = TestCgroup::new("server");
    let client = TestCgroup::new("client");
    connect_loop(&server, &client, "127.0.0.1:0", 5);
    assert!(cgroup_exec(&client));
    let service = [("service", client.service())];
    daemon.await_count("sentinel_tcp_connects_total", &service, 5, SETTLE);
    assert_eq!(daemon.scrape().count("sentinel_exec_total", &service), 0);
}

fn cgroup_exec(cgroup: &TestCgroup) -> bool {
    cgroup
        .command("/bin/true")
        .status()
        .expect("exec")
        .success()
}

#[test]
fn metrics_pass_promtool_and_negotiate_openmetrics() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let cgroup = TestCgroup::new("promtool");
    assert!(cgroup_exec(&cgroup));
    let scrape = daemon.scrape();
    let text = &scrape.0;
    for family in [
        "sentinel_exec_total",
        "sentinel_tcp_connects_total",
        "sentinel_tcp_accepts_total",
        "sentinel_oom_kills_total",
        "sentinel_events_lost_total",
        "sentinel_probe_attached",
        "sentinel_build_info",
    ] {
        assert!(
            text.contains(&format!("# HELP {family} ")),
            "no HELP for {family}"
        );
    }

    assert_promtool_clean(&scrape);

    let openmetrics = http_get(
        daemon.addr,
        "/metrics",
        Some("application/openmetrics-text"),
    )
    .expect("scrape OpenMetrics");
    assert!(openmetrics.ends_with("# EOF\n"));
    assert!(openmetrics.contains("# TYPE sentinel_exec counter"));
}

/// A generous bound on how long a stop may take before the test calls it hung; how long it
/// really takes is measured by `cargo xtask bench`, not asserted here.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// The probes `sentinel_probe_attached` reports attached (value 1).
fn attached_probes(daemon: &Daemon) -> usize {
    daemon
        .scrape()
        .0
        .lines()
        .filter(|line| line.starts_with("sentinel_probe_attached{") && line.ends_with(" 1"))
        .count()
}

/// Waits until none of `ours` is loaded any more; the kernel frees programs shortly after
/// their last reference is closed.
fn assert_unloaded(ours: &[u32]) {
    let gone = || {
        !loaded_sentinel_programs()
            .iter()
            .any(|id| ours.contains(id))
    };
    assert!(
        eventually(HANG_GUARD, gone),
        "programs {ours:?} still loaded"
    );
}

/// Every program the daemon loaded is attached and reported: exactly as many as
/// `sentinel_probe_attached` counts.
fn loaded_by(daemon: &Daemon, before: &std::collections::BTreeSet<u32>) -> Vec<u32> {
    let ours: Vec<u32> = loaded_sentinel_programs()
        .difference(before)
        .copied()
        .collect();
    assert_eq!(ours.len(), attached_probes(daemon), "{ours:?}");
    assert!(!ours.is_empty());
    ours
}

#[test]
fn sigterm_detaches_every_program_and_exits_zero() {
    let _serial = serial();
    let before = loaded_sentinel_programs();
    let mut daemon = Daemon::start(&[]);
    let ours = loaded_by(&daemon, &before);

    daemon.signal(libc::SIGTERM);
    let (status, _) = daemon
        .wait_exit(HANG_GUARD)
        .expect("sentinel did not exit after SIGTERM");
    assert!(
        status.success(),
        "exit status {status}; log:\n{}",
        daemon.log()
    );
    assert_unloaded(&ours);
}

#[test]
fn sigint_stops_the_daemon_the_same_way() {
    let _serial = serial();
    let before = loaded_sentinel_programs();
    let mut daemon = Daemon::start(&[]);
    let ours = loaded_by(&daemon, &before);
    daemon.signal(libc::SIGINT);
    let (status, _) = daemon.wait_exit(HANG_GUARD).expect("no exit after SIGINT");
    assert!(status.success(), "{status}; log:\n{}", daemon.log());
    assert_unloaded(&ours);
}

/// The parts of a daemon without the SSH guard.
const COMPONENTS: [&str; 12] = [
    "alerts reader",
    "allowed executables watch",
    "config watcher",
    "containment",
    "control socket",
    "enforcer",
    "events reader",
    "metrics server",
    "probe keeper",
    "recent events",
    "resource refresh",
    "ssh events reader",
];

#[test]
fn every_part_of_the_daemon_reports_itself_up() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let scrape = daemon.scrape();
    let mut up: Vec<(String, String)> = scrape
        .0
        .lines()
        .filter_map(|line| line.strip_prefix("sentinel_component_up{component=\""))
        .filter_map(|rest| rest.split_once("\"} "))
        .map(|(component, value)| (component.to_owned(), value.to_owned()))
        .collect();
    up.sort();
    let expected: Vec<(String, String)> = COMPONENTS
        .iter()
        .map(|component| (component.to_string(), "1".to_owned()))
        .collect();
    assert_eq!(up, expected);
}

#[test]
fn a_part_that_stops_stops_the_daemon_with_an_error() {
    let _serial = serial();
    // A thread, a task, and the thread that owns the programs.
    for component in ["enforcer", "alerts reader", "probe keeper"] {
        let before = loaded_sentinel_programs();
        let mut daemon = Daemon::spawn(free_port(), &[("SENTINEL_FAULT_INJECT_STOP", component)]);
        let (status, _) = daemon
            .wait_exit(HANG_GUARD)
            .unwrap_or_else(|| panic!("sentinel ran on without its {component}"));
        assert_eq!(
            status.code(),
            Some(1),
            "{component}: {status}\n{}",
            daemon.log()
        );
        let reports = daemon.log_records(&[
            (
                "message",
                "a part of Sentinel stopped; exiting so that the service manager restarts it",
            ),
            ("component", component),
            ("reason", "it panicked"),
        ]);
        assert_eq!(reports.len(), 1, "{component}:\n{}", daemon.log());
        let stderr_error = format!("the {component} stopped: it panicked");
        assert!(daemon.log().contains(&stderr_error), "{}", daemon.log());
        let left: Vec<u32> = loaded_sentinel_programs()
            .difference(&before)
            .copied()
            .collect();
        assert_unloaded(&left);
    }
}

#[test]
fn a_taken_metrics_port_is_a_clear_error_that_loads_nothing() {
    let _serial = serial();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let before = loaded_sentinel_programs();
    let mut daemon = Daemon::spawn(port, &[]);
    let (status, _) = daemon
        .wait_exit(Duration::from_secs(10))
        .expect("sentinel kept running");
    assert!(!status.success());
    assert!(
        daemon.log().contains("already in use"),
        "log:\n{}",
        daemon.log()
    );
    let new: Vec<u32> = loaded_sentinel_programs()
        .difference(&before)
        .copied()
        .collect();
    assert!(new.is_empty(), "programs loaded despite the error: {new:?}");
}

#[test]
fn an_unprivileged_user_gets_a_clear_error() {
    let _serial = serial();
    use std::os::unix::process::CommandExt;
    // Readable by nobody; a device such as /dev/null is refused as a configuration.
    let dir = TempDir::new("sentinel-unprivileged");
    let config = dir.path().join("sentinel.yaml");
    std::fs::write(&config, "").expect("write an empty configuration");
    let output = Command::new(sentinel_tests::sentinel_bin())
        .args(["run", "--config"])
        .arg(&config)
        .arg("--metrics-addr")
        .arg(format!("127.0.0.1:{}", free_port()))
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run sentinel as nobody");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("must run as root"), "stderr: {stderr}");
}

#[test]
fn only_root_may_use_the_control_socket() {
    use std::os::unix::{fs::PermissionsExt, process::CommandExt};
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.control_socket();
    let bans_as = |uid: u32| {
        let output = Command::new(sentinel_tests::sentinel_bin())
            .args(["bans", "--socket"])
            .arg(&socket)
            .uid(uid)
            .gid(uid)
            .output()
            .expect("run sentinel bans");
        assert!(!output.status.success());
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    // The socket's mode keeps other users out...
    let refused = bans_as(65534);
    assert!(
        refused.contains("permission denied: the control socket is root-only; use sudo"),
        "{refused}"
    );
    // ...and with it opened up, the daemon's peer-credential check alone does.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let refused = bans_as(65534);
    assert!(
        refused.contains("permission denied: root only"),
        "{refused}"
    );
    // Root is answered (this daemon runs without the SSH guard, and says so).
    let answered = bans_as(0);
    assert!(
        answered.contains("the SSH guard is not running"),
        "{answered}"
    );
}
