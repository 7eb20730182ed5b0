//! Exhaustion attacks on the real daemon under the open-file limit systemd gives services
//! (1024): idle connections to `/metrics`, a control client that never ends its line, and
//! silent control clients. Scrapes, the control socket and the firewall must keep working,
//! and everything turned away must be counted. The SSH guard manages the firewall of a
//! network namespace the test creates. Needs root:
//! `cargo test -p sentinel-tests --test exhaustion`.

use std::{
    fs,
    io::{self, BufRead, BufReader, Read, Write},
    net::TcpStream,
    os::unix::net::UnixStream,
    path::Path,
    time::Duration,
};

use sentinel_tests::{Daemon, Scrape, TempDir, TestCgroup, eventually, netlab::Netns, serial};

/// What systemd gives a service unless its unit says otherwise.
const SERVICE_OPEN_FILES: u64 = 1024;
const IDLE_CONNECTIONS: usize = 1100;
/// Far more than the control socket's slots.
const SILENT_CONTROL_CLIENTS: usize = 100;
/// Only a guard against a hang: every outcome is asserted exactly, never timed.
const HANG_GUARD: Duration = Duration::from_secs(60);
const EVICTED: &str = "closed to make room for another client: send the request at once";
const TIMED_OUT: &str = "timed out waiting for the request";

/// The daemon with its SSH guard on, banning inside `netns`, under the service limit.
fn start_guarded(netns: &Netns, dir: &TempDir) -> Daemon {
    let config = format!(
        "ssh_guard:\n  enabled: true\n  mode: enforce\n  audit_log: {}\n  netns: {}\n",
        dir.path().join("audit.log").display(),
        netns.path().display()
    );
    Daemon::start_with_open_files_limit(&config, SERVICE_OPEN_FILES, SERVICE_OPEN_FILES)
}

/// This test process holds every attacking connection itself.
fn raise_own_open_files_limit(needed: u64) {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscalls with valid pointers.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit), 0);
        assert!(
            limit.rlim_max >= needed,
            "the test needs {needed} open files; its hard limit is {}",
            limit.rlim_max
        );
        limit.rlim_cur = limit.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &limit), 0);
    }
}

fn rejected(scrape: &Scrape, endpoint: &str, reason: &str) -> u64 {
    scrape.count(
        "sentinel_connections_rejected_total",
        &[("endpoint", endpoint), ("reason", reason)],
    )
}

fn timed_out(scrape: &Scrape, endpoint: &str, stage: &str) -> u64 {
    scrape.count(
        "sentinel_connections_timed_out_total",
        &[("endpoint", endpoint), ("stage", stage)],
    )
}

/// The one line the daemon answers on the control socket. It may close without reading all
/// of a refused request, and the kernel then reports a reset after the line.
fn control_answer(stream: &UnixStream) -> serde_json::Value {
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .expect("read the answer");
    serde_json::from_str(&line).unwrap_or_else(|_| panic!("not a JSON line: {line:?}"))
}

fn assert_closed(mut stream: &UnixStream) {
    let mut byte = [0u8];
    match stream.read(&mut byte) {
        Ok(0) => {}
        Err(error) if error.kind() == io::ErrorKind::ConnectionReset => {}
        other => panic!("the daemon kept the connection open: {other:?}"),
    }
}

fn open_files(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("list the daemon's descriptors")
        .count()
}

#[test]
fn idle_metrics_connections_leave_scrapes_control_and_bans_working() {
    let _serial = serial();
    raise_own_open_files_limit(IDLE_CONNECTIONS as u64 + 1024);
    let netns = Netns::new("exhaust");
    let dir = TempDir::new("sentinel-exhaust");
    let daemon = start_guarded(&netns, &dir);
    let limits = daemon
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record["message"] == "the open-file limit is already at its hard limit")
        .map(|record| record["limit"].as_u64())
        .collect::<Vec<_>>();
    assert_eq!(limits, [Some(SERVICE_OPEN_FILES)], "{}", daemon.log());
    let before = daemon.scrape();

    let idle: Vec<TcpStream> = (0..IDLE_CONNECTIONS)
        .map(|n| {
            TcpStream::connect(daemon.addr)
                .unwrap_or_else(|error| panic!("idle connection {n}: {error}"))
        })
        .collect();
    eprintln!(
        "daemon descriptors with {IDLE_CONNECTIONS} idle connections opened: {}",
        open_files(daemon.pid())
    );

    // Scrapes, the control socket and the firewall all still work.
    let during = daemon.scrape();
    assert_eq!(
        during.count(
            "sentinel_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1
    );
    assert_eq!(daemon.control(&["bans"]).trim_end(), "no bans in force");
    assert_eq!(
        daemon
            .control(&["ban", "192.0.2.7", "--for", "1h"])
            .trim_end(),
        "banned 192.0.2.7 for 1h"
    );
    let banned: Vec<String> = netns
        .sentinel_set("banned_v4")
        .into_iter()
        .map(|element| element.net)
        .collect();
    assert_eq!(banned, ["192.0.2.7"]);

    // Every idle connection is closed by the daemon: made room for a newer one, or timed out.
    for (n, mut stream) in idle.into_iter().enumerate() {
        stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
        let mut byte = [0u8];
        match stream.read(&mut byte) {
            Ok(0) => {}
            other => panic!("idle connection {n} was not closed by the daemon: {other:?}"),
        }
    }

    let after = daemon.scrape();
    let evicted =
        rejected(&after, "metrics", "idle_evicted") - rejected(&before, "metrics", "idle_evicted");
    let late = timed_out(&after, "metrics", "request") - timed_out(&before, "metrics", "request");
    eprintln!("idle connections: {evicted} closed to make room, {late} timed out");
    assert!(evicted > 0, "the connection limit was never reached");
    assert_eq!(evicted + late, IDLE_CONNECTIONS as u64);
    for (counter, labels) in [
        (rejected(&after, "metrics", "busy"), "busy"),
        (timed_out(&after, "metrics", "response"), "response"),
    ] {
        assert_eq!(counter, 0, "{labels}");
    }
    assert_eq!(
        after.count(
            "sentinel_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        ),
        1
    );
}

#[test]
fn an_idle_metrics_connection_is_closed_after_the_request_timeout() {
    let _serial = serial();
    let daemon = Daemon::start_with_open_files_limit(
        sentinel_tests::NO_FIREWALL,
        SERVICE_OPEN_FILES,
        SERVICE_OPEN_FILES,
    );
    let before = timed_out(&daemon.scrape(), "metrics", "request");
    let mut stream = TcpStream::connect(daemon.addr).expect("connect");
    stream.set_read_timeout(Some(HANG_GUARD)).unwrap();
    let mut byte = [0u8];
    assert_eq!(stream.read(&mut byte).expect("read until closed"), 0);
    assert_eq!(
        timed_out(&daemon.scrape(), "metrics", "request"),
        before + 1
    );
}

#[test]
fn a_control_line_without_end_is_refused_and_the_next_client_answered() {
    let _serial = serial();
    let netns = Netns::new("exhaust");
    let dir = TempDir::new("sentinel-exhaust");
    let daemon = start_guarded(&netns, &dir);

    let mut stream = UnixStream::connect(daemon.control_socket()).expect("connect");
    stream.set_write_timeout(Some(HANG_GUARD)).unwrap();
    let huge = vec![b'x'; 10 << 20];
    let refused = stream
        .write_all(&huge)
        .expect_err("the daemon took 10 MiB without a newline");
    assert!(
        matches!(
            refused.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        ),
        "{refused}"
    );
    assert_eq!(
        control_answer(&stream),
        serde_json::json!({"ok": false, "error": "request too long: the limit is 4096 bytes"})
    );
    assert_closed(&stream);

    assert_eq!(daemon.control(&["bans"]).trim_end(), "no bans in force");
}

#[test]
fn silent_control_clients_do_not_lock_out_the_operator() {
    let _serial = serial();
    let netns = Netns::new("exhaust");
    let dir = TempDir::new("sentinel-exhaust");
    let daemon = start_guarded(&netns, &dir);
    let before = daemon.scrape();

    let silent: Vec<UnixStream> = (0..SILENT_CONTROL_CLIENTS)
        .map(|_| UnixStream::connect(daemon.control_socket()).expect("connect"))
        .collect();
    assert_eq!(daemon.control(&["bans"]).trim_end(), "no bans in force");

    // Each silent client is told why it was closed: to make room, or for its silence.
    let (mut evicted, mut late) = (0, 0);
    for stream in &silent {
        let answer = control_answer(stream);
        assert_eq!(answer["ok"], false, "{answer}");
        match answer["error"].as_str() {
            Some(EVICTED) => evicted += 1,
            Some(TIMED_OUT) => late += 1,
            _ => panic!("unexpected answer {answer}"),
        }
        assert_closed(stream);
    }
    eprintln!("silent control clients: {evicted} closed to make room, {late} timed out");
    assert!(evicted > 0, "the client limit was never reached");
    assert_eq!(evicted + late, SILENT_CONTROL_CLIENTS as u64);
    let after = daemon.scrape();
    assert_eq!(
        rejected(&after, "control", "idle_evicted") - rejected(&before, "control", "idle_evicted"),
        evicted
    );
    assert_eq!(
        timed_out(&after, "control", "request") - timed_out(&before, "control", "request"),
        late
    );
    assert_eq!(rejected(&after, "control", "busy"), 0);
}

#[test]
fn soft_open_files_limit_is_raised_to_the_hard_limit() {
    let _serial = serial();
    let daemon = Daemon::start_with_open_files_limit(sentinel_tests::NO_FIREWALL, 512, 2048);
    let raised: Vec<(Option<u64>, Option<u64>)> = daemon
        .log()
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|record| record["message"] == "raised the open-file limit to its hard limit")
        .map(|record| (record["from"].as_u64(), record["to"].as_u64()))
        .collect();
    assert_eq!(raised, [(Some(512), Some(2048))], "{}", daemon.log());
    let limits = fs::read_to_string(
        Path::new("/proc")
            .join(daemon.pid().to_string())
            .join("limits"),
    )
    .expect("read the daemon's limits");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .expect("a Max open files line")
        .split_whitespace()
        .skip(3)
        .take(2)
        .collect();
    assert_eq!(open_files, ["2048", "2048"]);
}

#[test]
fn enforcement_series_share_the_service_label_cap() {
    let _serial = serial();
    let cgroups: Vec<TestCgroup> = (0..3).map(|_| TestCgroup::new("cap")).collect();
    let mut config =
        "ssh_guard:\n  enabled: false\nservices:\n  max_labels: 1\npolicies:\n".to_string();
    for (n, cgroup) in cgroups.iter().enumerate() {
        config += &format!(
            "  - name: p{n}\n    cgroup: {}\n    mode: observe\n    memory.max: 64M\n",
            cgroup.service()
        );
    }
    let daemon = Daemon::start_with_config(&config, &[]);
    let actions = || -> Vec<(String, u64)> {
        daemon
            .scrape()
            .0
            .lines()
            .filter_map(|line| {
                let labels = line.strip_prefix("sentinel_actions_total{")?;
                let (labels, value) = labels.rsplit_once("} ")?;
                labels
                    .contains("action=\"would_set_limits\"")
                    .then_some(())?;
                let service = labels.split_once("service=\"")?.1.split_once('"')?.0;
                Some((service.to_string(), value.parse().ok()?))
            })
            .collect()
    };
    assert!(
        eventually(HANG_GUARD, || actions().iter().map(|(_, n)| n).sum::<u64>()
            == 3),
        "{:?}; log:\n{}",
        actions(),
        daemon.log()
    );
    // One label slot: at most one series with a real service name, the rest under `other`.
    let named = actions()
        .iter()
        .filter(|(service, _)| service != "other")
        .count();
    assert!(named <= 1, "{:?}", actions());
    assert!(
        actions().iter().any(|(service, _)| service == "other"),
        "{:?}",
        actions()
    );
}
