//! Containment of a service against the real kernel: the exec program checks every exec of a
//! contained test cgroup against the policy's `exec.allow`, kills in the kernel, and the daemon
//! freezes (`cgroup.freeze`), isolates (nftables, in namespaces the test makes) and releases.
//! Needs root: `cargo test -p sentinel-tests --test containment`.

use std::{
    fs,
    os::unix::{fs::MetadataExt, process::ExitStatusExt},
    path::{Path, PathBuf},
    process::ExitStatus,
    time::Duration,
};

use sentinel_tests::{
    Daemon, TempDir, TestCgroup, audit_records, eventually, netlab::Netns, serial,
};

/// A hang guard for what the daemon does after a violation; never a timing.
const WAIT: Duration = Duration::from_secs(15);

const VIOLATIONS: &str = "sentinel_exec_violations_total";
const ACTIONS: &str = "sentinel_containment_actions_total";
const CONTAINED: &str = "sentinel_contained";

/// A contained test cgroup, its daemon, and a scratch directory holding an allowed executable.
struct Lab {
    cgroup: TestCgroup,
    dir: TempDir,
    daemon: Daemon,
}

impl Lab {
    fn allowed(&self) -> PathBuf {
        self.dir.path().join("allowed")
    }

    fn marker(&self) -> PathBuf {
        self.dir.path().join("marker")
    }

    /// `/bin/sh -c 'touch MARKER'` run inside the contained cgroup.
    fn run_shell(&self) -> ExitStatus {
        let script = format!("touch {}", self.marker().display());
        self.cgroup
            .command("/bin/sh")
            .args(["-c", &script])
            .status()
            .expect("run /bin/sh")
    }

    fn run_allowed(&self) -> ExitStatus {
        self.cgroup
            .command(self.allowed())
            .status()
            .expect("run the allowed executable")
    }

    fn service(&self) -> &str {
        self.cgroup.service()
    }

    fn count(&self, name: &str, action: Option<&str>) -> u64 {
        let mut labels = vec![("service", self.service())];
        labels.extend(action.map(|action| ("action", action)));
        self.daemon.scrape().count(name, &labels)
    }

    fn await_count(&self, name: &str, action: Option<&str>, expected: u64) {
        let mut labels = vec![("service", self.service())];
        labels.extend(action.map(|action| ("action", action)));
        self.daemon.await_count(name, &labels, expected, WAIT);
    }

    /// The audit log's `action` fields, in order.
    fn audited(&self) -> Vec<String> {
        audit_records(&self.dir.path().join("audit.log"))
            .iter()
            .map(|record| {
                assert_eq!(record["service"], self.service(), "{record}");
                record["action"].as_str().expect("an action").to_owned()
            })
            .collect()
    }

    /// The events `sentinel top --json` lists for this service, oldest first.
    fn recent_events(&self) -> Vec<serde_json::Value> {
        let top: serde_json::Value =
            serde_json::from_str(&self.daemon.control(&["top", "--json"])).expect("top's JSON");
        top["events"]
            .as_array()
            .expect("an events array")
            .iter()
            .filter(|event| event["subject"] == self.service())
            .cloned()
            .collect()
    }

    fn frozen(&self) -> Option<String> {
        let events = fs::read_to_string(self.cgroup.path().join("cgroup.events")).ok()?;
        events
            .lines()
            .find_map(|line| line.strip_prefix("frozen "))
            .map(str::to_owned)
    }
}

#[test]
fn a_shell_is_killed_before_its_first_command_and_allowed_binaries_run_also_after_an_upgrade() {
    let _serial = serial();
    let lab = start_with_allowed("kill", "kill", "enforce");

    assert!(lab.run_allowed().success(), "{}", lab.daemon.log());
    let shell = lab.run_shell();
    assert_eq!(shell.signal(), Some(libc::SIGKILL), "{shell:?}");
    assert!(!lab.marker().exists(), "the shell ran a command");
    lab.await_count(VIOLATIONS, None, 1);
    lab.await_count(ACTIONS, Some("kill"), 1);

    // A package upgrade: the new version written beside, renamed over the old (new inode).
    let staged = lab.dir.path().join("allowed.dpkg-new");
    fs::copy("/usr/bin/true", &staged).expect("stage the new version");
    let updates = lab
        .daemon
        .scrape()
        .count("sentinel_exec_allow_list_updates_total", &[]);
    let old_inode = fs::metadata(lab.allowed()).unwrap().ino();
    fs::rename(&staged, lab.allowed()).expect("replace the allowed executable");
    assert_ne!(fs::metadata(lab.allowed()).unwrap().ino(), old_inode);
    lab.daemon.await_count(
        "sentinel_exec_allow_list_updates_total",
        &[],
        updates + 1,
        WAIT,
    );
    assert!(lab.run_allowed().success(), "{}", lab.daemon.log());

    assert_eq!(lab.count(VIOLATIONS, None), 1);
    assert_eq!(lab.count(ACTIONS, Some("kill")), 1);
    let records = audit_records(&lab.dir.path().join("audit.log"));
    assert_eq!(records.len(), 1, "{records:?}");
    assert_eq!(records[0]["action"], "kill");
    assert_eq!(records[0]["executable"], "/bin/sh");
    assert_eq!(records[0]["policy"], "contained");
}

/// A lab whose policy allows its own copy of `true`, with `on_violation` and `mode`.
fn start_with_allowed(tag: &str, on_violation: &str, mode: &str) -> Lab {
    start_with(tag, on_violation, mode, &[], "")
}

/// As `start_with_allowed`, also allowing `more` executables, with `ssh_guard` lines.
fn start_with(tag: &str, on_violation: &str, mode: &str, more: &[&str], ssh_guard: &str) -> Lab {
    let cgroup = TestCgroup::new(tag);
    let dir = TempDir::new(&format!("sentinel-containment-{tag}"));
    let allowed = dir.path().join("allowed");
    fs::copy("/usr/bin/true", &allowed).expect("copy an executable");
    let mut allow = vec![allowed.display().to_string()];
    allow.extend(more.iter().map(|path| path.to_string()));
    let config = format!(
        "ssh_guard:\n  enabled: false\n  audit_log: {audit}\n{ssh_guard}\
         policies:\n  - name: contained\n    cgroup: {service}\n    mode: {mode}\n    \
         exec.allow: [{allow}]\n    on_violation: {on_violation}\n",
        audit = dir.path().join("audit.log").display(),
        service = cgroup.service(),
        allow = allow.join(", "),
    );
    let daemon = Daemon::start_with_config(&config, &[]);
    Lab {
        cgroup,
        dir,
        daemon,
    }
}

#[test]
fn freeze_leaves_the_service_frozen_until_it_is_released() {
    let _serial = serial();
    let lab = start_with_allowed("freeze", "freeze", "enforce");
    // One exec, not allowed; a shell would exec again once thawed, and be frozen again.
    let mut sleeper = lab
        .cgroup
        .command("/bin/sleep")
        .arg("600")
        .spawn()
        .expect("start sleep");
    lab.await_count(CONTAINED, Some("freeze"), 1);
    assert!(
        eventually(WAIT, || lab.frozen().as_deref() == Some("1")),
        "cgroup.events says frozen {:?}",
        lab.frozen()
    );
    let status = lab.daemon.control(&["status"]);
    assert!(
        status.contains(&format!("{:<40} FROZEN by policy contained", lab.service()))
            && status.contains("sentinel release SERVICE"),
        "{status}"
    );

    let unknown = lab.daemon.control_output(&["release", "no/such.service"]);
    assert_eq!(unknown.status.code(), Some(1));
    let refusal = String::from_utf8_lossy(&unknown.stderr);
    assert!(
        refusal.contains("\"no/such.service\" is not contained; contained: ")
            && refusal.contains(lab.service()),
        "{refusal}"
    );

    let released = lab.daemon.control(&["release", lab.service()]);
    assert_eq!(released.trim(), format!("thawed {}", lab.service()));
    assert_eq!(lab.frozen().as_deref(), Some("0"));
    assert_eq!(lab.count(CONTAINED, Some("freeze")), 0);
    assert_eq!(lab.count(VIOLATIONS, None), 1);
    assert_eq!(lab.count(ACTIONS, Some("freeze")), 1);
    assert_eq!(lab.count(ACTIONS, Some("release")), 1);
    assert_eq!(lab.audited(), ["freeze", "release"]);
    // The operator's events pane shows the policy applied at start, then the same two actions,
    // stamped as the audit log has them.
    let records = audit_records(&lab.dir.path().join("audit.log"));
    let mut events = Vec::new();
    let all = eventually(WAIT, || {
        events = lab.recent_events();
        events.len() == 3
    });
    assert!(all, "{events:#?}");
    assert_eq!(events[0]["kind"], "set_limits", "{events:#?}");
    assert_eq!(
        events[1..],
        [
            serde_json::json!({
                "time": records[0]["time"],
                "kind": "freeze",
                "subject": lab.service(),
                "detail": format!("/bin/sleep (pid {})", sleeper.id()),
            }),
            serde_json::json!({
                "time": records[1]["time"],
                "kind": "release",
                "subject": lab.service(),
                "detail": "",
            }),
        ]
    );
    let status = lab.daemon.control(&["status"]);
    assert!(
        status.contains("containment: no service is held"),
        "{status}"
    );
    sleeper.kill().expect("stop sleep");
    sleeper.wait().expect("reap sleep");
}

#[test]
fn isolate_cuts_the_service_off_the_network_while_another_service_connects() {
    let _serial = serial();
    let service_side = Netns::new("contained");
    let server_side = Netns::new("server");
    service_side.veth("ct0", &server_side, "ct1");
    service_side.ip("addr add 10.231.0.1/24 dev ct0");
    server_side.ip("addr add 10.231.0.2/24 dev ct1");
    let listener = server_side.run(|| std::net::TcpListener::bind("10.231.0.2:7000").unwrap());
    let lab = start_with(
        "isolate",
        "isolate",
        "enforce",
        &["/usr/bin/nsenter", "/usr/bin/python3"],
        &format!("  netns: {}\n", service_side.path().display()),
    );
    let other = TestCgroup::new("isolate-other");
    let connects = |cgroup: &TestCgroup| connect_from(cgroup, &service_side.path());

    assert!(connects(&lab.cgroup), "{}", lab.daemon.log());
    let before = lab.daemon.scrape();
    before.assert_absent(VIOLATIONS, &[("service", lab.service())]);
    // One exec, not allowed (the allowed `true` is the lab's own copy, another inode).
    let violation = lab
        .cgroup
        .command("/usr/bin/true")
        .status()
        .expect("run true");
    assert!(violation.success());
    lab.await_count(CONTAINED, Some("isolate"), 1);
    assert!(!connects(&lab.cgroup), "the isolated service connected");
    assert!(connects(&other), "another service could not connect");

    let released = lab.daemon.control(&["release", lab.service()]);
    assert_eq!(
        released.trim(),
        format!("lifted the isolation of {}", lab.service())
    );
    assert!(connects(&lab.cgroup), "the released service cannot connect");
    assert_eq!(lab.count(VIOLATIONS, None), 1);
    assert_eq!(lab.count(ACTIONS, Some("isolate")), 1);
    assert_eq!(lab.count(CONTAINED, Some("isolate")), 0);
    assert_eq!(lab.audited(), ["isolate", "release"]);
    let rules = service_side.nft(&["list", "table", "inet", "sentinel_containment"], "");
    assert!(!rules.contains("socket cgroupv2"), "{rules}");
    drop(listener);
}

#[test]
fn alert_and_observe_mode_change_nothing_and_count_exactly() {
    let _serial = serial();
    for (tag, on_violation, mode, action) in [
        ("alert", "alert", "enforce", "alert"),
        ("observe-kill", "kill", "observe", "would_kill"),
        ("observe-freeze", "freeze", "observe", "would_freeze"),
    ] {
        let lab = start_with_allowed(tag, on_violation, mode);
        // Each run execs two files: the shell, and `touch` (not a builtin of dash).
        for _ in 0..2 {
            assert!(lab.run_shell().success(), "{tag}: {}", lab.daemon.log());
        }
        assert!(lab.marker().exists(), "{tag}: the shell did not run");
        lab.await_count(VIOLATIONS, None, 4);
        lab.await_count(ACTIONS, Some(action), 4);
        assert_eq!(lab.frozen().as_deref(), Some("0"), "{tag}");
        assert_eq!(lab.audited(), [action; 4], "{tag}");
        let executables: Vec<String> = audit_records(&lab.dir.path().join("audit.log"))
            .iter()
            .map(|record| record["executable"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(
            executables,
            ["/bin/sh", "/usr/bin/touch", "/bin/sh", "/usr/bin/touch"],
            "{tag}"
        );
        lab.daemon
            .scrape()
            .assert_absent(CONTAINED, &[("service", lab.service())]);
    }
}

/// Whether a process in `cgroup` and the network namespace `netns` connects to the server
/// side, through the allowed `nsenter` and `python3`.
fn connect_from(cgroup: &TestCgroup, netns: &Path) -> bool {
    let script = "import socket\n\
                  socket.create_connection(('10.231.0.2', 7000), timeout=2).close()";
    cgroup
        .command("/usr/bin/nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(["/usr/bin/python3", "-c", script])
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run python3")
        .success()
}
