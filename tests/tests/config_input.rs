//! The configuration file as the real binary reads it: `sentinel check` refuses what would
//! hang it, exhaust it or break the daemon later, each problem at its `file:line:column`, and
//! a running daemon refuses an empty or cut-short file on reload and names the settings that
//! only a restart applies.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::{Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use sentinel_tests::{
    Daemon, NO_FIREWALL, TempDir, TestCgroup, eventually, netlab::Netns, sentinel_bin, serial,
};

/// Far longer than any check takes: a `sentinel check` still running then is hung.
const HANG_GUARD: Duration = Duration::from_secs(30);
const SETTLE: Duration = Duration::from_secs(10);

/// What `sentinel check` did with one file.
struct Checked {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `sentinel check path`; a run that outlives [`HANG_GUARD`] is killed and fails the test.
fn check(path: &Path) -> Checked {
    let out = TempDir::new("sentinel-check-out");
    let stdout = out.path().join("stdout");
    let stderr = out.path().join("stderr");
    let mut child = Command::new(sentinel_bin())
        .arg("check")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(File::create(&stdout).expect("create stdout file"))
        .stderr(File::create(&stderr).expect("create stderr file"))
        .spawn()
        .expect("spawn sentinel check");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for sentinel check") {
            break status;
        }
        if started.elapsed() > HANG_GUARD {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "sentinel check {} hung: still running after {HANG_GUARD:?}",
                path.display()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Checked {
        status,
        stdout: fs::read_to_string(stdout).expect("read stdout"),
        stderr: fs::read_to_string(stderr).expect("read stderr"),
    }
}

/// Asserts that `sentinel check` refuses `path` and prints exactly `problems`, each prefixed
/// with the path.
fn assert_refused(path: &Path, problems: &[&str]) {
    let checked = check(path);
    let expected: String = problems
        .iter()
        .map(|problem| format!("{}:{problem}\n", path.display()))
        .collect();
    assert!(
        !checked.status.success(),
        "accepted {}: {}",
        path.display(),
        checked.stdout
    );
    assert_eq!(checked.status.code(), Some(78));
    assert_eq!(checked.stderr, expected);
}

/// A file holding `contents` in `dir`.
fn write(dir: &TempDir, name: &str, contents: impl AsRef<[u8]>) -> PathBuf {
    let path = dir.path().join(name);
    fs::write(&path, contents).expect("write the configuration");
    path
}

#[test]
fn a_fifo_is_refused_at_once() {
    let dir = TempDir::new("sentinel-config-fifo");
    let fifo = dir.path().join("sentinel.yaml");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    assert_refused(
        &fifo,
        &[
            "1:1: not a regular file but a FIFO (named pipe); the configuration must be a regular \
           file",
        ],
    );
}

#[test]
fn character_devices_are_refused() {
    for device in ["/dev/zero", "/dev/null", "/dev/urandom"] {
        assert_refused(
            Path::new(device),
            &[
                "1:1: not a regular file but a character device; the configuration must be a \
               regular file",
            ],
        );
    }
}

#[test]
fn a_file_over_one_mebibyte_is_refused_with_its_size() {
    let dir = TempDir::new("sentinel-config-large");
    // Valid YAML through and through: only the size can refuse it.
    let large = write(&dir, "large.yaml", "#".repeat(2 << 20));
    assert_refused(
        &large,
        &["1:1: the file is 2097152 bytes; the limit is 1 MiB (1048576 bytes)"],
    );
}

#[test]
fn a_one_mebibyte_key_is_refused_at_its_position() {
    let dir = TempDir::new("sentinel-config-key");
    let mut text = "k".repeat((1 << 20) - 16);
    text.push_str(": 1\n");
    let key = write(&dir, "key.yaml", text);
    assert_refused(
        &key,
        &[
            "1:1048561: mapping values are not allowed in this context; a key may be at most 1024 \
           characters long",
        ],
    );
}

#[test]
fn an_alias_bomb_is_refused_at_its_position() {
    let dir = TempDir::new("sentinel-config-bomb");
    let mut bomb =
        String::from("policies:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (previous, next) in ('a'..'i').zip('b'..'j') {
        let aliases = vec![format!("*{previous}"); 9].join(", ");
        bomb.push_str(&format!("  - &{next} [{aliases}]\n"));
    }
    let bomb = write(&dir, "bomb.yaml", bomb);
    assert_refused(
        &bomb,
        &["6:9: YAML document too large or too complex: total_replayed_events=10001 > 10000"],
    );
}

#[test]
fn each_value_that_would_break_the_daemon_is_refused_where_it_is_written() {
    let dir = TempDir::new("sentinel-config-values");
    let cases = [
        (
            "ssh_guard:\n  window: 0s\n",
            "2:11: window: must be longer than 0s, found \"0s\"",
        ),
        (
            "ssh_guard:\n  ban_for: 0\n",
            "2:12: ban_for: must be longer than 0s, found 0",
        ),
        (
            "ssh_guard:\n  ban_for: 36501d\n",
            "2:12: ban_for: must be at most 36500d (100 years), the longest ban the firewall \
             sets, found \"36501d\"",
        ),
        (
            "ssh_guard:\n  max_ban: 5300w\n",
            "2:12: max_ban: must be at most 36500d (100 years), the longest ban the firewall \
             sets, found \"5300w\"",
        ),
        (
            "ssh_guard:\n  ban_for: 1d\n  max_ban: 1h\n",
            "3:12: max_ban (1h) must not be shorter than ban_for (1d)",
        ),
        (
            "ssh_guard:\n  max_failures: 0\n",
            "2:17: max_failures: must be at least 1, found 0",
        ),
        (
            "ssh_guard:\n  multiplier: 0.5\n",
            "2:15: multiplier: must be at least 1 (1 keeps every ban as long as the first), \
             found 0.5",
        ),
        (
            "ssh_guard:\n  ipv6_prefix: 129\n",
            "2:16: ipv6_prefix: must be between 1 and 128, found 129",
        ),
        (
            "ssh_guard:\n  ipv6_prefix: 0\n",
            "2:16: ipv6_prefix: must be between 1 and 128, found 0",
        ),
        (
            "ssh_guard:\n  max_tracked: 0\n",
            "2:16: max_tracked: must be at least 1, found 0",
        ),
        (
            "ssh_guard:\n  max_banned: 0\n",
            "2:15: max_banned: must be at least 1, found 0",
        ),
        (
            "port_scan:\n  ports: 1\n",
            "2:10: ports: must be at least 2, found 1",
        ),
        (
            "port_scan:\n  ports: 65536\n",
            "2:10: ports: must be at most 1000, found 65536",
        ),
        (
            "port_scan:\n  window: 0s\n",
            "2:11: window: must be at least 1s, found \"0s\"",
        ),
        (
            "port_scan:\n  window: 1d\n",
            "2:11: window: must be at most 1h, found \"1d\"",
        ),
        (
            "port_scan:\n  windw: 10s\n",
            "2:3: unknown port_scan setting \"windw\"; did you mean \"window\"?",
        ),
        (
            "ssh_guard:\n  enabled: false\nport_scan:\n  mode: observe\n",
            "3:1: port_scan needs the SSH guard (ssh_guard.enabled: true): it owns the firewall, \
             the allow list and the ban settings port-scan bans use",
        ),
        (
            "metrics:\n  listen: 127.0.0.1\n",
            "2:11: listen: expected an address and port such as 127.0.0.1:9848 or [::1]:9848, \
             found \"127.0.0.1\"",
        ),
        (
            "services:\n  max_labels: 0\n",
            "2:15: max_labels: must be at least 1, found 0",
        ),
        (
            "policies:\n  - name: web\n    unit: web.service\n    memory.max: 512\n",
            "4:17: memory.max: must be at least 1M; a number without a suffix is bytes, found 512",
        ),
        (
            "policies:\n  - name: web\n    unit: web.service\n    pids.max: 0\n",
            "4:15: pids.max: must be between 1 and 4194304, the kernel's limit, found 0",
        ),
    ];
    for (index, (yaml, problem)) in cases.into_iter().enumerate() {
        let file = write(&dir, &format!("case-{index}.yaml"), yaml);
        assert_refused(&file, &[problem]);
    }
}

#[test]
fn one_run_lists_every_problem_of_every_section() {
    let dir = TempDir::new("sentinel-config-all");
    let file = write(
        &dir,
        "broken.yaml",
        "metrics:
  listen: localhost:http
services:
  max_labels: 0
polices: []
policies:
  - name: web
    unit: web.service
    memroy.max: 1G
    pids.max: 0
ssh_guard:
  max_failures: 0
  window: 0s
  ban_for: 0
  multiplier: 0.5
  ipv6_prefix: 129
  max_tracked: 0
  max_banned: 0
  flush_on_exit: sometimes
",
    );
    assert_refused(
        &file,
        &[
            "2:11: listen: expected an address and port such as 127.0.0.1:9848 or [::1]:9848, \
             found \"localhost:http\"",
            "4:15: max_labels: must be at least 1, found 0",
            "5:1: unknown top-level key \"polices\"; did you mean \"policies\"?",
            "9:5: unknown policy key \"memroy.max\"; did you mean \"memory.max\"?",
            "10:15: pids.max: must be between 1 and 4194304, the kernel's limit, found 0",
            "12:17: max_failures: must be at least 1, found 0",
            "13:11: window: must be longer than 0s, found \"0s\"",
            "14:12: ban_for: must be longer than 0s, found 0",
            "15:15: multiplier: must be at least 1 (1 keeps every ban as long as the first), \
             found 0.5",
            "16:16: ipv6_prefix: must be between 1 and 128, found 129",
            "17:16: max_tracked: must be at least 1, found 0",
            "18:15: max_banned: must be at least 1, found 0",
            "19:18: flush_on_exit: expected true or false, found \"sometimes\"",
        ],
    );
}

#[test]
fn the_shipped_sample_passes() {
    let sample = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/sentinel.yaml");
    let checked = check(&sample);
    assert!(checked.status.success(), "{}", checked.stderr);
    assert_eq!(
        checked.stdout,
        format!("{}: valid (3 policies, SSH guard on)\n", sample.display())
    );
}

/// A daemon off the firewall whose one policy observes `cgroup` (on build hosts, cgroup2 has
/// no controllers to enforce with, and observe mode still applies the policy).
fn config_observing(cgroup: &TestCgroup, policy: &str, ssh_guard_extra: &str) -> String {
    format!(
        "{NO_FIREWALL}{ssh_guard_extra}policies:\n  - name: {policy}\n    cgroup: {}\n    mode: \
         observe\n    memory.max: 64M\n",
        cgroup.service()
    )
}

/// `sentinel_policy_applied` of `policy` on `cgroup`; `None` while it is not exported.
fn applied(daemon: &Daemon, cgroup: &TestCgroup, policy: &str) -> Option<f64> {
    daemon.scrape().find(
        "sentinel_policy_applied",
        &[("service", cgroup.service()), ("policy", policy)],
    )
}

#[test]
fn an_empty_or_cut_short_file_is_refused_on_reload_and_the_policy_stays() {
    let _serial = serial();
    let cgroup = TestCgroup::new("cfg-empty");
    let config = config_observing(&cgroup, "web", "");
    let daemon = Daemon::start_with_config(&config, &[]);
    assert!(
        eventually(SETTLE, || applied(&daemon, &cgroup, "web") == Some(1.0)),
        "the policy was not applied; log:\n{}",
        daemon.log()
    );
    let counters = || {
        let scrape = daemon.scrape();
        (
            scrape.value("sentinel_policy_reload_errors_total", &[]),
            scrape.value("sentinel_policy_reloads_total", &[]),
        )
    };
    let (errors, reloads) = counters();
    let rejections = || daemon.rejected_reloads();
    let path = daemon.config_path();
    let empty_reason = format!(
        "{}:1:1: the file holds no settings (it is empty or only comments, as while an editor \
         is still writing it); a reload would lift every policy, so it is refused and the \
         running configuration stays; to remove every policy, write `policies: []`",
        path.display()
    );

    // Truncated to 0 bytes, as an editor does before writing: the file watcher sees it.
    File::create(&path).expect("truncate the configuration");
    assert!(
        eventually(SETTLE, || rejections().len() == 1),
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(counters(), (errors + 1.0, reloads));
    assert!(
        rejections()[0]["message"]
            .as_str()
            .is_some_and(|message| message.ends_with(&empty_reason)),
        "{:?}",
        rejections()[0]
    );
    assert_eq!(applied(&daemon, &cgroup, "web"), Some(1.0));

    // SIGHUP reads the same empty file, and refuses it again.
    daemon.signal(libc::SIGHUP);
    assert!(
        eventually(SETTLE, || rejections().len() == 2),
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(counters(), (errors + 2.0, reloads));

    // Cut in the middle of a value: `64M` became `6`.
    let cut = &config[..config.len() - "4M\n".len()];
    fs::write(&path, cut).expect("write the cut configuration");
    assert!(
        eventually(SETTLE, || rejections().len() == 3),
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(counters(), (errors + 3.0, reloads));
    let cut_reason = format!(
        "{}:7:17: memory.max: must be at least 1M; a number without a suffix is bytes, found 6",
        path.display()
    );
    assert!(
        rejections()[2]["message"]
            .as_str()
            .is_some_and(|message| message.ends_with(&cut_reason)),
        "{:?}",
        rejections()[2]
    );
    assert_eq!(applied(&daemon, &cgroup, "web"), Some(1.0));
    assert!(
        daemon
            .log_records(&[("message", "policy reloaded")])
            .is_empty(),
        "a refused file reached the enforcer; log:\n{}",
        daemon.log()
    );
}

#[test]
fn a_changed_start_only_setting_is_named_as_needing_a_restart() {
    let _serial = serial();
    let cgroup = TestCgroup::new("cfg-restart");
    let daemon = Daemon::start_with_config(&config_observing(&cgroup, "web", ""), &[]);
    assert!(
        eventually(SETTLE, || applied(&daemon, &cgroup, "web") == Some(1.0)),
        "the policy was not applied; log:\n{}",
        daemon.log()
    );
    let restart_required = |setting: &str| {
        daemon
            .scrape()
            .value("sentinel_config_restart_required", &[("setting", setting)])
    };
    assert_eq!(restart_required("ssh_guard.mode"), 0.0);
    let reloads = daemon.scrape().value("sentinel_policy_reloads_total", &[]);

    // A new policy name (applied at once) and a new guard mode (read only at start).
    fs::write(
        daemon.config_path(),
        config_observing(&cgroup, "api", "  mode: observe\n"),
    )
    .expect("rewrite the configuration");
    assert!(
        eventually(SETTLE, || restart_required("ssh_guard.mode") == 1.0),
        "log:\n{}",
        daemon.log()
    );
    assert!(
        eventually(SETTLE, || applied(&daemon, &cgroup, "api") == Some(1.0)),
        "the reloaded policy was not applied; log:\n{}",
        daemon.log()
    );
    daemon.scrape().assert_absent(
        "sentinel_policy_applied",
        &[("service", cgroup.service()), ("policy", "web")],
    );
    assert_eq!(restart_required("ssh_guard.enabled"), 0.0);
    assert_eq!(restart_required("metrics.listen"), 0.0);
    assert_eq!(
        daemon.scrape().value("sentinel_policy_reloads_total", &[]),
        reloads + 1.0
    );
    let partial = daemon.log_records(&[
        (
            "message",
            "configuration reloaded, except the changed settings that apply only after a \
             restart",
        ),
        ("restart_required", "ssh_guard.mode"),
    ]);
    assert_eq!(partial.len(), 1, "log:\n{}", daemon.log());
    assert!(
        daemon
            .log_records(&[("message", "configuration reloaded")])
            .is_empty(),
        "a partial reload was logged as complete; log:\n{}",
        daemon.log()
    );

    // Back to what the daemon runs with: nothing waits for a restart any more.
    fs::write(daemon.config_path(), config_observing(&cgroup, "web", ""))
        .expect("restore the configuration");
    assert!(
        eventually(SETTLE, || restart_required("ssh_guard.mode") == 0.0),
        "log:\n{}",
        daemon.log()
    );
    assert!(
        eventually(SETTLE, || !daemon
            .log_records(&[("message", "configuration reloaded")])
            .is_empty()),
        "log:\n{}",
        daemon.log()
    );
}

#[test]
fn a_reloaded_allow_list_lifts_the_bans_it_covers_and_keeps_the_others() {
    let _serial = serial();
    let netns = Netns::new("cfg-allow");
    let dir = TempDir::new("cfg-allow");
    let audit_log = dir.path().join("audit.log");
    let config = |allow: &str| {
        format!(
            "ssh_guard:\n  enabled: true\n  mode: enforce\n  audit_log: {}\n  netns: {}\n{allow}",
            audit_log.display(),
            netns.path().display()
        )
    };
    let daemon = Daemon::start_with_config(&config(""), &[]);
    for address in ["192.0.2.7", "198.51.100.9"] {
        daemon.control(&["ban", address, "--for", "1h"]);
    }
    let banned = || -> Vec<String> {
        let mut nets: Vec<String> = netns
            .sentinel_set("banned_v4")
            .into_iter()
            .map(|element| element.net)
            .collect();
        nets.sort();
        nets
    };
    assert_eq!(banned(), ["192.0.2.7", "198.51.100.9"]);

    fs::write(
        daemon.config_path(),
        config("  allow: [192.0.2.0/24]\n  max_failures: 3\n"),
    )
    .expect("rewrite the configuration");
    assert!(
        eventually(SETTLE, || banned() == ["198.51.100.9"]),
        "set now {:?}; log:\n{}",
        banned(),
        daemon.log()
    );
    let listed = daemon.control(&["bans"]);
    assert!(
        listed.contains("198.51.100.9") && !listed.contains("192.0.2.7"),
        "{listed}"
    );
    let unbans: Vec<serde_json::Value> = fs::read_to_string(&audit_log)
        .expect("read the audit log")
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit record is one JSON object"))
        .filter(|record: &serde_json::Value| record["action"] == "unban")
        .collect();
    assert_eq!(unbans.len(), 1, "{unbans:?}");
    assert_eq!(unbans[0]["address"], "192.0.2.7");
    assert_eq!(unbans[0]["reason"], "allowlisted");
    // Everything in the new file took effect: no setting waits for a restart.
    assert_eq!(
        daemon
            .log_records(&[("message", "configuration reloaded")])
            .len(),
        1,
        "log:\n{}",
        daemon.log()
    );
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.value(
            "sentinel_config_restart_required",
            &[("setting", "ssh_guard.mode")]
        ),
        0.0
    );
    // The allow list is applied on reload, never reported as waiting for a restart.
    scrape.assert_absent(
        "sentinel_config_restart_required",
        &[("setting", "ssh_guard.allow")],
    );
}

#[test]
fn a_bad_port_scan_setting_is_refused_on_reload_where_it_is_written() {
    let _serial = serial();
    let netns = Netns::new("cfg-scan");
    let dir = TempDir::new("cfg-scan");
    let config = |port_scan: &str| {
        format!(
            "ssh_guard:\n  enabled: true\n  audit_log: {}\n  netns: {}\nport_scan:\n{port_scan}",
            dir.path().join("audit.log").display(),
            netns.path().display()
        )
    };
    let daemon = Daemon::start_with_config(&config("  ports: 20\n  window: 10s\n"), &[]);
    let path = daemon.config_path();
    let rejections = || {
        daemon
            .rejected_reloads()
            .iter()
            .filter_map(|record| record["message"].as_str().map(str::to_owned))
            .collect::<Vec<_>>()
    };
    let errors = || {
        daemon
            .scrape()
            .value("sentinel_policy_reload_errors_total", &[])
    };
    let before = errors();
    let cases = [
        (
            "  ports: 0\n  window: 10s\n",
            "6:10: ports: must be at least 2, found 0",
        ),
        (
            "  ports: 20\n  window: forever\n",
            "7:11: window: expected a duration from 1s to 1h, such as 10s, found \"forever\"",
        ),
        (
            "  ports: 20\n  window: 10s\n  limit: 5\n",
            "8:3: unknown port_scan setting \"limit\"; expected one of mode, ports, window",
        ),
    ];
    for (index, (port_scan, problem)) in cases.into_iter().enumerate() {
        fs::write(&path, config(port_scan)).expect("write the configuration");
        assert!(
            eventually(SETTLE, || rejections().len() == index + 1),
            "log:\n{}",
            daemon.log()
        );
        let expected = format!("{}:{problem}", path.display());
        assert!(
            rejections()[index].ends_with(&expected),
            "{:?} does not end with {expected:?}",
            rejections()[index]
        );
        assert_eq!(errors(), before + index as f64 + 1.0);
    }
    assert!(
        daemon
            .log_records(&[("message", "configuration reloaded")])
            .is_empty(),
        "a refused file was applied; log:\n{}",
        daemon.log()
    );
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.value("sentinel_component_up", &[("component", "port scan")]),
        1.0
    );
    assert_eq!(
        scrape.value(
            "sentinel_config_restart_required",
            &[("setting", "port_scan")]
        ),
        0.0
    );
}
