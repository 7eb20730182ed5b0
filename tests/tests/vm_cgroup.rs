//! cgroup v2 enforcement on a real kernel with the memory, cpu and pids controllers: run
//! inside the VM by `cargo xtask vm-test` (build hosts have hybrid cgroups without them).

use std::{
    fs,
    io::{BufRead, BufReader},
    os::unix::process::ExitStatusExt,
    process::Stdio,
    time::Duration,
};

use sentinel_tests::{
    Daemon, NO_FIREWALL, TempDir, TestCgroup, assert_promtool_clean, cgroup2_mount, eventually,
    serial, testkit_bin,
};
use serde_json::Value;

const MIB: u64 = 1024 * 1024;

/// Fails loudly, never skips, where the controllers are missing.
fn require_controllers() {
    let root = cgroup2_mount();
    let enabled = fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    for controller in ["memory", "cpu", "pids"] {
        assert!(
            enabled.split_whitespace().any(|c| c == controller),
            "this suite needs cgroup v2 with the {controller} controller enabled at {} \
             (found {enabled:?}); run it with `cargo xtask vm-test`",
            root.display()
        );
    }
}

/// A daemon whose configuration holds `policies` (YAML list items, indented by two).
/// Every resource series, read every second: the tests compare them with the kernel's files.
const FULL_RESOURCES: &str = "metrics:\n  resource_refresh: 1s\n  resource_detail: full\n";

fn daemon_with(policies: &str) -> Daemon {
    require_controllers();
    Daemon::start_with_config(
        &format!("{NO_FIREWALL}{FULL_RESOURCES}policies:\n{policies}"),
        &[],
    )
}

fn read(cgroup: &TestCgroup, file: &str) -> String {
    fs::read_to_string(cgroup.path().join(file))
        .unwrap_or_else(|e| panic!("read {file}: {e}"))
        .trim()
        .to_string()
}

fn flat_key(cgroup: &TestCgroup, file: &str, key: &str) -> u64 {
    read(cgroup, file)
        .lines()
        .find_map(|line| line.strip_prefix(&format!("{key} "))?.parse().ok())
        .unwrap_or_else(|| panic!("{file} has no {key}"))
}

/// A generous bound after which a wait counts as hung. How fast limits are applied is
/// measured by `cargo xtask bench`, not asserted here.
const HANG_GUARD: Duration = Duration::from_secs(30);

/// Waits until `file` reads `expected`.
fn wait_for(cgroup: &TestCgroup, file: &str, expected: &str) {
    let held = eventually(HANG_GUARD, || {
        fs::read_to_string(cgroup.path().join(file)).is_ok_and(|value| value.trim() == expected)
    });
    assert!(
        held,
        "{file} is {:?}, expected {expected:?} (waited {HANG_GUARD:?})",
        read(cgroup, file)
    );
}

fn count(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> u64 {
    daemon.scrape().count(name, labels)
}

/// The daemon's `stats` answer, as `sentinel top --json` prints it.
fn stats(daemon: &Daemon) -> Value {
    serde_json::from_str(&daemon.control(&["top", "--json"])).expect("top --json prints JSON")
}

/// The daemon's recent events of `kind` about `subject`, once there are `expected` of them.
fn await_events(daemon: &Daemon, kind: &str, subject: &str, expected: usize) -> Vec<Value> {
    let mut events = Vec::new();
    let arrived = eventually(HANG_GUARD, || {
        events = stats(daemon)["events"]
            .as_array()
            .expect("the events")
            .iter()
            .filter(|event| event["kind"] == kind && event["subject"] == subject)
            .cloned()
            .collect();
        events.len() >= expected
    });
    assert!(
        arrived,
        "{expected} {kind} event(s) of {subject}: {events:?}"
    );
    assert_eq!(events.len(), expected, "{events:?}");
    events
}

#[test]
fn a_memory_hog_is_oom_killed_at_memory_max_and_counted_once() {
    let _serial = serial();
    let daemon =
        daemon_with("  - name: hog\n    cgroup: sentinel-test-oom-*\n    memory.max: 64M\n");
    let cgroup = TestCgroup::new("oom");
    wait_for(&cgroup, "memory.max", &(64 * MIB).to_string());
    let service = [("service", cgroup.service())];

    let status = cgroup
        .command(testkit_bin())
        .args(["hog", "200"])
        .stdout(Stdio::null())
        .status()
        .expect("run the hog");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the hog should be OOM-killed: {status}"
    );

    daemon.await_count("sentinel_oom_kills_total", &service, 1, HANG_GUARD);
    std::thread::sleep(Duration::from_millis(500));
    let scrape = daemon.scrape();
    assert_eq!(scrape.count("sentinel_oom_kills_total", &service), 1);
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 1);
    // The kernel's own counts, exported for reconciliation: equal to memory.events once a
    // background read has seen the kill.
    let oom_kill = [("service", cgroup.service()), ("event", "oom_kill")];
    daemon.await_count("sentinel_memory_events_total", &oom_kill, 1, HANG_GUARD);
    let scrape = daemon.scrape();
    for event in ["oom", "oom_kill", "max", "high"] {
        assert_eq!(
            scrape.count(
                "sentinel_memory_events_total",
                &[("service", cgroup.service()), ("event", event)]
            ),
            flat_key(&cgroup, "memory.events", event),
            "{event}"
        );
    }
    let reports = daemon.log_records(&[("message", "OOM killer killed a process")]);
    let report = reports
        .iter()
        .find(|r| r["service"] == cgroup.service())
        .unwrap_or_else(|| panic!("no OOM report for {}:\n{}", cgroup.service(), daemon.log()));
    assert_eq!(report["policy"], "hog");
    assert_eq!(report["memory_max"], (64 * MIB).to_string());
    assert_eq!(report["comm"], "sentinel-testki");
    // The same kill in `sentinel top`'s events, after the limits were set.
    let killed = await_events(&daemon, "oom_kill", cgroup.service(), 1);
    assert_eq!(
        killed[0]["detail"],
        format!(
            "pid {} (sentinel-testki), memory.max {}",
            report["pid"],
            64 * MIB
        )
    );
    await_events(&daemon, "set_limits", cgroup.service(), 1);
}

const GRACEFUL: &str =
    "    memory.max: 128M\n    terminate_above: 48M\n    for: 1s\n    grace: 2s\n";

#[test]
fn terminate_above_stops_a_leak_with_sigterm_before_the_oom_killer() {
    let _serial = serial();
    let daemon = daemon_with(&format!(
        "  - name: leaky\n    cgroup: sentinel-test-term-*\n{GRACEFUL}"
    ));
    let cgroup = TestCgroup::new("term");
    wait_for(&cgroup, "memory.max", &(128 * MIB).to_string());

    let output = cgroup
        .command(testkit_bin())
        .args(["leak", "8"])
        .output()
        .expect("run the leak");
    assert!(
        output.status.success(),
        "the leak should exit by itself: {:?}",
        output.status
    );
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "terminated");

    let action = |action| [("service", cgroup.service()), ("action", action)];
    assert_eq!(
        count(&daemon, "sentinel_actions_total", &action("sigterm")),
        1
    );
    daemon
        .scrape()
        .assert_absent("sentinel_actions_total", &action("sigkill"));
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 0);
    // `sentinel top` shows the termination in its events.
    await_events(&daemon, "sigterm", cgroup.service(), 1);
    await_events(&daemon, "sigkill", cgroup.service(), 0);
}

#[test]
fn terminate_above_kills_a_leak_that_ignores_sigterm_after_the_grace_period() {
    let _serial = serial();
    let daemon = daemon_with(&format!(
        "  - name: stubborn\n    cgroup: sentinel-test-kill-*\n{GRACEFUL}"
    ));
    let cgroup = TestCgroup::new("kill");
    wait_for(&cgroup, "memory.max", &(128 * MIB).to_string());

    let status = cgroup
        .command(testkit_bin())
        .args(["leak", "8", "ignore-term"])
        .stdout(Stdio::null())
        .status()
        .expect("run the leak");
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");

    let action = |action| [("service", cgroup.service()), ("action", action)];
    daemon.await_count("sentinel_actions_total", &action("sigkill"), 1, HANG_GUARD);
    assert_eq!(
        count(&daemon, "sentinel_actions_total", &action("sigterm")),
        1
    );
    await_events(&daemon, "sigterm", cgroup.service(), 1);
    await_events(&daemon, "sigkill", cgroup.service(), 1);
    // Sentinel's SIGKILL came first: the kernel's OOM killer never ran.
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 0);
}

#[test]
fn cpu_max_throttles_a_busy_loop_and_the_export_matches_the_kernel() {
    let _serial = serial();
    let daemon =
        daemon_with("  - name: spinner\n    cgroup: sentinel-test-cpu-*\n    cpu.max: 20%\n");
    let cgroup = TestCgroup::new("cpu");
    wait_for(&cgroup, "cpu.max", "20000 100000");

    let mut spinner = cgroup
        .command(testkit_bin())
        .args(["spin", "3600"])
        .spawn()
        .expect("start the spinner");
    // A 20 % quota over 100 ms periods: a busy loop exhausts it in every period it runs.
    let throttled = eventually(HANG_GUARD, || {
        flat_key(&cgroup, "cpu.stat", "nr_throttled") >= 10
    });
    spinner.kill().expect("stop the spinner");
    spinner.wait().expect("reap the spinner");
    assert!(throttled, "cpu.stat: {}", read(&cgroup, "cpu.stat"));

    // With the spinner gone the kernel's figures come to rest (the period running when it
    // died may still be counted); the export must then equal them exactly.
    let service = [("service", cgroup.service())];
    let mut seen = (0, 0.0, None, None);
    let equal = eventually(HANG_GUARD, || {
        let periods = flat_key(&cgroup, "cpu.stat", "nr_throttled");
        let seconds = flat_key(&cgroup, "cpu.stat", "throttled_usec") as f64 / 1e6;
        let scrape = daemon.scrape();
        // Absent until the first resource read has seen the cgroup.
        let exported_periods = scrape.find("sentinel_cpu_throttled_periods_total", &service);
        let exported_seconds = scrape.find("sentinel_cpu_throttled_seconds_total", &service);
        seen = (periods, seconds, exported_periods, exported_seconds);
        exported_periods == Some(periods as f64)
            && exported_seconds.is_some_and(|exported| (exported - seconds).abs() < 1e-6)
    });
    assert!(
        equal,
        "cpu.stat: {} periods, {} s; exported: {:?} periods, {:?} s",
        seen.0, seen.1, seen.2, seen.3
    );
}

#[test]
fn pids_max_stops_a_fork_bomb_at_exactly_its_limit() {
    let _serial = serial();
    let _daemon =
        daemon_with("  - name: bomb\n    cgroup: sentinel-test-pids-*\n    pids.max: 32\n");
    let cgroup = TestCgroup::new("pids");
    wait_for(&cgroup, "pids.max", "32");

    let mut bomb = cgroup
        .command(testkit_bin())
        .args(["forkbomb", "500"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the fork bomb");
    let mut started = String::new();
    BufReader::new(bomb.stdout.take().unwrap())
        .read_line(&mut started)
        .expect("read the fork count");
    let started: u32 = started.trim().parse().expect("fork count");
    // The bomb itself is one of the 32 tasks; it stops at its first refused fork.
    assert_eq!(started, 31, "children started under pids.max 32");
    assert_eq!(flat_key(&cgroup, "pids.events", "max"), 1);

    // Outside the cgroup, processes still start.
    let other = TestCgroup::new("responsive");
    assert!(
        other
            .command("/bin/true")
            .status()
            .expect("run true")
            .success()
    );
    bomb.wait().expect("bomb exits");
}

#[test]
fn a_later_cgroup_gets_its_limits_and_drift_is_restored() {
    let _serial = serial();
    let daemon = daemon_with(
        "  - name: late\n    cgroup: sentinel-test-late-*\n    memory.max: 64M\n    pids.max: 100\n",
    );
    let cgroup = TestCgroup::new("late");
    wait_for(&cgroup, "memory.max", &(64 * MIB).to_string());
    wait_for(&cgroup, "pids.max", "100");

    fs::write(cgroup.path().join("memory.max"), "max").expect("change memory.max by hand");
    wait_for(&cgroup, "memory.max", &(64 * MIB).to_string());
    let drift = [("service", cgroup.service())];
    daemon.await_count("sentinel_policy_drift_total", &drift, 1, HANG_GUARD);
    // The kernel reported the write (inotify): no policed cgroup is read at every check.
    assert_eq!(
        daemon
            .scrape()
            .value("sentinel_policy_drift_polled_cgroups", &[]),
        0.0
    );
}

#[test]
fn a_broken_reload_is_rejected_and_changes_nothing_and_removal_restores() {
    let _serial = serial();
    let good = |memory| {
        format!(
            "{NO_FIREWALL}policies:\n  - name: app\n    cgroup: sentinel-test-reload-*\n    memory.max: {memory}\n    pids.max: 64\n"
        )
    };
    require_controllers();
    let cgroup = TestCgroup::new("reload");
    let original_memory = read(&cgroup, "memory.max");
    let original_pids = read(&cgroup, "pids.max");
    let mut daemon = Daemon::start_with_config(&good("64M"), &[]);
    wait_for(&cgroup, "memory.max", &(64 * MIB).to_string());
    let limits = || (read(&cgroup, "memory.max"), read(&cgroup, "pids.max"));
    let before = limits();

    // A broken file: noticed by the file watcher, and again on SIGHUP.
    fs::write(
        daemon.config_path(),
        format!("{}    memory.high: 1G\n", good("64M")),
    )
    .unwrap();
    daemon.await_count("sentinel_policy_reload_errors_total", &[], 1, HANG_GUARD);
    daemon.signal(libc::SIGHUP);
    daemon.await_count("sentinel_policy_reload_errors_total", &[], 2, HANG_GUARD);
    assert_eq!(count(&daemon, "sentinel_policy_reloads_total", &[]), 0);
    assert_eq!(limits(), before, "a rejected reload changed the limits");
    assert!(
        daemon
            .log()
            .contains("memory.high (1G) must not be above memory.max (64M)")
    );

    // A valid change is applied...
    fs::write(daemon.config_path(), good("96M")).unwrap();
    wait_for(&cgroup, "memory.max", &(96 * MIB).to_string());
    daemon.await_count("sentinel_policy_reloads_total", &[], 1, HANG_GUARD);
    // ...and removing the policy restores what was there before Sentinel.
    fs::write(daemon.config_path(), NO_FIREWALL).unwrap();
    wait_for(&cgroup, "memory.max", &original_memory);
    assert_eq!(read(&cgroup, "pids.max"), original_pids);
    daemon.signal(libc::SIGTERM);
    assert!(
        daemon
            .wait_exit(HANG_GUARD)
            .is_some_and(|(s, _)| s.success())
    );
}

#[test]
fn a_nested_cgroup_gets_its_controllers_enabled_in_its_parent() {
    let _serial = serial();
    let daemon = daemon_with(
        "  - name: nested\n    cgroup: sentinel-test-nest-*/inner\n    memory.max: 64M\n    cpu.max: 50%\n    pids.max: 50\n",
    );
    let cgroup = TestCgroup::new("nest");
    assert_eq!(read(&cgroup, "cgroup.subtree_control"), "");
    let inner = cgroup.path().join("inner");
    fs::create_dir(&inner).expect("create the nested cgroup");
    let nested_reads = || {
        ["memory.max", "cpu.max", "pids.max"].map(|file| {
            fs::read_to_string(inner.join(file))
                .map(|value| value.trim().to_owned())
                .unwrap_or_else(|error| format!("{file}: {error}"))
        })
    };
    // The three files are written one after the other: wait for the last.
    let expected = [(64 * MIB).to_string(), "50000 100000".into(), "50".into()];
    assert!(
        eventually(HANG_GUARD, || nested_reads() == expected),
        "the nested cgroup's memory.max, cpu.max and pids.max: {:?}\n{}",
        nested_reads(),
        daemon.log()
    );
    let mut enabled: Vec<String> = read(&cgroup, "cgroup.subtree_control")
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    enabled.sort();
    assert_eq!(enabled, ["cpu", "memory", "pids"]);
    fs::remove_dir(&inner).expect("remove the nested cgroup");
}

fn kill(mut daemon: Daemon) {
    daemon.signal(libc::SIGKILL);
    assert!(
        daemon.wait_exit(HANG_GUARD).is_some(),
        "SIGKILL did not end it"
    );
}

#[test]
fn the_true_originals_come_back_after_a_killed_daemon() {
    let _serial = serial();
    require_controllers();
    let state = TempDir::new("sentinel-vm-state");
    let cgroup = TestCgroup::new("orig");
    let original = read(&cgroup, "memory.max");
    let limited = (64 * MIB).to_string();
    assert_ne!(original, limited);
    let policy = format!(
        "{NO_FIREWALL}policies:\n  - name: app\n    cgroup: sentinel-test-orig-*\n    memory.max: 64M\n"
    );
    let applied = [("service", cgroup.service()), ("policy", "app")];

    let daemon = Daemon::start_with_state(&policy, state.path());
    wait_for(&cgroup, "memory.max", &limited);
    kill(daemon);
    // Restarted while its own 64M is in place: that must not become "the original".
    let daemon = Daemon::start_with_state(&policy, state.path());
    daemon.await_count("sentinel_policy_applied", &applied, 1, HANG_GUARD);
    fs::write(daemon.config_path(), NO_FIREWALL).expect("remove the policy");
    wait_for(&cgroup, "memory.max", &original);

    // A policy removed while the daemon was down: given back at the next start.
    let daemon = Daemon::start_with_state(&policy, state.path());
    wait_for(&cgroup, "memory.max", &limited);
    kill(daemon);
    let _daemon = Daemon::start_with_state(NO_FIREWALL, state.path());
    wait_for(&cgroup, "memory.max", &original);
}

/// Starts `testkit hog MIB` in `cgroup` and returns once its memory is resident.
fn hog(cgroup: &TestCgroup, mib: u64) -> std::process::Child {
    let mut hog = cgroup
        .command(testkit_bin())
        .args(["hog", &mib.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start a hog");
    let mut allocated = String::new();
    BufReader::new(hog.stdout.take().expect("the hog's stdout"))
        .read_line(&mut allocated)
        .expect("read the hog's line");
    assert_eq!(allocated.trim(), format!("allocated {} bytes", mib * MIB));
    hog
}

fn assert_running(process: &mut std::process::Child, what: &str) {
    let status = process.try_wait().expect("try_wait");
    assert!(status.is_none(), "{what} ended: {status:?}");
}

#[test]
fn observe_mode_writes_nothing_and_reports_what_it_would_do() {
    let _serial = serial();
    require_controllers();
    let cgroup = TestCgroup::new("observe");
    let original = |file| read(&cgroup, file);
    let (memory_max, pids_max) = (original("memory.max"), original("pids.max"));
    let daemon = daemon_with(&format!(
        "  - name: watched\n    cgroup: sentinel-test-observe-*\n    mode: observe\n    pids.max: 50\n{GRACEFUL}"
    ));
    let service = cgroup.service();
    let action = |action| [("service", service), ("action", action)];
    daemon.await_count(
        "sentinel_actions_total",
        &action("would_set_limits"),
        1,
        HANG_GUARD,
    );

    // A leak past terminate_above: observe mode only says it would stop it.
    let mut leak = cgroup
        .command(testkit_bin())
        .args(["leak", "16"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the leak");
    let reported = eventually(HANG_GUARD, || {
        daemon
            .scrape()
            .find("sentinel_actions_total", &action("would_sigterm"))
            .is_some()
    });
    assert_running(&mut leak, "the leak");
    leak.kill().expect("stop the leak");
    let output = leak.wait_with_output().expect("reap the leak");
    assert!(reported, "no would_sigterm; log:\n{}", daemon.log());
    assert_eq!(
        String::from_utf8_lossy(&output.stdout),
        "",
        "it got SIGTERM"
    );

    // Nothing was written, and each report is one log line.
    assert_eq!(read(&cgroup, "memory.max"), memory_max);
    assert_eq!(read(&cgroup, "pids.max"), pids_max);
    std::thread::sleep(Duration::from_secs(1));
    let scrape = daemon.scrape();
    let would_sigterm = scrape.count("sentinel_actions_total", &action("would_sigterm"));
    let logged = daemon
        .log_records(&[
            ("message", "observe: would send SIGTERM"),
            ("service", service),
        ])
        .len() as u64;
    assert_eq!(would_sigterm, logged);
    assert_eq!(
        scrape.count("sentinel_actions_total", &action("would_set_limits")),
        1
    );
    for done in ["set_limits", "sigterm", "sigkill", "failed"] {
        scrape.assert_absent("sentinel_actions_total", &action(done));
    }
    assert_eq!(
        scrape.count(
            "sentinel_policy_applied",
            &[("service", service), ("policy", "watched")]
        ),
        1
    );
    let mut would_set: Vec<String> = daemon
        .log_records(&[
            ("message", "observe: would set limit"),
            ("service", service),
        ])
        .iter()
        .map(|record| format!("{}={}", record["file"], record["would_set"]))
        .collect();
    would_set.sort();
    assert_eq!(
        would_set,
        [
            format!("\"memory.max\"=\"{}\"", 128 * MIB),
            "\"pids.max\"=\"50\"".to_owned()
        ]
    );
}

#[test]
fn the_first_matching_policy_wins() {
    let _serial = serial();
    let narrow = TestCgroup::new("first");
    let other = TestCgroup::new("second");
    let daemon = daemon_with(
        "  - name: narrow\n    cgroup: sentinel-test-first-*\n    memory.max: 64M\n  - name: broad\n    cgroup: sentinel-test-*\n    memory.max: 96M\n    pids.max: 20\n",
    );
    wait_for(&narrow, "memory.max", &(64 * MIB).to_string());
    wait_for(&other, "memory.max", &(96 * MIB).to_string());
    // Nothing of the later policy is merged in.
    assert_eq!(read(&narrow, "pids.max"), "max");
    assert_eq!(read(&other, "pids.max"), "20");
    fn applied<'a>(cgroup: &'a TestCgroup, policy: &'a str) -> [(&'a str, &'a str); 2] {
        [("service", cgroup.service()), ("policy", policy)]
    }
    let scrape = daemon.scrape();
    assert_eq!(
        scrape.count("sentinel_policy_applied", &applied(&narrow, "narrow")),
        1
    );
    scrape.assert_absent("sentinel_policy_applied", &applied(&narrow, "broad"));
    assert_eq!(
        scrape.count("sentinel_policy_applied", &applied(&other, "broad")),
        1
    );
}

#[test]
fn limits_stay_in_place_when_the_daemon_stops() {
    let _serial = serial();
    let cgroup = TestCgroup::new("stays");
    let mut daemon = daemon_with(
        "  - name: kept\n    cgroup: sentinel-test-stays-*\n    memory.max: 64M\n    pids.max: 40\n",
    );
    wait_for(&cgroup, "memory.max", &(64 * MIB).to_string());
    wait_for(&cgroup, "pids.max", "40");

    daemon.signal(libc::SIGTERM);
    let (status, _) = daemon.wait_exit(HANG_GUARD).expect("no exit after SIGTERM");
    assert!(status.success(), "{status}; log:\n{}", daemon.log());
    assert_eq!(read(&cgroup, "memory.max"), (64 * MIB).to_string());
    assert_eq!(read(&cgroup, "pids.max"), "40");
}

#[test]
fn sigterm_goes_to_the_largest_process() {
    let _serial = serial();
    let daemon = daemon_with(
        "  - name: crowd\n    cgroup: sentinel-test-crowd-*\n    memory.max: 512M\n    terminate_above: 96M\n    for: 1s\n    grace: 2s\n",
    );
    let cgroup = TestCgroup::new("crowd");
    wait_for(&cgroup, "memory.max", &(512 * MIB).to_string());
    // Two steady processes of different sizes, together well under the threshold...
    let mut small = hog(&cgroup, 8);
    let mut medium = hog(&cgroup, 24);
    // ...and a leak that takes the cgroup over it, by far the largest when it does.
    let leak = cgroup
        .command(testkit_bin())
        .args(["leak", "16"])
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the leak");
    let leak_pid = leak.id();
    // Were the leak spared, it would grow to memory.max and be OOM-killed without this line.
    let output = leak.wait_with_output().expect("reap the leak");
    assert_eq!(
        String::from_utf8_lossy(&output.stdout).trim(),
        "terminated",
        "{:?}; log:\n{}",
        output.status,
        daemon.log()
    );

    let service = cgroup.service();
    daemon.await_count(
        "sentinel_actions_total",
        &[("service", service), ("action", "sigterm")],
        1,
        HANG_GUARD,
    );
    let signalled: Vec<u64> = daemon
        .log_records(&[
            (
                "message",
                "memory above terminate_above: sending SIGTERM to the largest process",
            ),
            ("service", service),
        ])
        .iter()
        .filter_map(|record| record["pid"].as_u64())
        .collect();
    assert_eq!(signalled, [u64::from(leak_pid)]);
    assert_running(&mut small, "the 8 MiB process");
    assert_running(&mut medium, "the 24 MiB process");
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 0);
}

#[test]
fn unit_memory_high_and_cpu_weight_on_a_real_cgroup_with_their_metrics() {
    let _serial = serial();
    require_controllers();
    let parent = TestCgroup::new("units");
    let unit = parent.child("sentinel-web.service");
    let policy = |weight: u32| {
        format!(
            "{NO_FIREWALL}{FULL_RESOURCES}services:\n  cgroup_backend: cgroupfs\npolicies:\n  - name: web\n    unit: sentinel-web.service\n    memory.max: 64M\n    memory.high: 48M\n    cpu.weight: {weight}\n    pids.max: 50\n"
        )
    };
    let daemon = Daemon::start_with_config(&policy(200), &[]);
    wait_for(&unit, "memory.max", &(64 * MIB).to_string());
    assert_eq!(read(&unit, "memory.high"), (48 * MIB).to_string());
    assert_eq!(read(&unit, "cpu.weight"), "200");
    assert_eq!(read(&unit, "pids.max"), "50");
    let mut hog = hog(&unit, 8);

    let service = unit.service();
    let labels = [("service", service)];
    let usage_before = flat_key(&unit, "cpu.stat", "usage_usec");
    // Resource figures come from a background read every second: wait for one made after
    // `usage_before` (the hog keeps the usage growing).
    let mut scrape = daemon.scrape();
    let refreshed = eventually(HANG_GUARD, || {
        scrape = daemon.scrape();
        scrape
            .find("sentinel_cpu_usage_seconds_total", &labels)
            .is_some_and(|usage| usage >= usage_before as f64 / 1e6)
    });
    assert!(
        refreshed,
        "no resource read after cpu.stat said {usage_before} us"
    );
    let usage_after = flat_key(&unit, "cpu.stat", "usage_usec");
    // What the kernel says, exactly.
    assert_eq!(
        scrape.count(
            "sentinel_policy_applied",
            &[("service", service), ("policy", "web")]
        ),
        1
    );
    assert_eq!(
        scrape.count("sentinel_memory_limit_bytes", &labels),
        64 * MIB
    );
    assert_eq!(
        scrape.count("sentinel_memory_high_bytes", &labels),
        48 * MIB
    );
    assert_eq!(scrape.count("sentinel_pids_limit", &labels), 50);
    assert_eq!(scrape.count("sentinel_pids_current", &labels), 1);
    assert_eq!(
        scrape.count("sentinel_cpu_throttled_periods_total", &labels),
        0
    );
    assert_eq!(
        scrape.value("sentinel_cpu_throttled_seconds_total", &labels),
        0.0
    );
    for event in ["high", "max", "oom", "oom_kill"] {
        let event_labels = [("service", service), ("event", event)];
        assert_eq!(
            scrape.count("sentinel_memory_events_total", &event_labels),
            0,
            "{event}"
        );
    }
    assert_eq!(scrape.count("sentinel_policy_reloads_total", &[]), 0);
    // What moves on its own, within what the kernel said around the scrape.
    let usage = scrape.value("sentinel_cpu_usage_seconds_total", &labels);
    assert!(
        (usage_before as f64 / 1e6..=usage_after as f64 / 1e6).contains(&usage) && usage > 0.0,
        "{usage} s, cpu.stat {usage_before}..{usage_after} us"
    );
    let memory = scrape.count("sentinel_memory_current_bytes", &labels);
    assert!((8 * MIB..64 * MIB).contains(&memory), "{memory} bytes");
    for resource in ["cpu", "memory", "io"] {
        for scope in ["some", "full"] {
            let stall = scrape.value(
                "sentinel_pressure_stall_seconds_total",
                &[
                    ("service", service),
                    ("resource", resource),
                    ("scope", scope),
                ],
            );
            assert!(
                stall.is_finite() && stall >= 0.0,
                "{resource} {scope}: {stall}"
            );
        }
    }
    assert_promtool_clean(&scrape);

    // `sentinel top`'s figures are the scrape's, exactly, when both come from the same
    // resource read: a scrape between two `stats` answers of the same read.
    let mut same_read = None;
    let found = eventually(HANG_GUARD, || {
        let before = stats(&daemon);
        let scrape = daemon.scrape();
        let after = stats(&daemon);
        let read_at = &before["resources_read_at_ms"];
        let same = read_at.is_u64() && *read_at == after["resources_read_at_ms"];
        same_read = Some((after, scrape));
        same
    });
    assert!(
        found,
        "no scrape between two stats answers of the same read"
    );
    let (stats, scrape) = same_read.expect("a scrape");
    let row = stats["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|row| row["service"] == service)
        .unwrap_or_else(|| panic!("no row for {service}: {stats:#}"))
        .clone();
    let pressure = |resource| {
        scrape.value(
            "sentinel_pressure_stall_seconds_total",
            &[
                ("service", service),
                ("resource", resource),
                ("scope", "some"),
            ],
        )
    };
    let figures = [
        (
            "memory_bytes",
            scrape.value("sentinel_memory_current_bytes", &labels),
        ),
        (
            "memory_max_bytes",
            scrape.value("sentinel_memory_limit_bytes", &labels),
        ),
        (
            "cpu_usage_seconds",
            scrape.value("sentinel_cpu_usage_seconds_total", &labels),
        ),
        (
            "cpu_throttled_seconds",
            scrape.value("sentinel_cpu_throttled_seconds_total", &labels),
        ),
        ("pids", scrape.value("sentinel_pids_current", &labels)),
        ("pids_max", scrape.value("sentinel_pids_limit", &labels)),
        ("memory_pressure_seconds", pressure("memory")),
        ("cpu_pressure_seconds", pressure("cpu")),
    ];
    for (field, exported) in figures {
        assert_eq!(row[field].as_f64(), Some(exported), "{field}: {row:#}");
    }
    assert_eq!(row["policy"], "web");

    // A reload that changes the policy is applied and counted once.
    fs::write(daemon.config_path(), policy(300)).expect("rewrite the configuration");
    wait_for(&unit, "cpu.weight", "300");
    daemon.await_count("sentinel_policy_reloads_total", &[], 1, HANG_GUARD);
    assert_eq!(read(&unit, "memory.high"), (48 * MIB).to_string());
    hog.kill().expect("stop the hog");
    hog.wait().expect("reap the hog");
}

/// What each basic resource series must equal: the interface file's figure, in the unit the
/// series exports.
fn basic_figures(cgroup: &TestCgroup) -> [(&'static str, Option<f64>); 5] {
    let number = |file| read(cgroup, file).parse::<f64>().ok();
    [
        ("sentinel_memory_current_bytes", number("memory.current")),
        ("sentinel_memory_limit_bytes", number("memory.max")),
        (
            "sentinel_cpu_usage_seconds_total",
            Some(flat_key(cgroup, "cpu.stat", "usage_usec") as f64 / 1e6),
        ),
        (
            "sentinel_cpu_throttled_seconds_total",
            Some(flat_key(cgroup, "cpu.stat", "throttled_usec") as f64 / 1e6),
        ),
        ("sentinel_pids_current", number("pids.current")),
    ]
}

/// Two services at rest, a top-level cgroup and a unit below a parent, each with a hog that
/// holds its memory and sleeps: every basic series of each must come to equal the kernel's
/// files exactly, read from `source` as the daemon's log and `sentinel_probe_attached` say;
/// and so again once the first is made anew at its path while the removed one lingers.
fn figures_equal_the_files(env: &[(&str, &str)], source: &str, attached: f64) {
    let _serial = serial();
    require_controllers();
    // More cgroups ahead of the services in the walk's order (parents first, each parent's
    // children in the order they were made) than one walk writes: the services' first
    // records come from a later walk than the first.
    let fillers = TestCgroup::new("fillers-of-figures");
    let _fillers: Vec<TestCgroup> = (0..600)
        .map(|n| fillers.child(&format!("filler-{n}")))
        .collect();
    let top = TestCgroup::new("figures");
    let parent = TestCgroup::new("units-of-figures");
    let unit = parent.child("sentinel-figures.service");
    let limits = "    memory.max: 64M\n    pids.max: 50\n    cpu.max: 50%\n";
    let daemon = Daemon::start_with_config(
        &format!(
            "{NO_FIREWALL}metrics:\n  resource_refresh: 1s\nservices:\n  cgroup_backend: cgroupfs\n\
             policies:\n  - name: top\n    cgroup: sentinel-test-figures-*\n{limits}\
             \x20 - name: unit\n    unit: sentinel-figures.service\n{limits}"
        ),
        env,
    );
    let hogs = [&top, &unit].map(|cgroup| {
        wait_for(cgroup, "memory.max", &(64 * MIB).to_string());
        hog(cgroup, 8)
    });
    let [mut top_hog, mut unit_hog] = hogs;
    assert_figures_equal(&daemon, &[&top, &unit]);
    // The top-level service restarts: the same path, a new cgroup (a new id). A file it
    // wrote keeps memory charged to the removed cgroup, which so stays in the hierarchy,
    // offline, with figures of its own.
    let cache = TempDir::new("figures-cache");
    let written = top
        .command("/bin/sh")
        .arg("-c")
        .arg(format!(
            "head -c {} /dev/zero > {}/cache",
            12 * MIB,
            cache.path().display()
        ))
        .status()
        .expect("write a file from the service");
    assert!(written.success(), "{written:?}");
    top_hog.kill().expect("stop the hog");
    top_hog.wait().expect("reap the hog");
    fs::remove_dir(top.path()).expect("remove the cgroup");
    fs::create_dir(top.path()).expect("make the cgroup again");
    wait_for(&top, "memory.max", &(64 * MIB).to_string());
    let mut top_hog = hog(&top, 4);
    assert_figures_equal(&daemon, &[&top]);
    let log = daemon.log();
    assert!(
        log.contains(source),
        "the log does not say {source:?}:\n{log}"
    );
    let program = [("program", "cgroup_figures")];
    let scrape = daemon.scrape();
    assert_eq!(scrape.value("sentinel_probe_attached", &program), attached);
    assert_eq!(scrape.value("sentinel_probe_wanted", &program), 1.0);
    // Every figure came from the kernel's records, the first pass's too, whose walks had to go
    // on past the 600 cgroups ahead; without the iterator, every figure from the files.
    let from_files = scrape.value("sentinel_resource_cgroups_from_files_total", &[]);
    if attached == 1.0 {
        assert_eq!(from_files, 0.0, "figures read from files");
    } else {
        assert!(from_files >= 2.0, "{from_files} figures read from files");
    }
    for hog in [&mut top_hog, &mut unit_hog] {
        hog.kill().expect("stop the hog");
        hog.wait().expect("reap the hog");
    }
}

/// Waits until every basic series of each of `cgroups` equals its interface file.
fn assert_figures_equal(daemon: &Daemon, cgroups: &[&TestCgroup]) {
    for cgroup in cgroups {
        let labels = [("service", cgroup.service())];
        let mut seen = Vec::new();
        let equal = eventually(HANG_GUARD, || {
            let scrape = daemon.scrape();
            seen = basic_figures(cgroup)
                .into_iter()
                .map(|(series, file)| (series, file, scrape.find(series, &labels)))
                .collect();
            seen.iter()
                .all(|(_, file, exported)| file.is_some() && file == exported)
        });
        assert!(
            equal,
            "{}: (series, file, exported): {seen:?}",
            cgroup.service()
        );
    }
}

#[test]
fn the_kernels_cgroup_iterator_gives_exactly_the_files_figures() {
    figures_equal_the_files(
        &[],
        "resource figures come from the kernel's cgroup iterator, one walk per 512 cgroups; \
         the first walk of a pass sums up CPU time in the kernel",
        1.0,
    );
}

#[test]
fn without_the_iterator_the_files_give_the_same_figures() {
    figures_equal_the_files(
        &[("SENTINEL_FAULT_INJECT_PROBE", "cgroup_figures")],
        "resource figures are read from each service's interface files",
        0.0,
    );
}
