//! The fleet end to end with Debian's crowdsec 1.4.6: its Local API runs alone
//! (`crowdsec -no-cs -no-capi`) with the test's own configuration, SQLite database and empty
//! hub, listening on loopback; `cscli` with the same configuration registers the bouncers and
//! adds and deletes decisions. Two Sentinels, each banning in its own "host" network namespace,
//! pull the decisions; an attacker with the same address reaches each host over its own veth
//! pair. Needs root, nft and the unpacked package (`SENTINEL_CROWDSEC`, set by `cargo xtask
//! test`): `cargo test -p sentinel-tests --test crowdsec -- --test-threads=1`.

use std::{
    fs::{self, File},
    net::{Ipv4Addr, SocketAddr, TcpListener},
    os::unix::fs::PermissionsExt,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use sentinel_tests::{
    Daemon, TempDir, eventually, free_port, http_get,
    netlab::{Netns, SetElement},
    serial,
};

/// Each host's address on its link to the attacker, and the attacker's.
const HOST: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
/// An address inside both Sentinels' allow list, on the attacker's side too.
const TRUSTED: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 20);
const ALLOWED: &str = "198.51.100.16/28";
const SERVICE_PORT: u16 = 8022;
/// How long a pull (every second) and a ban may take, generously.
const WAIT: Duration = Duration::from_secs(20);

fn crowdsec_root() -> PathBuf {
    let root = std::env::var_os("SENTINEL_CROWDSEC").expect(
        "SENTINEL_CROWDSEC must name the unpacked crowdsec package; `cargo xtask test` sets it",
    );
    PathBuf::from(root)
}

/// CrowdSec's Local API, alone and offline, with everything in its own directory.
struct Lapi {
    process: Option<Child>,
    port: u16,
    dir: TempDir,
}

impl Lapi {
    fn start() -> Self {
        let dir = TempDir::new("sentinel-lapi");
        for sub in ["data", "hub", "config"] {
            fs::create_dir_all(dir.path().join(sub)).expect("create the LAPI's directories");
        }
        // An empty hub: the Local API needs no parsers or scenarios.
        fs::write(dir.path().join("hub/.index.json"), "{}").expect("write the hub index");
        fs::write(
            dir.path().join("config/simulation.yaml"),
            "simulation: false\n",
        )
        .expect("write simulation.yaml");
        fs::copy(
            crowdsec_root().join("etc/crowdsec/profiles.yaml"),
            dir.path().join("config/profiles.yaml"),
        )
        .expect("copy the package's profiles.yaml");
        let mut lapi = Self {
            process: None,
            port: free_port(),
            dir,
        };
        fs::write(lapi.config(), lapi.config_text()).expect("write the LAPI's config");
        lapi.resume();
        lapi
    }

    fn config(&self) -> PathBuf {
        self.dir.path().join("config/config.yaml")
    }

    fn config_text(&self) -> String {
        let dir = self.dir.path().display();
        format!(
            "common:
  daemonize: false
  log_media: stdout
  log_level: info
config_paths:
  config_dir: {dir}/config/
  data_dir: {dir}/data/
  simulation_path: {dir}/config/simulation.yaml
  hub_dir: {dir}/hub/
  index_path: {dir}/hub/.index.json
  notification_dir: {dir}/config/notifications/
  plugin_dir: {dir}/plugins/
crowdsec_service:
  acquisition_path: {dir}/config/acquis.yaml
db_config:
  type: sqlite
  db_path: {dir}/data/crowdsec.db
  use_wal: false
api:
  client:
    credentials_path: {dir}/config/local_api_credentials.yaml
  server:
    listen_uri: 127.0.0.1:{port}
    profiles_path: {dir}/config/profiles.yaml
    trusted_ips:
      - 127.0.0.1
prometheus:
  enabled: false
",
            port = self.port
        )
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Starts (again) the Local API on the same database, and waits until `/health` answers.
    fn resume(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(self.dir.path().join("crowdsec.log"))
            .expect("open the LAPI's log");
        let process = Command::new(crowdsec_root().join("usr/bin/crowdsec"))
            .arg("-c")
            .arg(self.config())
            .args(["-no-cs", "-no-capi"])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone the log"))
            .stderr(log)
            .spawn()
            .expect("start crowdsec");
        self.process = Some(process);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        let up = eventually(WAIT, || http_get(addr, "/health", None).is_ok());
        assert!(up, "the LAPI did not answer /health:\n{}", self.log());
    }

    fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            let _ = process.wait();
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("crowdsec.log")).unwrap_or_default()
    }

    /// `cscli ARGS` against this LAPI's configuration; returns stdout.
    fn cscli(&self, args: &[&str]) -> String {
        let output = Command::new(crowdsec_root().join("usr/bin/cscli"))
            .arg("-c")
            .arg(self.config())
            .args(args)
            .output()
            .expect("run cscli");
        assert!(
            output.status.success(),
            "cscli {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("cscli prints UTF-8")
    }

    /// `cscli decisions add TARGET VALUE --duration 1h`: TARGET is `--ip` or `--range`.
    fn ban(&self, target: &str, value: &str) {
        self.cscli(&["decisions", "add", target, value, "--duration", "1h"]);
    }

    /// Registers a bouncer and returns its key.
    fn add_bouncer(&self, name: &str) -> String {
        self.cscli(&["bouncers", "add", name, "-o", "raw"])
            .trim()
            .to_string()
    }

    /// Registers the machine `cscli decisions` itself logs in as.
    fn add_operator(&self) {
        self.cscli(&["machines", "add", "operator", "--auto"]);
    }
}

impl Drop for Lapi {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A host: a namespace whose firewall a Sentinel manages, with a listening service, linked to
/// an attacker namespace holding `ATTACKER` and `TRUSTED`.
struct Host {
    daemon: Daemon,
    // Dropped after the daemon: the attacker's namespace, then the host's.
    attacker: Netns,
    netns: Netns,
    _service: TcpListener,
    _dir: TempDir,
}

impl Host {
    fn start(tag: &str, lapi: &Lapi, key: &str) -> Self {
        let dir = TempDir::new(&format!("sentinel-fleet-{tag}"));
        let netns = Netns::new(&format!("fleet-{tag}"));
        let attacker = Netns::new(&format!("fleet-{tag}-atk"));
        netns.veth("atk", &attacker, "eth0");
        netns.ip(&format!("addr add {HOST}/24 dev atk"));
        for address in [ATTACKER, TRUSTED] {
            attacker.ip(&format!("addr add {address}/24 dev eth0"));
        }
        let service = netns.run(|| {
            TcpListener::bind(SocketAddr::from((HOST, SERVICE_PORT))).expect("bind the service")
        });
        let key_file = dir.path().join("bouncer.key");
        write_private(&key_file, key);
        let config = format!(
            "ssh_guard:
  allow: [{ALLOWED}]
  audit_log: {}
  netns: {}
crowdsec:
  lapi_url: {}
  bouncer_key_file: {}
  pull_interval: 1s
",
            dir.path().join("audit.log").display(),
            netns.path().display(),
            lapi.url(),
            key_file.display()
        );
        let daemon = Daemon::start_with_config(&config, &[]);
        Self {
            daemon,
            attacker,
            netns,
            _service: service,
            _dir: dir,
        }
    }

    fn service(&self) -> SocketAddr {
        SocketAddr::from((HOST, SERVICE_PORT))
    }

    fn bans(&self) -> Vec<SetElement> {
        self.netns.sentinel_set("banned_v4")
    }

    fn banned(&self, net: &str) -> bool {
        self.bans().iter().any(|ban| ban.net == net)
    }

    fn await_ban(&self, net: &str) -> SetElement {
        let mut found = None;
        let banned = eventually(WAIT, || {
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
    let lapi = Lapi::start();
    lapi.add_operator();
    let a = Host::start("a", &lapi, &lapi.add_bouncer("sentinel-a"));
    let b = Host::start("b", &lapi, &lapi.add_bouncer("sentinel-b"));
    for host in [&a, &b] {
        host.attacker
            .assert_connects(ATTACKER.into(), host.service());
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
        host.attacker
            .assert_blocked(ATTACKER.into(), host.service());
        host.attacker
            .assert_connects(TRUSTED.into(), host.service());
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
        host.attacker
            .assert_connects(ATTACKER.into(), host.service());
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
    let lapi = Lapi::start();
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
    let nets: Vec<String> = a.bans().into_iter().map(|ban| ban.net).collect();
    assert_eq!(nets, ["198.51.100.10", "198.51.100.32/28"]);
    a.attacker.assert_connects(TRUSTED.into(), a.service());
    a.attacker.assert_blocked(ATTACKER.into(), a.service());
}

#[test]
fn local_bans_go_on_while_the_lapi_is_down_and_pulls_resume_in_full() {
    let _serial = serial();
    let mut lapi = Lapi::start();
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
    a.attacker.assert_blocked(ATTACKER.into(), a.service());

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
