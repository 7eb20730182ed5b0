//! Port scans end to end: Debian's `nmap` scanning from attacker namespaces, the kernel's resets
//! for closed ports seen by the daemon's `tcp_send_reset` program, and scanners banned in the
//! server namespace's nftables by the SSH guard's machinery. Nothing touches the root
//! namespace's ruleset. Needs root, nmap and nft:
//! `cargo test -p sentinel-tests --test probing -- --test-threads=1`.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener},
    path::PathBuf,
    time::Duration,
};

use sentinel_tests::{
    Daemon, TempDir, assert_promtool_clean, audit_records, eventually,
    netlab::{CONNECT_TIMEOUT, Netns},
    serial,
    sshlab::Peer,
};

/// Distinct closed ports that make a scanner in most tests here.
const PORTS: u32 = 10;
/// How long the daemon may take to count hits or ban: a hang guard, not a timing.
const WAIT: Duration = Duration::from_secs(15);

const SYN_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SYN_ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const CONNECT_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const CONNECT_ATTACKER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const V6_SERVER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 1);
const V6_SCANNER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 0x10);
/// Inside `ALLOWED`.
const TRUSTED_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const TRUSTED_SCANNER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ALLOWED: &str = "192.0.2.0/24";
/// The one open port of the server namespace.
const OPEN_PORT: u16 = 7000;
/// Closed ports scanned; the open port is outside this range.
const FIRST_CLOSED: u16 = 1000;

const HITS: &str = "sentinel_port_scan_closed_port_hits_total";
const SCANNERS: &str = "sentinel_port_scan_scanners_total";
const BANS: &str = "sentinel_bans_total";
const SKIPPED: &str = "sentinel_bans_skipped_total";

/// A server namespace with one listening port, linked to a SYN scanner, a connect scanner and
/// a scanner inside the allow list, each in its own namespace.
struct ScanLab {
    // Dropped first: the listener, then the peers' namespaces, then the server's.
    _listener: TcpListener,
    syn: Peer,
    connect: Peer,
    trusted: Peer,
    v6: Peer,
    server: Netns,
    dir: TempDir,
}

#[derive(Clone, Copy)]
enum Scan {
    /// `nmap -sS`: raw SYNs, never a connection.
    Syn,
    /// `nmap -sT`: a `connect()` per port.
    Connect,
}

impl ScanLab {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the port-scan tests need root"
        );
        let dir = TempDir::new("sentinel-scan-lab");
        let server = Netns::new("scan-srv");
        let syn = Peer::link(&server, "syn", SYN_SERVER, &[SYN_ATTACKER.into()]);
        let connect = Peer::link(&server, "cnx", CONNECT_SERVER, &[CONNECT_ATTACKER.into()]);
        let trusted = Peer::link(&server, "trust", TRUSTED_SERVER, &[TRUSTED_SCANNER.into()]);
        let v6 = Peer::link(&server, "scan6", V6_SERVER, &[V6_SCANNER.into()]);
        // The socket stays in the namespace it was made in; the kernel completes handshakes
        // into its backlog, so nothing needs to accept.
        let listener = server
            .run(|| TcpListener::bind((Ipv6Addr::UNSPECIFIED, OPEN_PORT)))
            .expect("listen in the server namespace");
        Self {
            _listener: listener,
            syn,
            connect,
            trusted,
            v6,
            server,
            dir,
        }
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    /// The audit log's records of `action`, in order.
    fn audited(&self, action: &str) -> Vec<serde_json::Value> {
        audit_records(&self.audit_log())
            .into_iter()
            .filter(|record| record["action"] == action)
            .collect()
    }

    /// The SSH guard banning in the server namespace, and `port_scan` with `mode` and `ports`.
    fn config(&self, mode: &str, ports: u32) -> String {
        format!(
            "ssh_guard:
  enabled: true
  mode: enforce
  ban_for: 10m
  allow: [{ALLOWED}]
  audit_log: {}
  netns: {}
port_scan:
  mode: {mode}
  ports: {ports}
  window: 1m
",
            self.audit_log().display(),
            self.server.path().display()
        )
    }

    /// Starts the daemon and checks that its port-scan parts run and its program is attached.
    fn start_daemon(&self, mode: &str, ports: u32) -> Daemon {
        let daemon = Daemon::start_with_config(&self.config(mode, ports), &[]);
        let scrape = daemon.scrape();
        for component in ["port scan", "scan events reader", "ssh guard"] {
            let up = scrape.value("sentinel_component_up", &[("component", component)]);
            assert_eq!(up, 1.0, "{component}; log:\n{}", daemon.log());
        }
        assert_eq!(
            scrape.value("sentinel_probe_attached", &[("program", "port_scan")]),
            1.0,
            "log:\n{}",
            daemon.log()
        );
        // Exported from the start: absent is not 0.
        assert_eq!(scrape.value(HITS, &[]), 0.0);
        for mode in ["enforce", "observe"] {
            assert_eq!(scrape.value(SCANNERS, &[("mode", mode)]), 0.0);
        }
        assert_eq!(scrape.value(BANS, &[("reason", "port_scan")]), 0.0);
        daemon
    }

    /// Scans `count` closed ports of the server from `peer`, from `first` on; every one must be
    /// found closed (answered with a reset).
    fn scan(&self, peer: &Peer, scan: Scan, first: u16, count: u16) {
        let closed = self.scan_until_banned(peer, scan, first, count);
        assert_eq!(
            closed, count,
            "nmap found only {closed} of {count} ports closed"
        );
    }

    /// Scans like `scan`; returns how many ports nmap found closed: those after a ban show as
    /// filtered (their packets are dropped).
    fn scan_until_banned(&self, peer: &Peer, scan: Scan, first: u16, count: u16) -> u16 {
        let kind = match scan {
            Scan::Syn => "-sS",
            Scan::Connect => "-sT",
        };
        let ports = format!("{first}-{}", first + count - 1);
        peer.netns.nmap_closed(kind, peer.server, &ports)
    }

    /// Every ban in the server namespace's firewall, IPv4 then IPv6.
    fn banned(&self) -> Vec<String> {
        let mut bans = self.server.sentinel_set("banned_v4");
        bans.extend(self.server.sentinel_set("banned_v6"));
        bans.into_iter().map(|element| element.net).collect()
    }

    fn open_port(peer: &Peer) -> SocketAddr {
        SocketAddr::new(peer.server, OPEN_PORT)
    }
}

/// Waits until `name{labels}` reaches `expected`, then checks it stays there while the reader's
/// timer drains anything still queued (a count that could still grow would not be exact).
fn assert_settles(daemon: &Daemon, name: &str, labels: &[(&str, &str)], expected: u64) {
    daemon.await_count(name, labels, expected, WAIT);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.scrape().count(name, labels), expected, "{name}");
}

fn assert_banned_after_scan(scan: Scan, peer: impl Fn(&ScanLab) -> &Peer) {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("enforce", PORTS);
    let peer = peer(&lab);
    let attacker = peer.address;
    peer.netns
        .assert_connects(attacker, ScanLab::open_port(peer));

    let closed = lab.scan_until_banned(peer, scan, FIRST_CLOSED, PORTS as u16 + 5);
    assert!(
        closed >= PORTS as u16,
        "nmap found only {closed} ports closed"
    );
    assert_settles(&daemon, SCANNERS, &[("mode", "enforce")], 1);
    assert_settles(&daemon, BANS, &[("reason", "port_scan")], 1);
    let offender = peer.offender();
    assert!(
        eventually(WAIT, || lab.banned() == [offender.clone()]),
        "set {:?}; log:\n{}",
        lab.banned(),
        daemon.log()
    );
    // Every closed port up to the threshold was a hit; those after the ban were dropped
    // before TCP could answer them.
    let hits = daemon.scrape().count(HITS, &[]);
    assert!(
        (u64::from(PORTS)..=u64::from(PORTS) + 5).contains(&hits),
        "{hits} hits"
    );
    peer.netns
        .assert_blocked(attacker, ScanLab::open_port(peer));

    let listed = daemon.control(&["bans"]);
    let line = listed
        .lines()
        .find(|line| line.contains(&offender))
        .unwrap_or_else(|| panic!("{offender} is not listed:\n{listed}"));
    assert!(line.contains("port_scan"), "{listed}");
    let bans: Vec<_> = lab.audited("ban");
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0]["address"], offender);
    assert_eq!(bans[0]["reason"], "port_scan");
    assert!(bans[0]["failures"].as_u64() >= Some(u64::from(PORTS)));
    assert_promtool_clean(&daemon.scrape());
}

#[test]
fn a_syn_scan_of_more_closed_ports_than_the_threshold_is_banned() {
    assert_banned_after_scan(Scan::Syn, |lab| &lab.syn);
}

#[test]
fn a_connect_scan_of_more_closed_ports_than_the_threshold_is_banned() {
    assert_banned_after_scan(Scan::Connect, |lab| &lab.connect);
}

#[test]
fn an_ipv6_syn_scan_bans_the_scanners_prefix() {
    assert_banned_after_scan(Scan::Syn, |lab| &lab.v6);
}

#[test]
fn a_scan_below_the_threshold_is_counted_exactly_and_never_banned() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("enforce", PORTS);
    let below = PORTS as u16 - 1;
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED, below);
    // The same ports again are no new distinct ports.
    lab.scan(&lab.connect, Scan::Connect, FIRST_CLOSED, below);
    lab.scan(&lab.syn, Scan::Connect, FIRST_CLOSED, below);
    assert_settles(&daemon, HITS, &[], 3 * u64::from(below));
    let scrape = daemon.scrape();
    assert_eq!(scrape.count(SCANNERS, &[("mode", "enforce")]), 0);
    assert_eq!(scrape.count(BANS, &[("reason", "port_scan")]), 0);
    assert_eq!(
        scrape.count("sentinel_port_scan_tracked_addresses", &[]),
        2,
        "the two scanners are tracked"
    );
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());
    lab.syn
        .netns
        .assert_connects(lab.syn.address, ScanLab::open_port(&lab.syn));
}

#[test]
fn an_allow_listed_scanner_is_never_banned_and_the_skip_is_counted() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("enforce", PORTS);
    lab.scan(&lab.trusted, Scan::Syn, FIRST_CLOSED, PORTS as u16);
    assert_settles(&daemon, HITS, &[], u64::from(PORTS));
    assert_settles(&daemon, SCANNERS, &[("mode", "enforce")], 1);
    assert_settles(&daemon, SKIPPED, &[("reason", "allowlisted")], 1);
    assert_eq!(daemon.scrape().count(BANS, &[("reason", "port_scan")]), 0);
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());
    lab.trusted
        .netns
        .assert_connects(lab.trusted.address, ScanLab::open_port(&lab.trusted));
    let skips: Vec<_> = lab.audited("skip");
    assert_eq!(skips.len(), 1, "{skips:?}");
    assert_eq!(skips[0]["address"], TRUSTED_SCANNER.to_string());
    assert_eq!(skips[0]["reason"], "port_scan/allowlisted");
}

#[test]
fn observe_mode_counts_and_audits_the_scanner_and_bans_nothing() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("observe", PORTS);
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED, PORTS as u16);
    assert_settles(&daemon, HITS, &[], u64::from(PORTS));
    assert_settles(&daemon, SCANNERS, &[("mode", "observe")], 1);
    assert_settles(&daemon, SKIPPED, &[("reason", "observe_mode")], 1);
    let scrape = daemon.scrape();
    assert_eq!(scrape.count(SCANNERS, &[("mode", "enforce")]), 0);
    assert_eq!(scrape.count(BANS, &[("reason", "port_scan")]), 0);
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());
    lab.syn
        .netns
        .assert_connects(lab.syn.address, ScanLab::open_port(&lab.syn));
    let would: Vec<_> = lab.audited("would_ban");
    assert_eq!(would.len(), 1, "{would:?}");
    assert_eq!(would[0]["address"], SYN_ATTACKER.to_string());
    assert_eq!(would[0]["reason"], "port_scan");
    assert_eq!(would[0]["failures"], u64::from(PORTS));
}

#[test]
fn closed_ports_of_other_network_namespaces_are_not_counted() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("enforce", PORTS);
    // The attacker scanning its own loopback, and the daemon's own namespace's loopback: resets
    // sent in namespaces the bans do not go into.
    let closed = lab
        .syn
        .netns
        .nmap_closed("-sT", Ipv4Addr::LOCALHOST.into(), "1000-1039");
    assert_eq!(closed, 40);
    for port in FIRST_CLOSED..FIRST_CLOSED + 40 {
        let refused = std::net::TcpStream::connect_timeout(
            &SocketAddr::new(IpAddr::from(Ipv4Addr::LOCALHOST), port),
            CONNECT_TIMEOUT,
        );
        assert!(
            refused.is_err(),
            "port {port} of the root namespace is open"
        );
    }
    // A hit in the server namespace afterwards is counted, and alone: the reader drained in
    // order, so the earlier resets would have been counted before it.
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED, 1);
    assert_settles(&daemon, HITS, &[], 1);
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());
}

#[test]
fn a_reload_applies_the_threshold_and_a_refused_one_changes_nothing() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = lab.start_daemon("enforce", 30);
    let path = daemon.config_path();
    let rejections = || daemon.rejected_reloads().len();
    let bad = lab.config("enforce", 1);
    fs::write(&path, &bad).expect("write the configuration");
    assert!(
        eventually(WAIT, || rejections() == 1),
        "log:\n{}",
        daemon.log()
    );
    let reason = format!(
        "{}:10:10: ports: must be at least 2, found 1",
        path.display()
    );
    assert!(daemon.log().contains(&reason), "log:\n{}", daemon.log());
    // Still 30: ten closed ports make no scanner.
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED, 10);
    assert_settles(&daemon, HITS, &[], 10);
    assert_eq!(daemon.scrape().count(SCANNERS, &[("mode", "enforce")]), 0);
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());

    fs::write(&path, lab.config("enforce", 12)).expect("write the configuration");
    assert!(
        eventually(WAIT, || {
            daemon
                .log_records(&[("message", "configuration reloaded")])
                .len()
                == 1
        }),
        "log:\n{}",
        daemon.log()
    );
    // Two more distinct ports within the window reach the reloaded threshold.
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED + 10, 2);
    assert_settles(&daemon, SCANNERS, &[("mode", "enforce")], 1);
    assert!(
        eventually(WAIT, || lab.banned() == [SYN_ATTACKER.to_string()]),
        "set {:?}; log:\n{}",
        lab.banned(),
        daemon.log()
    );
    assert_eq!(
        daemon.scrape().value(
            "sentinel_config_restart_required",
            &[("setting", "port_scan")]
        ),
        0.0
    );
}

#[test]
fn a_port_scan_probe_that_cannot_attach_is_reported_and_the_daemon_runs_on() {
    let _serial = serial();
    let lab = ScanLab::new();
    let daemon = Daemon::start_with_config(
        &lab.config("enforce", PORTS),
        &[("SENTINEL_FAULT_INJECT_PROBE", "port_scan")],
    );
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.value("sentinel_probe_attached", &[("program", "port_scan")]),
        0.0
    );
    for component in ["port scan", "scan events reader", "ssh guard"] {
        let up = scrape.value("sentinel_component_up", &[("component", component)]);
        assert_eq!(up, 1.0, "{component}; log:\n{}", daemon.log());
    }
    // `sentinel status` names the probe among the problems, and so fails.
    let output = daemon.control_output(&["status"]);
    assert!(!output.status.success(), "{output:?}");
    let status = String::from_utf8(output.stdout).expect("UTF-8");
    assert!(
        status.contains("probe port_scan is not attached"),
        "{status}"
    );
    let line = status
        .lines()
        .find(|line| line.trim_start().starts_with("port_scan "))
        .unwrap_or_else(|| panic!("no port_scan probe in:\n{status}"));
    assert!(
        line.contains("NOT ATTACHED: attaching to tracepoint sentinel_fault_injected failed"),
        "{line}"
    );
    lab.scan(&lab.syn, Scan::Syn, FIRST_CLOSED, PORTS as u16);
    // Nothing can arrive: the reader's timer has drained whatever there was.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(daemon.scrape().count(HITS, &[]), 0);
    assert!(lab.banned().is_empty(), "{:?}", lab.banned());
    // The rest of the guard still bans.
    daemon.control(&["ban", &SYN_ATTACKER.to_string(), "--for", "1h"]);
    assert_eq!(lab.banned(), [SYN_ATTACKER.to_string()]);
}
