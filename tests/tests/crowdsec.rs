//! The fleet end to end with Debian's crowdsec 1.4.6: its Local API runs alone
//! (`crowdsec -no-cs -no-capi`) with the test's own configuration, SQLite database and empty
//! hub, listening on loopback; `cscli` with the same configuration registers the bouncers and
//! adds and deletes decisions (`sentinel_tests::lapi`, shared with the bench). Two Sentinels, each banning in its own "host" network namespace,
//! pull the decisions; an attacker with the same address reaches each host over its own veth
//! pair. Needs root, nft and the unpacked package (`SENTINEL_CROWDSEC`, set by `cargo xtask
//! test`): `cargo test -p sentinel-tests --test crowdsec -- --test-threads=1`.

use std::{
    fs,
    io::{self, Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::Command,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use sentinel_tests::{
    Daemon, TempDir, audit_records, eventually, free_port,
    lapi::Lapi,
    netlab::{Netns, SetElement},
    rfc3339_millis, serial,
    sshlab::{Peer, Sshd, TestUser},
};

/// Each host's address on its link to the attacker, and the attacker's.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// An address inside both Sentinels' allow list, on the attacker's side too.
const TRUSTED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const ALLOWED: &str = "198.51.100.16/28";
/// An address on the attacker's side that never attacks.
const BYSTANDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 30);
const SERVICE_PORT: u16 = 8022;
/// How long a pull (every second) and a ban may take, generously.
const WAIT: Duration = Duration::from_secs(20);
/// Failed SSH logins before a ban (the guard's default).
const MAX_FAILURES: u64 = 5;

fn crowdsec_root() -> PathBuf {
    let root = std::env::var_os("SENTINEL_CROWDSEC").expect(
        "SENTINEL_CROWDSEC must name the unpacked crowdsec package; `cargo xtask test` sets it",
    );
    PathBuf::from(root)
}

/// How a host joins the fleet.
struct Joining<'a> {
    lapi_url: String,
    /// Its bouncer key: the host pulls the fleet's decisions.
    bouncer_key: &'a str,
    /// Its machine id and password: the host pushes its own bans.
    machine: Option<(&'a str, &'a str)>,
    /// Failed SSH logins before this host bans on its own.
    max_failures: u64,
    /// A real sshd on the host's address, with an account to fail logging in as.
    sshd: bool,
    /// The only CA this host trusts for LAPI's certificate.
    ca_file: Option<PathBuf>,
    /// Port-scan detection with this many distinct closed ports.
    port_scan: Option<u32>,
}

impl<'a> Joining<'a> {
    /// A host that only pulls the decisions of the LAPI at `lapi_url`.
    fn pulling(lapi_url: String, bouncer_key: &'a str) -> Self {
        Self {
            lapi_url,
            bouncer_key,
            machine: None,
            max_failures: MAX_FAILURES,
            sshd: false,
            ca_file: None,
            port_scan: None,
        }
    }
}

/// A host: a namespace whose firewall a Sentinel manages, with a listening service (and an sshd
/// when asked), linked to an attacker namespace holding `ATTACKER`, `TRUSTED` and `BYSTANDER`.
struct Host {
    daemon: Daemon,
    // Dropped after the daemon: sshd, the attacker's namespace, the host's, then the account.
    sshd: Option<Sshd>,
    attacker: Peer,
    netns: Netns,
    _service: TcpListener,
    user: Option<TestUser>,
    dir: TempDir,
}

impl Host {
    fn start(tag: &str, lapi: &Lapi, key: &str) -> Self {
        Self::join(tag, &Joining::pulling(lapi.url(), key))
    }

    fn join(tag: &str, joining: &Joining) -> Self {
        let dir = TempDir::new(&format!("sentinel-fleet-{tag}"));
        let netns = Netns::new(&format!("fleet-{tag}"));
        let attacker = Peer::link(
            &netns,
            "atk",
            HOST,
            &[ATTACKER.into(), TRUSTED.into(), BYSTANDER.into()],
        );
        let service = netns.run(|| {
            TcpListener::bind(SocketAddr::from((HOST, SERVICE_PORT))).expect("bind the service")
        });
        let (sshd, user) = if joining.sshd {
            let user = TestUser::create(dir.path());
            (
                Some(Sshd::start(&netns, &[HOST.into()], dir.path())),
                Some(user),
            )
        } else {
            (None, None)
        };
        let key_file = dir.path().join("bouncer.key");
        write_private(&key_file, joining.bouncer_key);
        let mut config = format!(
            "ssh_guard:
  max_failures: {}
  allow: [{ALLOWED}]
  audit_log: {}
  netns: {}
crowdsec:
  lapi_url: {}
  bouncer_key_file: {}
  pull_interval: 1s
",
            joining.max_failures,
            dir.path().join("audit.log").display(),
            netns.path().display(),
            joining.lapi_url,
            key_file.display()
        );
        if let Some(ca_file) = &joining.ca_file {
            config.push_str(&format!("  ca_file: {}\n", ca_file.display()));
        }
        if let Some((machine_id, password)) = joining.machine {
            let password_file = dir.path().join("machine.password");
            write_private(&password_file, password);
            config.push_str(&format!(
                "  machine_id: {machine_id}\n  password_file: {}\n",
                password_file.display()
            ));
        }
        // A section of its own, after the `crowdsec` settings.
        if let Some(ports) = joining.port_scan {
            config.push_str(&format!("port_scan:\n  ports: {ports}\n  window: 1m\n"));
        }
        let daemon = Daemon::start_with_config(&config, &[]);
        Self {
            daemon,
            sshd,
            attacker,
            netns,
            _service: service,
            user,
            dir,
        }
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::from((HOST, SERVICE_PORT))
    }

    fn assert_connects(&self, source: Ipv4Addr) {
        self.attacker
            .netns
            .assert_connects(source.into(), self.service());
    }

    fn assert_blocked(&self, source: Ipv4Addr) {
        self.attacker
            .netns
            .assert_blocked(source.into(), self.service());
    }

    /// `MAX_FAILURES` failed SSH logins from `ATTACKER`, all refused by this host's sshd.
    fn brute_force(&self) {
        let sshd = self.sshd.as_ref().expect("a host with an sshd");
        let user = self.user.as_ref().expect("a host with an account");
        sshd.fail_logins(user, &[(&self.attacker, MAX_FAILURES)]);
    }

    fn bans(&self) -> Vec<SetElement> {
        self.netns.sentinel_set("banned_v4")
    }

    fn banned(&self, net: &str) -> bool {
        self.bans().iter().any(|ban| ban.net == net)
    }

    fn await_ban(&self, net: &str) -> SetElement {
        self.await_ban_within(net, WAIT)
    }

    fn await_ban_within(&self, net: &str, limit: Duration) -> SetElement {
        let mut found = None;
        let banned = eventually(limit, || {
            found = self.bans().into_iter().find(|ban| ban.net == net);
            found.is_some()
        });
        assert!(
            banned,
            "{net} was not banned; bans: {:?}\nlog:\n{}",
            self.bans(),
            self.daemon.log()
        );
        found.expect("the ban just seen")
    }

    fn await_lifted(&self, net: &str) {
        let lifted = eventually(WAIT, || !self.banned(net));
        assert!(lifted, "{net} is still banned:\n{}", self.daemon.log());
    }

    /// Waits until the gauge or counter `name{labels}` reads `expected`.
    fn await_metric(&self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let reached = eventually(WAIT, || {
            self.daemon.scrape().find(name, labels) == Some(expected)
        });
        assert!(
            reached,
            "{name}{labels:?} never read {expected}:\n{}\nlog:\n{}",
            self.daemon.scrape().0,
            self.daemon.log()
        );
    }

    /// `sentinel bans` as (address, reason) pairs, read from its table.
    fn listed(&self) -> Vec<(String, String)> {
        let table = self.daemon.control(&["bans"]);
        if table.trim_end() == "no bans in force" {
            return Vec::new();
        }
        table
            .lines()
            .skip(1)
            .map(|row| {
                let mut cells = row.split_whitespace();
                let mut cell = || cells.next().unwrap_or_default().to_string();
                (cell(), cell())
            })
            .collect()
    }

    fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.daemon.scrape().value(name, labels)
    }

    /// When this host committed its ban of `address` for `reason`, in milliseconds since the
    /// epoch, from its audit log.
    fn audited_ban(&self, address: &str, reason: &str) -> i64 {
        let records = audit_records(&self.dir.path().join("audit.log"));
        let bans: Vec<&serde_json::Value> = records
            .iter()
            .filter(|record| {
                record["action"] == "ban"
                    && record["address"] == address
                    && record["reason"] == reason
            })
            .collect();
        assert_eq!(bans.len(), 1, "{records:?}");
        rfc3339_millis(bans[0]["time"].as_str().expect("a timestamp"))
    }
}

/// Writes a credential file as an operator should: root-only.
fn write_private(path: &Path, secret: &str) {
    fs::write(path, format!("{secret}\n")).expect("write the credential file");
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).expect("chmod 600");
}

const RECEIVED: &str = "sentinel_crowdsec_decisions_received_total";
const APPLIED: &str = "sentinel_crowdsec_decisions_applied_total";
const EXPIRED: &str = "sentinel_crowdsec_decisions_expired_total";
const SKIPPED: &str = "sentinel_crowdsec_decisions_skipped_total";

#[test]
fn a_decision_added_with_cscli_is_enforced_by_both_hosts_and_lifted_when_deleted() {
    let _serial = serial();
    let lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    let a = Host::start("a", &lapi, &lapi.add_bouncer("sentinel-a"));
    let b = Host::start("b", &lapi, &lapi.add_bouncer("sentinel-b"));
    for host in [&a, &b] {
        host.assert_connects(ATTACKER);
    }
    let added = Instant::now();
    lapi.ban("--ip", &ATTACKER.to_string());
    for (name, host) in [("A", &a), ("B", &b)] {
        let ban = host.await_ban(&ATTACKER.to_string());
        println!(
            "host {name}: cscli decision to element in the kernel in {:?}",
            added.elapsed()
        );
        // The decision's remaining time is the element's timeout.
        let timeout = ban.timeout.expect("a ban with a timeout");
        assert!((3590..=3600).contains(&timeout), "{ban:?}");
        host.assert_blocked(ATTACKER);
        host.assert_connects(TRUSTED);
        assert_eq!(
            host.listed(),
            [(ATTACKER.to_string(), "crowdsec:cscli".to_string())]
        );
        assert_eq!(host.metric(RECEIVED, &[("origin", "cscli")]), 1.0);
        assert_eq!(host.metric(APPLIED, &[("origin", "cscli")]), 1.0);
        assert_eq!(host.metric("sentinel_crowdsec_lapi_reachable", &[]), 1.0);
        assert!(host.metric("sentinel_crowdsec_last_sync_timestamp_seconds", &[]) > 1.7e9);
    }
    let bouncers = lapi.cscli(&["bouncers", "list", "-o", "raw"]);
    for name in ["sentinel-a", "sentinel-b"] {
        assert!(bouncers.contains(name), "{bouncers}");
    }

    lapi.cscli(&["decisions", "delete", "--ip", &ATTACKER.to_string()]);
    for host in [&a, &b] {
        host.await_lifted(&ATTACKER.to_string());
        host.assert_connects(ATTACKER);
        assert_eq!(host.listed(), []);
        assert_eq!(host.metric(EXPIRED, &[("origin", "cscli")]), 1.0);
    }
    // LAPI lists the deletion again on the next polls: nothing more happens.
    std::thread::sleep(Duration::from_secs(3));
    for host in [&a, &b] {
        assert_eq!(host.metric(EXPIRED, &[("origin", "cscli")]), 1.0);
        assert_eq!(host.metric(APPLIED, &[("origin", "cscli")]), 1.0);
    }
}

#[test]
fn an_allowlisted_address_banned_by_the_fleet_is_never_banned_here() {
    let _serial = serial();
    let lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    let a = Host::start("allow", &lapi, &lapi.add_bouncer("sentinel-allow"));
    // The allow-listed address first, the attacker second: once the attacker is banned, the
    // pull that carried both is done.
    lapi.ban("--ip", &TRUSTED.to_string());
    lapi.ban("--range", "198.51.100.32/28");
    lapi.ban("--ip", &ATTACKER.to_string());
    a.await_ban(&ATTACKER.to_string());
    assert_eq!(a.metric(RECEIVED, &[("origin", "cscli")]), 3.0);
    assert_eq!(a.metric(APPLIED, &[("origin", "cscli")]), 2.0);
    assert_eq!(a.metric(SKIPPED, &[("reason", "allowlisted")]), 1.0);
    assert_eq!(nets(a.bans()), ["198.51.100.10", "198.51.100.32/28"]);
    a.assert_connects(TRUSTED);
    a.assert_blocked(ATTACKER);
}

#[test]
fn sentinel_unban_of_a_fleet_ban_lifts_it_here_only_until_it_would_end() {
    let _serial = serial();
    let mut lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    let a = Host::start("unban", &lapi, &lapi.add_bouncer("sentinel-unban"));
    let range = "198.51.100.32/28";
    lapi.ban("--range", range);
    lapi.ban("--ip", &ATTACKER.to_string());
    a.await_ban(&ATTACKER.to_string());
    a.await_ban(range);

    let text = a.daemon.control(&["unban", &ATTACKER.to_string()]);
    let left = text
        .strip_prefix("unbanned 198.51.100.10 on this host only, for 59m ")
        .and_then(|rest| {
            rest.strip_suffix(
                "s: a ban from the CrowdSec fleet, lifted here until it would end; `cscli \
                 decisions delete --ip 198.51.100.10` ends it for the whole fleet\n",
            )
        });
    assert!(
        left.is_some_and(|seconds| seconds.parse::<u64>().is_ok_and(|s| s < 60)),
        "{text}"
    );
    let answer: serde_json::Value =
        serde_json::from_str(&a.daemon.control(&["unban", range, "--output", "json"]))
            .expect("sentinel unban --output json prints JSON");
    assert_eq!(answer["address"], range, "{answer}");
    let seconds = answer["fleet_override_seconds"].as_u64();
    assert!(
        seconds.is_some_and(|s| (3500..3600).contains(&s)),
        "{answer}"
    );
    assert_eq!(a.bans(), []);
    a.assert_connects(ATTACKER);
    let records = audit_records(&a.dir.path().join("audit.log"));
    let overrides = records
        .iter()
        .filter(|record| {
            record["action"] == "unban" && record["reason"] == "operator_fleet_override"
        })
        .count();
    assert_eq!(overrides, 2, "{records:?}");
    // The decisions stay in LAPI, for the rest of the fleet.
    assert_eq!(lapi.decisions_about(&ATTACKER.to_string()).len(), 1);

    // A full pull lists both decisions again: they stay lifted here.
    lapi.stop();
    a.await_metric(REACHABLE, &[], 0.0);
    lapi.resume();
    a.await_metric(SKIPPED, &[("reason", "lifted_here")], 2.0);
    assert_eq!(a.bans(), []);
    a.assert_connects(ATTACKER);

    // A ban of this host's own is simply lifted.
    a.daemon.control(&["ban", "198.51.100.50", "--for", "1h"]);
    let answer: serde_json::Value =
        serde_json::from_str(
            &a.daemon
                .control(&["unban", "198.51.100.50", "--output", "json"]),
        )
        .expect("JSON");
    assert_eq!(
        answer,
        serde_json::json!({"address": "198.51.100.50", "fleet_override_seconds": null})
    );
}

/// The networks in one of this host's ban sets, in the kernel's order.
fn nets(elements: Vec<SetElement>) -> Vec<String> {
    elements.into_iter().map(|ban| ban.net).collect()
}

#[test]
fn sentinel_unban_of_a_fleet_ban_of_one_ipv6_address_lifts_exactly_that_address() {
    let _serial = serial();
    let mut lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    let a = Host::start("unban6", &lapi, &lapi.add_bouncer("sentinel-unban6"));
    // Two single addresses of one /64 (`ssh_guard.ipv6_prefix`), each banned by the fleet alone.
    let target = "2001:db8:5::10";
    let neighbour = "2001:db8:5::11";
    lapi.ban("--ip", target);
    lapi.ban("--ip", neighbour);
    let both = eventually(WAIT, || a.netns.sentinel_set("banned_v6").len() == 2);
    assert!(
        both,
        "{:?}\n{}",
        a.netns.sentinel_set("banned_v6"),
        a.daemon.log()
    );
    assert_eq!(nets(a.netns.sentinel_set("banned_v6")), [target, neighbour]);

    let text = a.daemon.control(&["unban", target]);
    let left = text
        .strip_prefix("unbanned 2001:db8:5::10 on this host only, for 59m ")
        .and_then(|rest| {
            rest.strip_suffix(
                "s: a ban from the CrowdSec fleet, lifted here until it would end; `cscli \
                 decisions delete --ip 2001:db8:5::10` ends it for the whole fleet\n",
            )
        });
    assert!(
        left.is_some_and(|seconds| seconds.parse::<u64>().is_ok_and(|s| s < 60)),
        "{text}"
    );
    // Exactly the fleet's element left the set: not the /64, and not the neighbour in it.
    assert_eq!(nets(a.netns.sentinel_set("banned_v6")), [neighbour]);
    assert_eq!(
        a.listed(),
        [(neighbour.to_string(), "crowdsec:cscli".to_string())]
    );
    let records = audit_records(&a.dir.path().join("audit.log"));
    let unbans: Vec<&serde_json::Value> = records
        .iter()
        .filter(|record| record["action"] == "unban")
        .collect();
    assert_eq!(unbans.len(), 1, "{records:?}");
    assert_eq!(unbans[0]["address"], target, "{records:?}");
    assert_eq!(
        unbans[0]["reason"], "operator_fleet_override",
        "{records:?}"
    );
    assert_eq!(lapi.decisions_about(target).len(), 1);

    // A full pull lists both again: the lifted one stays lifted, the neighbour stays banned.
    lapi.stop();
    a.await_metric(REACHABLE, &[], 0.0);
    lapi.resume();
    a.await_metric(SKIPPED, &[("reason", "lifted_here")], 1.0);
    assert_eq!(nets(a.netns.sentinel_set("banned_v6")), [neighbour]);
    assert_eq!(a.metric(APPLIED, &[("origin", "cscli")]), 2.0);
}

#[test]
fn local_bans_go_on_while_the_lapi_is_down_and_pulls_resume_in_full() {
    let _serial = serial();
    let mut lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    let a = Host::start("down", &lapi, &lapi.add_bouncer("sentinel-down"));
    assert!(eventually(WAIT, || {
        a.daemon
            .scrape()
            .find("sentinel_crowdsec_lapi_reachable", &[])
            == Some(1.0)
    }));
    lapi.stop();
    assert!(
        eventually(WAIT, || a
            .daemon
            .scrape()
            .find("sentinel_crowdsec_lapi_reachable", &[])
            == Some(0.0)),
        "{}",
        a.daemon.scrape().0
    );
    assert!(
        a.metric(
            "sentinel_crowdsec_pull_errors_total",
            &[("kind", "unreachable")]
        ) >= 1.0
    );
    // Local protection does not wait for the fleet.
    a.daemon
        .control(&["ban", &ATTACKER.to_string(), "--for", "1h"]);
    assert!(a.banned(&ATTACKER.to_string()));
    a.assert_blocked(ATTACKER);

    lapi.resume();
    lapi.ban("--ip", &TRUSTED.to_string());
    let other = "198.51.100.40";
    lapi.ban("--ip", other);
    a.await_ban(other);
    assert_eq!(a.metric("sentinel_crowdsec_lapi_reachable", &[]), 1.0);
    // The operator's ban is still the operator's.
    let mut listed = a.listed();
    listed.sort();
    assert_eq!(
        listed,
        [
            (ATTACKER.to_string(), "operator".to_string()),
            (other.to_string(), "crowdsec:cscli".to_string()),
        ]
    );
}

const PUSHES: &str = "sentinel_crowdsec_pushes_total";
const PUSH_QUEUE: &str = "sentinel_crowdsec_push_queue";
const PULL_ERRORS: &str = "sentinel_crowdsec_pull_errors_total";
const LOGINS: &str = "sentinel_crowdsec_logins_total";
const HEARTBEATS: &str = "sentinel_crowdsec_heartbeats_total";
const REACHABLE: &str = "sentinel_crowdsec_lapi_reachable";
const LAST_SYNC: &str = "sentinel_crowdsec_last_sync_timestamp_seconds";
/// Sentinel's alerts' scenario, as `sentinel bans` shows their decisions.
const FLEET_SSH_REASON: &str = "crowdsec:sentinel/ssh-bf";
const FLEET_SCAN_REASON: &str = "crowdsec:sentinel/port-scan";
/// Distinct closed ports that make a scanner on the scanned host.
const SCAN_PORTS: u32 = 10;
const MACHINE_PASSWORD: &str = "fleet-test-password-3b8d";
/// Host B's own threshold, out of reach: the SSH probes see every sshd on the machine, A's too,
/// so a ban on B can only come from the fleet.
const OUT_OF_REACH: u64 = 1000;
/// The watcher retries after 1 s, 2 s, 4 s ... up to a minute: a hang guard over a few of those.
const RETRY_WAIT: Duration = Duration::from_secs(150);

/// Host A runs sshd and pushes its bans as alerts; host B only pulls. Both have pulled once when
/// this returns, so what follows measures the fleet, not their start.
fn ssh_fleet(lapi: &Lapi, tag: &str) -> (Host, Host) {
    // For `cscli alerts list`.
    lapi.add_operator();
    let machine = format!("sentinel-{tag}-a");
    lapi.add_machine(&machine, MACHINE_PASSWORD);
    let a = Host::join(
        &format!("{tag}-a"),
        &Joining {
            machine: Some((&machine, MACHINE_PASSWORD)),
            sshd: true,
            ..Joining::pulling(lapi.url(), &lapi.add_bouncer(&machine))
        },
    );
    let b = Host::join(
        &format!("{tag}-b"),
        &Joining {
            max_failures: OUT_OF_REACH,
            ..Joining::pulling(lapi.url(), &lapi.add_bouncer(&format!("sentinel-{tag}-b")))
        },
    );
    for host in [&a, &b] {
        let synced = eventually(WAIT, || {
            host.daemon
                .scrape()
                .find(LAST_SYNC, &[])
                .is_some_and(|time| time > 0.0)
        });
        assert!(synced, "no pull:\n{}", host.daemon.log());
    }
    (a, b)
}

/// LAPI holds exactly one alert about `address`, from Sentinel's SSH guard on `machine`, with
/// exactly one decision in force: nothing was pushed twice.
fn assert_one_alert_and_decision(lapi: &Lapi, address: &str, machine: &str) {
    let alerts = lapi.alerts_about(address);
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["scenario"], "sentinel/ssh-bf", "{alerts:#?}");
    assert_eq!(alerts[0]["machine_id"], machine, "{alerts:#?}");
    let decisions = lapi.decisions_about(address);
    assert_eq!(decisions.len(), 1, "{decisions:#?}");
    assert_eq!(decisions[0]["type"], "ban", "{decisions:#?}");
    assert_eq!(decisions[0]["origin"], "crowdsec", "{decisions:#?}");
}

#[test]
fn a_port_scan_is_banned_on_its_host_and_through_lapi_on_the_other_with_its_scenario() {
    let _serial = serial();
    let lapi = Lapi::start(&crowdsec_root());
    lapi.add_operator();
    lapi.add_machine("sentinel-scan-a", MACHINE_PASSWORD);
    let a = Host::join(
        "scan-a",
        &Joining {
            machine: Some(("sentinel-scan-a", MACHINE_PASSWORD)),
            port_scan: Some(SCAN_PORTS),
            ..Joining::pulling(lapi.url(), &lapi.add_bouncer("sentinel-scan-a"))
        },
    );
    let b = Host::start("scan-b", &lapi, &lapi.add_bouncer("sentinel-scan-b"));
    let attacker = ATTACKER.to_string();
    b.assert_connects(ATTACKER);

    let closed = a
        .attacker
        .netns
        .nmap_closed("-sS", HOST.into(), "1000-1014");
    assert!(closed >= SCAN_PORTS as u16, "{closed} ports closed");
    a.await_ban(&attacker);
    a.assert_blocked(ATTACKER);
    b.await_ban(&attacker);
    b.assert_blocked(ATTACKER);
    assert_eq!(a.listed(), [(attacker.clone(), "port_scan".to_string())]);
    assert_eq!(
        b.listed(),
        [(attacker.clone(), FLEET_SCAN_REASON.to_string())]
    );
    b.audited_ban(&attacker, FLEET_SCAN_REASON);
    let alerts = lapi.alerts_about(&attacker);
    assert_eq!(alerts.len(), 1, "{alerts:#?}");
    assert_eq!(alerts[0]["scenario"], "sentinel/port-scan", "{alerts:#?}");
    assert_eq!(alerts[0]["machine_id"], "sentinel-scan-a", "{alerts:#?}");
}

#[test]
fn an_ssh_brute_force_is_banned_on_its_host_at_once_and_through_lapi_on_the_other() {
    let _serial = serial();
    let lapi = Lapi::start(&crowdsec_root());
    let (a, b) = ssh_fleet(&lapi, "ssh");
    let attacker = ATTACKER.to_string();
    b.assert_connects(ATTACKER);

    a.brute_force();
    a.await_ban(&attacker);
    a.assert_blocked(ATTACKER);
    let ban = b.await_ban(&attacker);
    b.assert_blocked(ATTACKER);
    b.assert_connects(TRUSTED);
    let detected = a.audited_ban(&attacker, "ssh_failures");
    let enforced = b.audited_ban(&attacker, FLEET_SSH_REASON);
    println!(
        "fleet propagation: A's ban to B's ban in {} ms (pull_interval 1s)",
        enforced - detected
    );
    // The alert bans for what A's ban (ban_for 10m by default) has left.
    let timeout = ban.timeout.expect("a ban with a timeout");
    assert!((580..=600).contains(&timeout), "{ban:?}");

    // A's ban is its own; B's is the fleet's, although B saw every failure too.
    assert_eq!(a.listed(), [(attacker.clone(), "ssh_failures".to_string())]);
    assert_eq!(
        b.listed(),
        [(attacker.clone(), FLEET_SSH_REASON.to_string())]
    );
    let b_scrape = b.daemon.scrape();
    assert_eq!(
        b_scrape.count("sentinel_ssh_auth_failures_total", &[]),
        MAX_FAILURES
    );
    b_scrape.assert_absent("sentinel_bans_total", &[("reason", "ssh_failures")]);
    assert_eq!(b_scrape.value(APPLIED, &[("origin", "crowdsec")]), 1.0);
    assert_eq!(a.metric(PUSHES, &[("result", "ok")]), 1.0);
    assert_eq!(a.metric(PUSHES, &[("result", "failed")]), 0.0);
    assert_eq!(a.metric(PUSH_QUEUE, &[]), 0.0);
    // A pulls its own decision back and leaves its ban as it was.
    a.await_metric(RECEIVED, &[("origin", "crowdsec")], 1.0);
    a.daemon
        .scrape()
        .assert_absent(APPLIED, &[("origin", "crowdsec")]);
    assert_eq!(a.listed(), [(attacker.clone(), "ssh_failures".to_string())]);
    assert_one_alert_and_decision(&lapi, &attacker, "sentinel-ssh-a");
    let machines = lapi.cscli(&["machines", "list", "-o", "raw"]);
    assert!(machines.contains("sentinel-ssh-a"), "{machines}");
}

#[test]
fn a_ban_made_while_the_lapi_is_down_reaches_the_fleet_once_when_it_returns() {
    let _serial = serial();
    let mut lapi = Lapi::start(&crowdsec_root());
    let (a, b) = ssh_fleet(&lapi, "queue");
    let attacker = ATTACKER.to_string();
    lapi.stop();
    for host in [&a, &b] {
        host.await_metric(REACHABLE, &[], 0.0);
    }

    // Local protection does not wait for the fleet; the alert waits in A's queue.
    a.brute_force();
    a.await_ban(&attacker);
    a.assert_blocked(ATTACKER);
    a.await_metric(PUSH_QUEUE, &[], 1.0);
    assert!(a.metric(PUSHES, &[("result", "failed")]) >= 1.0);
    assert_eq!(a.metric(PUSHES, &[("result", "ok")]), 0.0);
    b.assert_connects(ATTACKER);
    assert_eq!(b.bans(), []);

    lapi.resume();
    let resumed = Instant::now();
    b.await_ban_within(&attacker, RETRY_WAIT);
    println!(
        "LAPI back to B's ban in {:?} (the watcher's backoff, then a pull)",
        resumed.elapsed()
    );
    b.assert_blocked(ATTACKER);
    assert_eq!(
        b.listed(),
        [(attacker.clone(), FLEET_SSH_REASON.to_string())]
    );
    assert_eq!(b.metric(APPLIED, &[("origin", "crowdsec")]), 1.0);
    a.await_metric(PUSH_QUEUE, &[], 0.0);
    let a_scrape = a.daemon.scrape();
    assert_eq!(a_scrape.value(PUSHES, &[("result", "ok")]), 1.0);
    // Nothing was lost: no local ban made room in the queue or ended there (each look at the
    // queue counts those that ended, so that series exists).
    let dropped = "sentinel_crowdsec_push_dropped_total";
    a_scrape.assert_absent(dropped, &[("reason", "queue_full")]);
    assert_eq!(a_scrape.value(dropped, &[("reason", "ended")]), 0.0);
    assert_one_alert_and_decision(&lapi, &attacker, "sentinel-queue-a");
    assert_eq!(a.listed(), [(attacker.clone(), "ssh_failures".to_string())]);
    // The restarted LAPI refused the token of A's first login (its JWT secret is new): A logged
    // in exactly once more, at once, and never failed to.
    assert_eq!(a_scrape.value(LOGINS, &[("result", "ok")]), 2.0);
    assert_eq!(a_scrape.value(LOGINS, &[("result", "failed")]), 0.0);
    // A minute after its start, A's heartbeat, with the token it has.
    let beat = eventually(RETRY_WAIT, || {
        a.daemon
            .scrape()
            .find(HEARTBEATS, &[("result", "ok")])
            .is_some_and(|beats| beats >= 1.0)
    });
    assert!(beat, "{}\nlog:\n{}", a.daemon.scrape().0, a.daemon.log());
    assert_eq!(a.metric(LOGINS, &[("result", "ok")]), 2.0);
}

/// A stand-in for a broken or hostile LAPI on loopback, to attack Sentinel's input boundary (not
/// to stand in for CrowdSec): it answers each request with the next of its answers, in turn,
/// and counts what it served.
struct HostileLapi {
    addr: SocketAddr,
    served: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    server: Option<thread::JoinHandle<()>>,
}

/// (HTTP status, body) of each answer.
type Answer = (&'static str, &'static str);

const HOSTILE_ANSWERS: [Answer; 4] = [
    // Cut short.
    (
        "200 OK",
        r#"{"new":[{"duration":"1h","id":1,"origin":"cscli""#,
    ),
    // A good decision beside one whose address is not one: the whole answer is refused.
    (
        "200 OK",
        r#"{"new":[{"duration":"1h","id":2,"origin":"cscli","scenario":"s","scope":"Ip","type":"ban","value":"198.51.100.30"},{"duration":"1h","id":3,"origin":"cscli","scenario":"s","scope":"Ip","type":"ban","value":"198.51.100.300"}],"deleted":null}"#,
    ),
    // JSON of the wrong shape.
    ("200 OK", r#"{"new":"198.51.100.30","deleted":null}"#),
    (
        "500 Internal Server Error",
        r#"{"message":"database is locked"}"#,
    ),
];

impl HostileLapi {
    fn start(answers: &'static [Answer]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the hostile LAPI");
        let addr = listener.local_addr().expect("its address");
        listener
            .set_nonblocking(true)
            .expect("a listener that can stop");
        let served = Arc::new(Mutex::new(vec![0; answers.len()]));
        let stop = Arc::new(AtomicBool::new(false));
        let server = {
            let (served, stop) = (served.clone(), stop.clone());
            thread::spawn(move || {
                let mut turn = 0;
                while !stop.load(Ordering::SeqCst) {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            answer(stream, answers[turn]);
                            served.lock().expect("the counts")[turn] += 1;
                            turn = (turn + 1) % answers.len();
                        }
                        Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(10));
                        }
                        Err(error) => panic!("the hostile LAPI failed: {error}"),
                    }
                }
            })
        };
        Self {
            addr,
            served,
            stop,
            server: Some(server),
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// How many times each answer was served.
    fn served(&self) -> Vec<u64> {
        self.served.lock().expect("the counts").clone()
    }

    /// Stops answering: the port is closed once this returns.
    fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(server) = self.server.take() {
            server.join().expect("the hostile LAPI panicked");
        }
    }
}

impl Drop for HostileLapi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads one request's head and sends `answer`, closing the connection.
fn answer(mut stream: TcpStream, (status, body): Answer) {
    stream.set_nonblocking(false).expect("a blocking stream");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("a read timeout");
    let mut head = Vec::new();
    let mut byte = [0u8];
    while !head.ends_with(b"\r\n\r\n") && stream.read(&mut byte).is_ok_and(|read| read == 1) {
        head.push(byte[0]);
    }
    let request = String::from_utf8_lossy(&head);
    assert!(
        request.starts_with("GET /v1/decisions/stream?startup="),
        "{request}"
    );
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .expect("answer");
}

#[test]
fn a_lapi_answering_garbage_bans_nothing_and_local_protection_goes_on() {
    let _serial = serial();
    let mut hostile = HostileLapi::start(&HOSTILE_ANSWERS);
    let a = Host::join(
        "garbage",
        &Joining {
            sshd: true,
            ..Joining::pulling(hostile.url(), "0123abcd")
        },
    );
    let attacker = ATTACKER.to_string();
    a.brute_force();
    a.await_ban(&attacker);
    a.assert_blocked(ATTACKER);
    let two_rounds = eventually(2 * WAIT, || {
        hostile.served().iter().all(|&count| count >= 2)
    });
    assert!(
        two_rounds,
        "served {:?}:\n{}",
        hostile.served(),
        a.daemon.log()
    );

    // Answered, but with nothing usable: never synced, nothing received, still running.
    let scrape = a.daemon.scrape();
    assert_eq!(scrape.value(REACHABLE, &[]), 1.0);
    assert_eq!(scrape.value(LAST_SYNC, &[]), 0.0);
    scrape.assert_absent(RECEIVED, &[("origin", "cscli")]);
    scrape.assert_absent(APPLIED, &[("origin", "cscli")]);
    assert_eq!(
        scrape.value(
            "sentinel_component_up",
            &[("component", "crowdsec bouncer")]
        ),
        1.0
    );

    hostile.stop();
    let served = hostile.served();
    let malformed = served[..3].iter().sum::<u64>() as f64;
    a.await_metric(PULL_ERRORS, &[("kind", "malformed")], malformed);
    a.await_metric(PULL_ERRORS, &[("kind", "http")], served[3] as f64);
    a.await_metric(REACHABLE, &[], 0.0);
    assert_eq!(a.listed(), [(attacker.clone(), "ssh_failures".to_string())]);
    let nets: Vec<String> = a.bans().into_iter().map(|ban| ban.net).collect();
    assert_eq!(nets, [attacker]);
    a.assert_connects(BYSTANDER);
    a.assert_blocked(ATTACKER);
    let refused = a.daemon.log_records(&[("level", "ERROR")]);
    assert!(
        refused.iter().any(|record| record["message"]
            .as_str()
            .is_some_and(|message| message.contains("198.51.100.300"))),
        "{}",
        a.daemon.log()
    );
}

#[test]
fn a_bouncer_key_others_can_read_stops_the_daemon_from_starting() {
    let _serial = serial();
    let dir = TempDir::new("sentinel-fleet-key");
    let key_file = dir.path().join("bouncer.key");
    fs::write(&key_file, "0123abcd\n").expect("write the key");
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).expect("chmod 644");
    let netns = Netns::new("fleet-key");
    let config = format!(
        "ssh_guard:\n  audit_log: {}\n  netns: {}\ncrowdsec:\n  lapi_url: http://127.0.0.1:9\n  \
         bouncer_key_file: {}\n",
        dir.path().join("audit.log").display(),
        netns.path().display(),
        key_file.display()
    );
    let mut daemon = Daemon::spawn_with_config(free_port(), &config, &[]);
    let (status, _) = daemon
        .wait_exit(Duration::from_secs(30))
        .expect("the daemon exits");
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let expected = format!(
        "the CrowdSec credential file {0}: mode 644 lets other users read it; `chmod 600 {0}`",
        key_file.display()
    );
    assert!(daemon.log().contains(&expected), "{}", daemon.log());
    // Refused before anything was set up: no table in the host's namespace.
    assert!(!netns.nft(&["list", "tables"], "").contains("sentinel"));
}

#[test]
fn a_lapi_over_tls_is_trusted_through_ca_file_and_refused_without_it() {
    let _serial = serial();
    let lapi = Lapi::start_tls(&crowdsec_root());
    lapi.add_operator();
    let trusting = Host::join(
        "tls-ca",
        &Joining {
            ca_file: Some(lapi.ca()),
            ..Joining::pulling(lapi.url(), &lapi.add_bouncer("sentinel-tls-ca"))
        },
    );
    let untrusting = Host::start("tls-none", &lapi, &lapi.add_bouncer("sentinel-tls-none"));
    lapi.ban("--ip", &ATTACKER.to_string());
    trusting.await_ban(&ATTACKER.to_string());
    trusting.assert_blocked(ATTACKER);
    assert_eq!(trusting.metric(APPLIED, &[("origin", "cscli")]), 1.0);
    assert_eq!(
        trusting.metric(PULL_ERRORS, &[("kind", "certificate")]),
        0.0
    );

    // Signed by a CA the system does not trust: refused, counted, logged; nothing banned.
    let refused = eventually(WAIT, || {
        untrusting
            .daemon
            .scrape()
            .find(PULL_ERRORS, &[("kind", "certificate")])
            .is_some_and(|errors| errors >= 2.0)
    });
    assert!(
        refused,
        "{}\nlog:\n{}",
        untrusting.daemon.scrape().0,
        untrusting.daemon.log()
    );
    let scrape = untrusting.daemon.scrape();
    assert_eq!(scrape.value(REACHABLE, &[]), 0.0);
    assert_eq!(scrape.value(LAST_SYNC, &[]), 0.0);
    scrape.assert_absent(RECEIVED, &[("origin", "cscli")]);
    assert_eq!(untrusting.bans(), []);
    untrusting.assert_connects(ATTACKER);
    let warnings = untrusting.daemon.log_records(&[("level", "WARN")]);
    let logged = warnings.iter().filter(|record| {
        record["message"].as_str().is_some_and(|message| {
            message.contains("its certificate is not trusted here (crowdsec.ca_file names the CA that signed it)")
                && message.contains("UnknownIssuer")
        })
    });
    // Once for the outage, not once per pull.
    assert_eq!(logged.count(), 1, "{}", untrusting.daemon.log());
}

#[test]
fn sentinel_check_refuses_a_ca_file_it_cannot_read_where_it_is_named() {
    let dir = TempDir::new("sentinel-fleet-ca");
    let config = dir.path().join("sentinel.yaml");
    let missing = dir.path().join("ca.pem");
    fs::write(
        &config,
        format!(
            "crowdsec:\n  lapi_url: https://lapi.example.org\n  bouncer_key_file: /k\n  \
             ca_file: {}\n",
            missing.display()
        ),
    )
    .expect("write the configuration");
    let output = Command::new(sentinel_tests::sentinel_bin())
        .arg("check")
        .arg(&config)
        .output()
        .expect("run sentinel check");
    assert_eq!(output.status.code(), Some(78));
    assert_eq!(
        String::from_utf8_lossy(&output.stderr),
        format!(
            "{}:4:12: ca_file: cannot open {}: No such file or directory (os error 2)\n",
            config.display(),
            missing.display()
        )
    );
}
