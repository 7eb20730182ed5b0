//! The SSH brute-force guard end to end: a real OpenSSH server in a network namespace, real
//! `ssh` clients failing to log in from attacker namespaces, the daemon seeing each failure in
//! libpam and banning in the server namespace's nftables. Nothing touches the root namespace's
//! ruleset. Needs root, openssh-server, sshpass and nft:
//! `cargo test -p sentinel-tests --test ssh_guard -- --test-threads=1`.

use std::{
    collections::BTreeMap,
    fs,
    io::{BufRead, BufReader, Write},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, ChildStdin, ChildStdout, Command, Stdio},
    time::Duration,
};

use sentinel_tests::{
    Daemon, Scrape, TempDir, assert_promtool_clean, audit_records, eventually, free_port,
    netlab::{Netns, SetElement},
    rfc3339_millis, sentinel_bin, serial,
    sshlab::{
        Peer, SESSION_SSH_OPTIONS, SSH_PORT, Sshd, SshdAuth, TestUser, USER_PASSWORD, key_pair,
    },
    testkit_bin,
};

const MAX_FAILURES: u64 = 5;
/// How long the daemon may take to count a failure, ban, or see a ban lifted.
const WAIT: Duration = Duration::from_secs(15);

const FIRST_ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const FIRST_SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
const SECOND_ATTACKER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 10);
const SECOND_SERVER: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 1);
const V6_ATTACKER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 0x10);
/// Another address in the IPv6 attacker's /64.
const V6_NEIGHBOUR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 0x11);
const V6_PREFIX: &str = "2001:db8:6::/64";
const V6_SERVER: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 6, 0, 0, 0, 0, 1);
/// Inside `ALLOWED`.
const TRUSTED_CLIENT: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const TRUSTED_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
const ALLOWED: &str = "192.0.2.0/24";
/// An address that never attacks; only forged failures name it.
const FORGED_VICTIM: &str = "198.51.100.77";

const FAILURES: &str = "sentinel_ssh_auth_failures_total";
const PREAUTH: &str = "sentinel_ssh_preauth_disconnects_total";
const BANS: &str = "sentinel_bans_total";
const SKIPPED: &str = "sentinel_bans_skipped_total";
const BANNED: &str = "sentinel_banned_addresses";
const BAN_REASONS: [&str; 3] = ["ssh_failures", "ssh_repeat_offender", "operator"];
const SKIP_REASONS: [&str; 3] = ["allowlisted", "active_session", "ban_table_full"];

/// A server namespace running sshd, joined by one veth pair each to two IPv4 attackers, an
/// IPv6 attacker and a client inside the allow list; plus a local account to log in with.
struct SshLab {
    // Dropped in this order: sshd, the clients' namespaces, the server's (with the sessions
    // still inside), then the account and the files.
    sshd: Sshd,
    first: Peer,
    second: Peer,
    v6: Peer,
    trusted: Peer,
    server: Netns,
    user: TestUser,
    dir: TempDir,
}

impl SshLab {
    fn new() -> Self {
        Self::with_sshd(SshdAuth::Password)
    }

    /// The lab with an sshd that lets users in as `auth` says.
    fn with_sshd(auth: SshdAuth) -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the SSH guard tests need root"
        );
        let dir = TempDir::new("sentinel-ssh-lab");
        let server = Netns::new("ssh-srv");
        let first = Peer::link(&server, "atk1", FIRST_SERVER, &[FIRST_ATTACKER.into()]);
        let second = Peer::link(&server, "atk2", SECOND_SERVER, &[SECOND_ATTACKER.into()]);
        let v6 = Peer::link(
            &server,
            "atk6",
            V6_SERVER,
            &[V6_ATTACKER.into(), V6_NEIGHBOUR.into()],
        );
        let trusted = Peer::link(&server, "trusted", TRUSTED_SERVER, &[TRUSTED_CLIENT.into()]);
        let user = TestUser::create(dir.path());
        let sshd = Sshd::start_with(
            &server,
            &[first.server, second.server, v6.server, trusted.server],
            dir.path(),
            auth,
        );
        Self {
            sshd,
            first,
            second,
            v6,
            trusted,
            server,
            user,
            dir,
        }
    }

    /// The guard's configuration for this lab: the defaults of `deploy/sentinel.yaml`, with
    /// bans of `ban_for` made in the server namespace.
    fn config(&self, ban_for: &str) -> String {
        self.config_allowing(ban_for, ALLOWED)
    }

    /// `config` with `allow` as the allow list.
    fn config_allowing(&self, ban_for: &str, allow: &str) -> String {
        format!(
            "ssh_guard:
  enabled: true
  mode: enforce
  max_failures: {MAX_FAILURES}
  window: 10m
  ban_for: {ban_for}
  multiplier: 2
  max_ban: 1w
  allow: [{allow}]
  ipv6_prefix: 64
  flush_on_exit: false
  audit_log: {}
  netns: {}
",
            self.audit_log().display(),
            self.server.path().display()
        )
    }

    /// Starts the daemon and checks that its guard opened the server namespace's firewall.
    fn start_daemon(&self, ban_for: &str) -> Daemon {
        let daemon = Daemon::start_with_config(&self.config(ban_for), &[]);
        assert!(
            !daemon.log().contains("SSH guard not started"),
            "{}",
            daemon.log()
        );
        let tables = self.server.nft(&["list", "tables"], "");
        assert!(tables.contains("table inet sentinel"), "{tables}");
        let scrape = daemon.scrape();
        for component in ["ssh guard", "table watch"] {
            let up = scrape.value("sentinel_component_up", &[("component", component)]);
            assert_eq!(up, 1.0, "{component}");
        }
        daemon
    }

    /// Runs `count` failing logins from each peer, all at once; sshd refuses every one.
    fn fail_logins(&self, attempts: &[(&Peer, u64)]) {
        self.sshd.fail_logins(&self.user, attempts);
    }

    /// Logs the test user in from `peer` with the right password.
    fn login(&self, peer: &Peer) -> Session {
        let mut client = peer
            .ssh(&self.user.name, USER_PASSWORD, SESSION_SSH_OPTIONS, "cat")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("run sshpass ssh");
        let input = client.stdin.take();
        let output = BufReader::new(client.stdout.take().expect("ssh's stdout"));
        Session {
            client,
            input,
            output,
        }
    }

    /// sshd's privileged monitor processes of the test user's sessions: each lives as long as
    /// its session, and it is the process the guard watches.
    fn session_monitors(&self) -> Vec<i32> {
        let title = format!("sshd: {} [priv]", self.user.name);
        self.server
            .pids()
            .into_iter()
            .filter(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|cmdline| cmdline.starts_with(title.as_bytes()))
            })
            .collect()
    }

    /// Every ban in the server namespace's firewall, IPv4 then IPv6.
    fn bans(&self) -> Vec<SetElement> {
        let mut bans = self.server.sentinel_set("banned_v4");
        bans.extend(self.server.sentinel_set("banned_v6"));
        bans
    }

    fn assert_no_bans(&self) {
        let bans = self.bans();
        assert!(bans.is_empty(), "{bans:?}");
    }

    fn banned_nets(&self) -> Vec<String> {
        self.bans().into_iter().map(|ban| ban.net).collect()
    }

    fn ban_of(&self, net: &str) -> Option<SetElement> {
        self.bans().into_iter().find(|ban| ban.net == net)
    }

    /// Waits until the kernel holds a ban of `net`, and returns it.
    fn await_ban(&self, net: &str) -> SetElement {
        let mut found = None;
        let banned = eventually(WAIT, || {
            found = self.ban_of(net);
            found.is_some()
        });
        assert!(banned, "{net} was not banned; bans: {:?}", self.bans());
        found.expect("the ban just seen")
    }

    /// Clients inside the server namespace still reach its sshd, on each of its addresses; its
    /// IPv6 address lies inside the IPv6 attacker's /64.
    fn assert_server_reaches_itself(&self) {
        for peer in [&self.first, &self.second, &self.v6, &self.trusted] {
            let server = peer.server;
            self.server
                .assert_connects(server, SocketAddr::new(server, SSH_PORT));
        }
    }

    fn audit_log(&self) -> PathBuf {
        self.dir.path().join("audit.log")
    }

    fn audit_records(&self) -> Vec<serde_json::Value> {
        audit_records(&self.audit_log())
    }
}

/// A logged-in SSH session running `cat`, so that it can show it still works.
struct Session {
    client: Child,
    input: Option<ChildStdin>,
    output: BufReader<ChildStdout>,
}

impl Session {
    /// A line sent through the session comes back.
    fn assert_works(&mut self, line: &str) {
        let input = self.input.as_mut().expect("the session is open");
        writeln!(input, "{line}").expect("write to the session");
        input.flush().expect("flush the session");
        let mut echoed = String::new();
        self.output
            .read_line(&mut echoed)
            .expect("read from the session");
        assert_eq!(echoed.trim_end(), line, "the session did not echo");
    }

    /// Ends `cat` with end of input, and the session with it.
    fn close(&mut self) {
        drop(self.input.take());
        let mut status = None;
        let ended = eventually(WAIT, || {
            status = self.client.try_wait().expect("try_wait ssh");
            status.is_some()
        });
        assert!(ended, "the session did not end");
        assert!(status.is_some_and(|status| status.success()), "{status:?}");
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.client.kill();
        let _ = self.client.wait();
    }
}

fn bans_for(daemon: &Daemon, reason: &str) -> u64 {
    daemon.scrape().count(BANS, &[("reason", reason)])
}

/// A reason that never banned has no series.
fn assert_no_bans_for(daemon: &Daemon, reason: &str) {
    daemon.scrape().assert_absent(BANS, &[("reason", reason)]);
}

fn skipped_for(daemon: &Daemon, reason: &str) -> u64 {
    daemon.scrape().count(SKIPPED, &[("reason", reason)])
}

fn assert_none_skipped_for(daemon: &Daemon, reason: &str) {
    daemon
        .scrape()
        .assert_absent(SKIPPED, &[("reason", reason)]);
}

fn banned_in_family(daemon: &Daemon, family: &str) -> u64 {
    daemon.scrape().count(BANNED, &[("family", family)])
}

/// `name{labels}` counts `expected` in `scrape`; a labelled counter that never counted has no
/// series, so 0 is checked as absent.
fn assert_counted(scrape: &Scrape, name: &str, labels: &[(&str, &str)], expected: u64) {
    if expected == 0 {
        scrape.assert_absent(name, labels);
    } else {
        assert_eq!(scrape.count(name, labels), expected, "{name}{labels:?}");
    }
}

/// Audit records with `action` and `reason`.
fn records_of<'a>(
    records: &'a [serde_json::Value],
    action: &str,
    reason: &str,
) -> Vec<&'a serde_json::Value> {
    records
        .iter()
        .filter(|record| record["action"] == action && record["reason"] == reason)
        .collect()
}

/// How long the ban of an audit record was made for: its `expires` minus its `time`.
fn audited_ban_length(record: &serde_json::Value) -> Duration {
    let millis = |key: &str| rfc3339_millis(record[key].as_str().expect("a timestamp"));
    let length = millis("expires") - millis("time");
    Duration::from_millis(length.try_into().expect("expires after time"))
}

fn assert_ban_length(record: &serde_json::Value, expected: Duration) {
    let length = audited_ban_length(record);
    // `expires` and `time` are read from the clock a moment apart.
    let tolerance = Duration::from_millis(250);
    assert!(
        length.abs_diff(expected) <= tolerance,
        "{record}: banned for {length:?}, not {expected:?}"
    );
}

#[test]
fn each_attacker_is_banned_at_exactly_max_failures() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    let attackers = [&lab.first, &lab.second, &lab.v6];

    lab.fail_logins(&attackers.map(|attacker| (attacker, MAX_FAILURES - 1)));
    let mut failures = 3 * (MAX_FAILURES - 1);
    daemon.await_count(FAILURES, &[], failures, WAIT);
    for attacker in attackers {
        attacker.assert_connects();
    }
    assert_no_bans_for(&daemon, "ssh_failures");
    lab.assert_no_bans();

    for (banned, attacker) in attackers.iter().enumerate() {
        lab.fail_logins(&[(*attacker, 1)]);
        failures += 1;
        daemon.await_count(FAILURES, &[], failures, WAIT);
        lab.await_ban(&attacker.offender());
        attacker.assert_blocked();
        for not_yet_banned in &attackers[banned + 1..] {
            not_yet_banned.assert_connects();
        }
        lab.trusted.assert_connects();
        lab.assert_server_reaches_itself();
        assert_eq!(bans_for(&daemon, "ssh_failures"), banned as u64 + 1);
    }

    lab.v6.assert_blocked_from(V6_NEIGHBOUR);
    assert_eq!(
        lab.banned_nets(),
        ["198.51.100.10", "203.0.113.10", V6_PREFIX]
    );
    daemon.await_count(BANNED, &[("family", "ipv4")], 2, WAIT);
    daemon.await_count(BANNED, &[("family", "ipv6")], 1, WAIT);
    assert_eq!(daemon.scrape().count(FAILURES, &[]), failures);
    // A connection whose password failed is that failure, not also a pre-auth disconnect.
    assert_eq!(daemon.scrape().count(PREAUTH, &[]), 0);
}

/// Public keys only, as hardened servers run: `a_key_only_server_...` attacks it with keys it
/// does not know, and logs in with one it does.
#[test]
fn a_key_only_server_bans_refused_keys_and_unknown_users_but_never_a_login_after_a_refused_key() {
    let _serial = serial();
    let lab = SshLab::with_sshd(SshdAuth::KeysOnly);
    let refused = key_pair(&lab.dir.path().join("refused_key"));
    let accepted = key_pair(&lab.dir.path().join("accepted_key"));
    let public = fs::read_to_string(accepted.with_extension("pub")).expect("the public key");
    fs::write(lab.dir.path().join("authorized_keys"), public).expect("authorize the key");
    let daemon = lab.start_daemon("1h");
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.value("sentinel_probe_attached", &[("program", "ssh_preauth_end")]),
        1.0
    );
    assert_eq!(scrape.count(PREAUTH, &[]), 0);

    // The administrator's client offers a key the server refuses, then the right one.
    let login = lab
        .second
        .ssh_with_keys(&lab.user.name, &[&refused, &accepted], "true")
        .output()
        .expect("run ssh");
    assert!(
        login.status.success(),
        "the key login failed: {}\nsshd:\n{}",
        String::from_utf8_lossy(&login.stderr),
        lab.sshd.log()
    );
    assert!(
        eventually(WAIT, || lab.session_monitors().is_empty()),
        "the login's sshd monitor did not end"
    );

    // The attacker: refused keys for the real account and for unknown ones, in turn. With
    // `preauth_weight: 0.5`, nine such connections weigh 4.5 failures...
    let attempt = |n: u64| {
        let user = if n.is_multiple_of(2) {
            format!("no-such-user-{n}")
        } else {
            lab.user.name.clone()
        };
        let output = lab
            .first
            .ssh_with_keys(&user, &[&refused], "true")
            .output()
            .expect("run ssh");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            !output.status.success() && stderr.contains("Permission denied (publickey)"),
            "attempt {n} as {user} ended otherwise ({}): {stderr}\nsshd:\n{}",
            output.status,
            lab.sshd.log()
        );
    };
    for n in 0..9 {
        attempt(n);
    }
    daemon.await_count(PREAUTH, &[], 9, WAIT);
    lab.first.assert_connects();
    lab.assert_no_bans();
    // ...and the tenth makes five: a ban.
    attempt(9);
    lab.await_ban(&lab.first.offender());
    lab.first.assert_blocked();
    lab.second.assert_connects();

    // Exactly the attacker's ten: the administrator's refused key was never counted (its
    // event, had there been one, came first on the kernel's ring).
    let scrape = daemon.scrape();
    assert_eq!(scrape.count(PREAUTH, &[]), 10);
    assert_eq!(scrape.count(FAILURES, &[]), 0);
    assert_eq!(scrape.value("sentinel_ssh_tracked_addresses", &[]), 0.0);
    assert_eq!(bans_for(&daemon, "ssh_failures"), 1);
    let records = lab.audit_records();
    let bans = records_of(&records, "ban", "ssh_failures");
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert_eq!(bans[0]["address"], lab.first.offender());
    assert_eq!(bans[0]["failures"], 10);
    assert_eq!(lab.banned_nets(), [lab.first.offender()]);
}

#[test]
fn allowlisted_attacker_is_never_banned() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");

    lab.fail_logins(&[(&lab.trusted, 12)]);

    daemon.await_count(FAILURES, &[], 12, WAIT);
    // The count starts over after each skipped ban: one at failure 5, one at failure 10.
    daemon.await_count(SKIPPED, &[("reason", "allowlisted")], 2, WAIT);
    lab.trusted.assert_connects();
    lab.assert_no_bans();
    assert_no_bans_for(&daemon, "ssh_failures");
    assert_eq!(banned_in_family(&daemon, "ipv4"), 0);
    let records = lab.audit_records();
    assert_eq!(records.len(), 2, "{records:?}");
    for record in &records {
        assert_eq!(record["action"], "skip", "{record}");
        assert_eq!(record["reason"], "allowlisted", "{record}");
        assert_eq!(record["address"], TRUSTED_CLIENT.to_string(), "{record}");
        assert_eq!(record["failures"], MAX_FAILURES, "{record}");
    }
}

#[test]
fn address_with_an_open_session_is_not_banned_until_it_closes() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    let mut session = lab.login(&lab.second);
    session.assert_works("logged in");
    let monitors = lab.session_monitors();
    assert_eq!(monitors.len(), 1, "sshd:\n{}", lab.sshd.log());
    assert_eq!(daemon.scrape().count(FAILURES, &[]), 0);

    lab.fail_logins(&[(&lab.second, MAX_FAILURES)]);

    daemon.await_count(FAILURES, &[], MAX_FAILURES, WAIT);
    daemon.await_count(SKIPPED, &[("reason", "active_session")], 1, WAIT);
    lab.second.assert_connects();
    session.assert_works("still working");
    lab.assert_no_bans();
    assert_no_bans_for(&daemon, "ssh_failures");

    // Once the session is over, the same failures ban the address.
    session.close();
    let monitors_gone = eventually(WAIT, || {
        monitors
            .iter()
            .all(|pid| !Path::new(&format!("/proc/{pid}")).exists())
    });
    assert!(monitors_gone, "sshd's session monitor outlived the session");
    lab.fail_logins(&[(&lab.second, MAX_FAILURES)]);
    daemon.await_count(FAILURES, &[], 2 * MAX_FAILURES, WAIT);
    lab.await_ban(&lab.second.offender());
    lab.second.assert_blocked();
    assert_eq!(bans_for(&daemon, "ssh_failures"), 1);
    assert_eq!(skipped_for(&daemon, "active_session"), 1);
}

#[test]
fn ban_expires_and_a_repeat_offender_is_banned_longer() {
    let _serial = serial();
    let lab = SshLab::new();
    let first_length = Duration::from_secs(3);
    let daemon = lab.start_daemon("3s");
    let offender = lab.first.offender();

    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    let first_ban = lab.await_ban(&offender);
    assert_eq!(first_ban.timeout, Some(3));
    lab.first.assert_blocked();
    assert!(
        eventually(WAIT, || lab.first.can_connect()),
        "the first ban was not lifted"
    );
    lab.assert_no_bans();
    daemon.await_count(BANNED, &[("family", "ipv4")], 0, WAIT);

    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    let second_ban = lab.await_ban(&offender);
    assert_eq!(second_ban.timeout, Some(6), "multiplier 2");
    daemon.await_count(BANS, &[("reason", "ssh_repeat_offender")], 1, WAIT);
    assert_eq!(bans_for(&daemon, "ssh_failures"), 1);

    // The kernel's own countdown shows when the first ban's length has passed: under 3 s left
    // of 6 s.
    let past_first_length = eventually(WAIT, || {
        lab.ban_of(&offender)
            .and_then(|ban| ban.expires)
            .is_some_and(|left| left < 3)
    });
    assert!(past_first_length, "bans: {:?}", lab.bans());
    lab.first.assert_blocked();
    assert!(
        eventually(WAIT, || lab.first.can_connect()),
        "the second ban was not lifted"
    );

    let records = lab.audit_records();
    let first = records_of(&records, "ban", "ssh_failures");
    let repeat = records_of(&records, "ban", "ssh_repeat_offender");
    assert_eq!((first.len(), repeat.len()), (1, 1), "{records:?}");
    assert_ban_length(first[0], first_length);
    assert_ban_length(repeat[0], 2 * first_length);
}

#[test]
fn bans_survive_a_killed_daemon_and_are_adopted_once() {
    let _serial = serial();
    let lab = SshLab::new();
    let mut daemon = lab.start_daemon("1h");
    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    lab.await_ban(&lab.first.offender());

    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(WAIT).is_some(), "SIGKILL did not end it");

    lab.first.assert_blocked();
    lab.second.assert_connects();
    assert_eq!(lab.banned_nets(), ["198.51.100.10"]);

    let daemon = lab.start_daemon("1h");
    let adopted = daemon.log_records(&[("message", "adopted the bans already in the kernel")]);
    assert_eq!(adopted.len(), 1, "{}", daemon.log());
    assert_eq!(adopted[0]["bans"], 1);
    assert_eq!(banned_in_family(&daemon, "ipv4"), 1);
    assert_eq!(lab.banned_nets(), ["198.51.100.10"]);
    lab.first.assert_blocked();

    lab.fail_logins(&[(&lab.second, MAX_FAILURES)]);
    lab.await_ban(&lab.second.offender());
    assert_eq!(lab.banned_nets(), ["198.51.100.10", "203.0.113.10"]);
    daemon.await_count(BANNED, &[("family", "ipv4")], 2, WAIT);
    lab.first.assert_blocked();
    lab.second.assert_blocked();
}

#[test]
fn metrics_audit_log_and_firewall_agree() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");

    lab.fail_logins(&[
        (&lab.first, MAX_FAILURES),
        (&lab.second, MAX_FAILURES),
        (&lab.v6, MAX_FAILURES),
        (&lab.trusted, 2 * MAX_FAILURES),
    ]);
    let attempts = 5 * MAX_FAILURES;
    daemon.await_count(FAILURES, &[], attempts, WAIT);
    daemon.await_count(BANNED, &[("family", "ipv4")], 2, WAIT);
    daemon.await_count(BANNED, &[("family", "ipv6")], 1, WAIT);

    let records = lab.audit_records();
    let scrape = daemon.scrape();
    for reason in BAN_REASONS {
        let audited = records_of(&records, "ban", reason).len() as u64;
        assert_counted(&scrape, BANS, &[("reason", reason)], audited);
    }
    for reason in SKIP_REASONS {
        let audited = records_of(&records, "skip", reason).len() as u64;
        assert_counted(&scrape, SKIPPED, &[("reason", reason)], audited);
    }
    let by_action_and_address: BTreeMap<(String, String), usize> =
        records.iter().fold(BTreeMap::new(), |mut counts, record| {
            let key = (
                record["action"].as_str().unwrap_or_default().to_string(),
                record["address"].as_str().unwrap_or_default().to_string(),
            );
            *counts.entry(key).or_default() += 1;
            counts
        });
    let expected: BTreeMap<(String, String), usize> = [
        ("ban", "198.51.100.10", 1),
        ("ban", "203.0.113.10", 1),
        ("ban", V6_PREFIX, 1),
        ("skip", "192.0.2.10", 2),
    ]
    .into_iter()
    .map(|(action, address, count)| ((action.to_string(), address.to_string()), count))
    .collect();
    assert_eq!(by_action_and_address, expected);

    // Every failure went into exactly one ban or skipped ban.
    let audited_failures: u64 = records
        .iter()
        .map(|record| record["failures"].as_u64().expect("failures"))
        .sum();
    assert_eq!(audited_failures, attempts);
    for ban in records_of(&records, "ban", "ssh_failures") {
        assert_ban_length(ban, Duration::from_secs(3600));
    }

    let mut audited_bans: Vec<String> = records_of(&records, "ban", "ssh_failures")
        .iter()
        .map(|record| record["address"].as_str().unwrap_or_default().to_string())
        .collect();
    let mut banned_in_kernel = lab.banned_nets();
    audited_bans.sort();
    banned_in_kernel.sort();
    assert_eq!(banned_in_kernel, audited_bans);
    assert_eq!(
        daemon
            .scrape()
            .count("sentinel_ban_latency_seconds_count", &[]),
        3,
        "one latency sample per committed ban"
    );
    assert_eq!(daemon.log_records(&[("message", "ban")]).len(), 3);
    assert_eq!(daemon.log_records(&[("message", "ban skipped")]).len(), 2);
    // Every SSH family now has series: the exposition must still be clean.
    assert_promtool_clean(&daemon.scrape());
}

#[test]
fn operator_unban_lifts_a_ban_at_once() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    lab.fail_logins(&[(&lab.first, MAX_FAILURES), (&lab.v6, MAX_FAILURES)]);
    lab.await_ban(&lab.first.offender());
    lab.await_ban(V6_PREFIX);
    lab.first.assert_blocked();
    lab.v6.assert_blocked();

    let unban = |address: &str| daemon.control(&["unban", address]).trim().to_string();
    assert_eq!(unban("198.51.100.10"), "unbanned 198.51.100.10");
    // Any address of the banned /64 names the ban.
    assert_eq!(
        unban(&V6_NEIGHBOUR.to_string()),
        format!("unbanned {V6_PREFIX}")
    );

    lab.first.assert_connects();
    lab.v6.assert_connects();
    lab.assert_no_bans();
    assert_eq!(banned_in_family(&daemon, "ipv4"), 0);
    assert_eq!(banned_in_family(&daemon, "ipv6"), 0);
    let records = lab.audit_records();
    let unbans: Vec<&str> = records_of(&records, "unban", "operator")
        .iter()
        .map(|record| record["address"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(unbans, ["198.51.100.10", V6_PREFIX]);
}

#[test]
fn operator_bans_a_network_but_never_one_holding_an_allowed_address() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    let sentinel = |args: &[&str]| {
        let output = Command::new(sentinel_bin())
            .args(args)
            .arg("--socket")
            .arg(daemon.control_socket())
            .output()
            .expect("run sentinel");
        (
            output.status.code(),
            String::from_utf8_lossy(&output.stdout).into_owned(),
            String::from_utf8_lossy(&output.stderr).into_owned(),
        )
    };
    assert_eq!(
        sentinel(&["ban", "203.0.113.0/24", "--for", "1h"]),
        (
            Some(0),
            "banned 203.0.113.0/24 for 1h\n".into(),
            String::new()
        )
    );
    lab.await_ban("203.0.113.0/24");
    lab.second.assert_blocked();
    lab.first.assert_connects();

    // The allow list (192.0.2.0/24) inside the network, or the network inside it: refused.
    for network in ["192.0.0.0/16", "192.0.2.128/25", "192.0.2.10"] {
        let (code, stdout, stderr) = sentinel(&["ban", network, "--for", "1h"]);
        assert_eq!((code, stdout.as_str()), (Some(1), ""), "{network}");
        assert_eq!(
            stderr,
            format!(
                "sentinel: error: refused: {network} holds an allow-listed address (ssh_guard.allow, \
                 loopback), which is never banned\n"
            )
        );
    }
    assert_eq!(lab.banned_nets(), ["203.0.113.0/24"]);
    lab.trusted.assert_connects();

    let (code, stdout, _) = sentinel(&["bans", "--output", "json"]);
    assert_eq!(code, Some(0));
    let bans: serde_json::Value = serde_json::from_str(&stdout).expect("bans as JSON");
    assert_eq!(bans.as_array().map(Vec::len), Some(1), "{bans}");
    assert_eq!(bans[0]["address"], "203.0.113.0/24");
    assert_eq!(bans[0]["reason"], "operator");
    let (code, stdout, _) = sentinel(&["status", "--output", "json"]);
    let status: serde_json::Value = serde_json::from_str(&stdout).expect("status as JSON");
    assert_eq!(
        status["ssh_guard"],
        serde_json::json!({"state": "running", "mode": "enforce", "tracked_addresses": 0,
                           "bans_in_force": 1})
    );
    assert_eq!(code, Some(0), "{stdout}");

    assert_eq!(
        sentinel(&["unban", "203.0.113.0/24"]),
        (Some(0), "unbanned 203.0.113.0/24\n".into(), String::new())
    );
    lab.second.assert_connects();
    lab.assert_no_bans();
}

/// A local user's program that names itself `sshd` and calls libpam with a `PAM_RHOST` of its
/// choice (the testkit's `pam` mode, copied as `sshd`), with a PAM service of its own.
struct Forger {
    program: PathBuf,
    confdir: PathBuf,
}

impl Forger {
    fn new(dir: &Path) -> Self {
        let home = dir.join("forger");
        let confdir = home.join("pam.d");
        fs::create_dir_all(&confdir).expect("create the forger's directory");
        fs::write(
            confdir.join("sentinel-forge"),
            "auth requisite pam_deny.so\nsession required pam_permit.so\n",
        )
        .expect("write the forger's PAM service");
        let program = home.join("sshd");
        fs::copy(testkit_bin(), &program).expect("copy the testkit as sshd");
        Self { program, confdir }
    }

    /// The forger as the unprivileged user nobody.
    fn command(&self, rhost: &str, failures: u32, session: bool) -> Command {
        use std::os::unix::process::CommandExt;
        let mut command = Command::new(&self.program);
        command
            .arg("pam")
            .arg(&self.confdir)
            .args([rhost, &failures.to_string()])
            .args(session.then_some("session"))
            .uid(65534)
            .gid(65534);
        command
    }
}

#[test]
fn a_local_user_cannot_forge_failures_or_sessions() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    let forger = Forger::new(lab.dir.path());

    // Eight failed authentications "from" an address that never attacked.
    let forged = forger
        .command(FORGED_VICTIM, 8, false)
        .output()
        .expect("run the forger");
    let printed = String::from_utf8_lossy(&forged.stdout);
    assert!(
        forged.status.success(),
        "{printed}{}",
        String::from_utf8_lossy(&forged.stderr)
    );
    // PAM_AUTH_ERR each time: libpam really ran the failing authentications.
    assert_eq!(
        printed
            .lines()
            .filter(|line| *line == "authenticate 7")
            .count(),
        8,
        "{printed}"
    );

    // A "session" from the real attacker's address, open while it attacks.
    let mut session = forger
        .command(&FIRST_ATTACKER.to_string(), 0, true)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run the forger");
    let mut opened = String::new();
    BufReader::new(session.stdout.take().expect("the forger's stdout"))
        .read_line(&mut opened)
        .expect("read the forger's session");
    assert_eq!(opened.trim(), "session 0");

    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    lab.await_ban(&lab.first.offender());
    lab.first.assert_blocked();
    // The ring buffer keeps order: forged events, had they counted, came before the real ones.
    assert_eq!(daemon.scrape().count(FAILURES, &[]), MAX_FAILURES);
    // Nor does a forger that ends without a session count as a pre-auth disconnect.
    assert_eq!(daemon.scrape().count(PREAUTH, &[]), 0);
    assert_none_skipped_for(&daemon, "active_session");
    assert_eq!(lab.banned_nets(), [lab.first.offender()]);
    drop(session.stdin.take());
    assert!(session.wait().expect("wait for the forger").success());
}

const RESTORED: &str = "sentinel_bans_restored_total";

#[test]
fn bans_removed_behind_the_guards_back_come_back_with_their_remaining_time() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    lab.fail_logins(&[(&lab.first, MAX_FAILURES), (&lab.second, MAX_FAILURES)]);
    let first = lab.await_ban(&lab.first.offender());
    lab.await_ban(&lab.second.offender());
    assert_eq!(daemon.scrape().count(RESTORED, &[]), 0);

    // What Debian's nftables.service does on every (re)start.
    lab.server.nft(&["flush", "ruleset"], "");
    daemon.await_count(RESTORED, &[], 2, WAIT);
    let restored = lab.await_ban(&lab.first.offender());
    lab.await_ban(&lab.second.offender());
    lab.first.assert_blocked();
    lab.second.assert_blocked();
    lab.trusted.assert_connects();
    // Put back with what was left of the hour, not a new hour.
    let (left, given) = (first.expires, restored.timeout);
    assert!(
        matches!((left, given), (Some(left), Some(given)) if given <= left && given < 3600),
        "banned with {left:?} s left, restored with a timeout of {given:?} s"
    );

    lab.server.nft(&["delete", "table", "inet", "sentinel"], "");
    daemon.await_count(RESTORED, &[], 4, WAIT);
    lab.await_ban(&lab.first.offender());
    lab.await_ban(&lab.second.offender());

    lab.server.nft(
        &["-f", "-"],
        "delete element inet sentinel banned_v4 { 198.51.100.10 }\n",
    );
    daemon.await_count(RESTORED, &[], 5, WAIT);
    lab.first.assert_blocked();
    assert_eq!(lab.banned_nets(), ["198.51.100.10", "203.0.113.10"]);
    // The guard's own view never changed: two bans in force throughout.
    assert_eq!(banned_in_family(&daemon, "ipv4"), 2);
}

/// The file behind the dynamic loader's `libpam.so.0`, as a package upgrade replaces it.
fn libpam_file() -> PathBuf {
    let listing = Command::new("ldconfig")
        .arg("-p")
        .output()
        .expect("ldconfig -p");
    let listing = String::from_utf8_lossy(&listing.stdout);
    let path = listing
        .lines()
        .filter(|line| line.trim_start().starts_with("libpam.so.0 ("))
        .find(|line| line.contains("x86-64") || !cfg!(target_arch = "x86_64"))
        .and_then(|line| line.split(" => ").nth(1))
        .expect("libpam.so.0 in the loader's cache");
    fs::canonicalize(path.trim()).expect("libpam's file")
}

#[test]
fn failures_still_count_after_libpam_is_replaced() {
    use std::os::unix::fs::MetadataExt;
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    let reattached = "sentinel_probe_reattachments_total";
    assert_eq!(daemon.scrape().count(reattached, &[]), 0);

    // As dpkg unpacks an upgrade: the new file written beside the old one, renamed over it.
    let libpam = libpam_file();
    let before = fs::metadata(&libpam).expect("libpam").ino();
    let staged = PathBuf::from(format!("{}.dpkg-new", libpam.display()));
    fs::copy(&libpam, &staged).expect("stage the new libpam");
    fs::rename(&staged, &libpam).expect("replace libpam");
    assert_ne!(fs::metadata(&libpam).expect("libpam").ino(), before);

    daemon.await_count(reattached, &[], 1, WAIT);
    let scrape = daemon.scrape();
    for program in [
        "ssh_pam_rhost",
        "ssh_pam_call",
        "ssh_auth_result",
        "ssh_session_open",
    ] {
        assert_eq!(
            scrape.value("sentinel_probe_attached", &[("program", program)]),
            1.0,
            "{program}"
        );
    }
    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    lab.await_ban(&lab.first.offender());
    assert_eq!(daemon.scrape().count(FAILURES, &[]), MAX_FAILURES);
}

/// The bans the daemon keeps on disk in `state_dir`.
fn saved_bans(state_dir: &Path) -> Vec<String> {
    let Ok(text) = fs::read_to_string(state_dir.join("ssh-guard.json")) else {
        return Vec::new();
    };
    let state: serde_json::Value = serde_json::from_str(&text).expect("the state is JSON");
    state["bans"]
        .as_array()
        .expect("a list of bans")
        .iter()
        .map(|ban| ban["net"].as_str().expect("a network").to_owned())
        .collect()
}

fn kill(mut daemon: Daemon) {
    daemon.signal(libc::SIGKILL);
    assert!(daemon.wait_exit(WAIT).is_some(), "SIGKILL did not end it");
}

#[test]
fn bans_and_escalation_survive_a_lost_table_and_a_restart() {
    let _serial = serial();
    let lab = SshLab::new();
    let state = TempDir::new("sentinel-state");
    let config = lab.config("1h");
    let first = lab.first.offender();

    let daemon = Daemon::start_with_state(&config, state.path());
    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    let banned = lab.await_ban(&first);
    assert!(eventually(WAIT, || saved_bans(state.path()) == [first.clone()]));
    kill(daemon);
    // As after a reboot: the kernel's table is gone, the state on disk stays.
    lab.server.nft(&["delete", "table", "inet", "sentinel"], "");
    lab.first.assert_connects();

    let daemon = Daemon::start_with_state(&config, state.path());
    let restored = lab.await_ban(&first);
    lab.first.assert_blocked();
    assert_eq!(daemon.scrape().count(RESTORED, &[]), 1);
    let (left, given) = (banned.expires, restored.timeout);
    assert!(
        matches!((left, given), (Some(left), Some(given)) if given <= left && given < 3600),
        "banned with {left:?} s left, restored with a timeout of {given:?} s"
    );
    let listed = daemon.control(&["bans"]);
    assert!(
        listed
            .lines()
            .any(|line| line.contains(&first) && line.contains("ssh_failures")),
        "{listed}"
    );

    // Escalation is remembered too: lifted by the operator, the next ban is the second.
    daemon.control(&["unban", &first]);
    assert!(eventually(WAIT, || saved_bans(state.path()).is_empty()));
    kill(daemon);
    let daemon = Daemon::start_with_state(&config, state.path());
    lab.assert_no_bans();
    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    let second = lab.await_ban(&first);
    assert_eq!(second.timeout, Some(2 * 3600), "{second:?}");
    assert_eq!(bans_for(&daemon, "ssh_repeat_offender"), 1);
    assert_no_bans_for(&daemon, "ssh_failures");
}

#[test]
fn an_ipv6_attacker_next_to_an_allowlisted_admin_is_banned_alone() {
    let _serial = serial();
    let lab = SshLab::new();
    // The admin's address lies in the attacker's /64.
    let config = lab.config_allowing("1h", &format!("{ALLOWED}, {V6_NEIGHBOUR}/128"));
    let daemon = Daemon::start_with_config(&config, &[]);
    lab.fail_logins(&[(&lab.v6, MAX_FAILURES)]);
    lab.await_ban(&V6_ATTACKER.to_string());
    lab.v6.assert_blocked();
    lab.v6.assert_connects_from(V6_NEIGHBOUR);
    assert_eq!(lab.banned_nets(), [V6_ATTACKER.to_string()]);
    assert_eq!(bans_for(&daemon, "ssh_failures"), 1);
}

#[test]
fn a_guard_that_cannot_write_its_audit_log_stops_the_daemon_from_starting() {
    let _serial = serial();
    let server = Netns::new("ssh-noaudit");
    let audit_log = "/proc/sentinel-nowhere/audit.log";
    let config = format!(
        "ssh_guard:\n  enabled: true\n  audit_log: {audit_log}\n  netns: {}\n",
        server.path().display()
    );
    // `sentinel check` (the unit's ExecStartPre) says so before any start is tried.
    let dir = TempDir::new("ssh-noaudit");
    let file = dir.path().join("sentinel.yaml");
    fs::write(&file, &config).expect("write the configuration");
    let checked = Command::new(sentinel_bin())
        .arg("check")
        .arg(&file)
        .output()
        .expect("run sentinel check");
    assert_eq!(checked.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&checked.stderr),
        format!(
            "{}: ssh_guard.audit_log: cannot write the audit log {audit_log}: Operation not \
             supported (os error 95); the daemon would refuse to start\n",
            file.display()
        )
    );
    let mut daemon = Daemon::spawn_with_config(free_port(), &config, &[]);
    let (status, _) = daemon
        .wait_exit(4 * WAIT)
        .expect("sentinel ran on without its SSH guard");
    assert_eq!(status.code(), Some(1), "{}", daemon.log());
    let reason = format!("the SSH guard could not start: cannot write the audit log {audit_log}");
    assert!(daemon.log().contains(&reason), "{}", daemon.log());
    assert_eq!(server.nft(&["list", "tables"], ""), "");
}

#[test]
fn observe_mode_counts_and_audits_but_never_bans() {
    let _serial = serial();
    let lab = SshLab::new();
    let config = lab.config("1h").replace("mode: enforce", "mode: observe");
    let daemon = Daemon::start_with_config(&config, &[]);

    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    daemon.await_count(FAILURES, &[], MAX_FAILURES, WAIT);
    // Counted as a ban the threshold called for but that was not made; none in force.
    daemon.await_count(
        "sentinel_bans_skipped_total",
        &[("reason", "observe_mode")],
        1,
        WAIT,
    );
    let scrape = daemon.scrape();
    scrape.assert_absent(BANS, &[("reason", "ssh_failures")]);
    for family in ["ipv4", "ipv6"] {
        assert_eq!(
            scrape.count("sentinel_banned_addresses", &[("family", family)]),
            0
        );
    }

    // Audited as what enforce mode would have done...
    let records = lab.audit_records();
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "would_ban");
    assert_eq!(records[0]["address"], FIRST_ATTACKER.to_string());
    assert_eq!(records[0]["failures"], MAX_FAILURES);
    // ...and nothing done: no table in the namespace, the attacker still connects.
    assert_eq!(lab.server.nft(&["list", "tables"], ""), "");
    lab.first.assert_connects();
    assert_eq!(
        daemon
            .scrape()
            .count("sentinel_ban_latency_seconds_count", &[]),
        0
    );
    let refused = daemon.control_output(&["ban", "203.0.113.10", "--for", "1h"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("the SSH guard is in observe mode: the firewall is not touched"),
        "{stderr}"
    );
    assert_eq!(lab.server.nft(&["list", "tables"], ""), "");
}

#[test]
fn the_operator_bans_lists_and_unbans_through_the_daemon() {
    let _serial = serial();
    let lab = SshLab::new();
    let daemon = lab.start_daemon("1h");
    assert_eq!(daemon.control(&["bans"]).trim(), "no bans in force");

    assert_eq!(
        daemon
            .control(&["ban", "203.0.113.10", "--for", "2h"])
            .trim(),
        "banned 203.0.113.10 for 2h"
    );
    let ban = lab.await_ban("203.0.113.10");
    assert_eq!(ban.timeout, Some(2 * 3600), "{ban:?}");
    lab.second.assert_blocked();
    lab.first.assert_connects();
    assert_eq!(bans_for(&daemon, "operator"), 1);
    assert_eq!(banned_in_family(&daemon, "ipv4"), 1);

    let listed = daemon.control(&["bans"]);
    let lines: Vec<Vec<&str>> = listed
        .lines()
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(lines.len(), 2, "{listed}");
    assert_eq!(lines[0], ["ADDRESS", "REASON", "FAILURES", "EXPIRES"]);
    // "in 1h 59m" or, a second later, still under two hours.
    assert_eq!(
        lines[1][..4],
        ["203.0.113.10", "operator", "0", "in"],
        "{listed}"
    );
    assert!(
        ["1h 59m", "2h"].contains(&lines[1][4..].join(" ").as_str()),
        "{listed}"
    );

    let records = lab.audit_records();
    let operator_bans = records_of(&records, "ban", "operator");
    assert_eq!(operator_bans.len(), 1, "{records:?}");
    assert_ban_length(operator_bans[0], Duration::from_secs(2 * 3600));

    assert_eq!(
        daemon.control(&["unban", "203.0.113.10"]).trim(),
        "unbanned 203.0.113.10"
    );
    lab.second.assert_connects();
    assert_eq!(daemon.control(&["bans"]).trim(), "no bans in force");
}

#[test]
fn flush_on_exit_lifts_every_ban_when_the_daemon_stops() {
    let _serial = serial();
    let lab = SshLab::new();
    let state = TempDir::new("sentinel-flush-state");
    let config = lab
        .config("1h")
        .replace("flush_on_exit: false", "flush_on_exit: true");
    let mut daemon = Daemon::start_with_state(&config, state.path());
    lab.fail_logins(&[(&lab.first, MAX_FAILURES)]);
    lab.await_ban(&lab.first.offender());
    assert!(eventually(WAIT, || saved_bans(state.path()) == [lab.first.offender()]));

    daemon.signal(libc::SIGTERM);
    let (status, _) = daemon.wait_exit(WAIT).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", daemon.log());
    // The table went with the daemon, on disk too: a restart brings nothing back.
    assert!(!lab.server.nft(&["list", "tables"], "").contains("sentinel"));
    lab.first.assert_connects();
    assert_eq!(saved_bans(state.path()), Vec::<String>::new());

    let daemon = Daemon::start_with_state(&config, state.path());
    lab.assert_no_bans();
    assert_eq!(daemon.scrape().count(RESTORED, &[]), 0);
    lab.first.assert_connects();
}

#[test]
fn a_full_tracking_table_forgets_the_oldest_address_and_counts_it() {
    let _serial = serial();
    let lab = SshLab::new();
    let config = lab
        .config("1h")
        .replace("ipv6_prefix: 64\n", "ipv6_prefix: 64\n  max_tracked: 1\n");
    let daemon = Daemon::start_with_config(&config, &[]);
    let tracked = "sentinel_ssh_tracked_addresses";
    let evictions = "sentinel_ssh_tracking_evictions_total";
    assert_eq!(daemon.scrape().count(evictions, &[]), 0);

    // Room for one address: the second pushes the first out.
    lab.fail_logins(&[(&lab.first, 2)]);
    daemon.await_count(FAILURES, &[], 2, WAIT);
    daemon.await_count(tracked, &[], 1, WAIT);
    lab.fail_logins(&[(&lab.second, 1)]);
    daemon.await_count(evictions, &[], 1, WAIT);
    assert_eq!(daemon.scrape().count(tracked, &[]), 1);

    // The first starts over: three more make three, not five, and push the second out.
    lab.fail_logins(&[(&lab.first, MAX_FAILURES - 2)]);
    daemon.await_count(FAILURES, &[], 2 + 1 + MAX_FAILURES - 2, WAIT);
    daemon.await_count(evictions, &[], 2, WAIT);
    assert_eq!(daemon.scrape().count(tracked, &[]), 1);
    lab.assert_no_bans();
    assert_no_bans_for(&daemon, "ssh_failures");
    lab.first.assert_connects();
}
