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
    Daemon, NO_FIREWALL, TempDir, TestCgroup, cgroup2_mount, eventually, serial, testkit_bin,
};

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

fn counter(daemon: &Daemon, name: &str, labels: &[(&str, &str)]) -> u64 {
    daemon.scrape().counter(name, labels)
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

    assert!(eventually(HANG_GUARD, || {
        counter(&daemon, "sentinel_oom_kills_total", &service) >= 1
    }));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&daemon, "sentinel_oom_kills_total", &service), 1);
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 1);
    let reports = daemon.log_records(&[("message", "OOM killer killed a process")]);
    let report = reports
        .iter()
        .find(|r| r["service"] == cgroup.service())
        .unwrap_or_else(|| panic!("no OOM report for {}:\n{}", cgroup.service(), daemon.log()));
    assert_eq!(report["policy"], "hog");
    assert_eq!(report["memory_max"], (64 * MIB).to_string());
    assert_eq!(report["comm"], "sentinel-testki");
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

    let action = |action| {
        counter(
            &daemon,
            "sentinel_actions_total",
            &[("service", cgroup.service()), ("action", action)],
        )
    };
    assert_eq!(action("sigterm"), 1);
    assert_eq!(action("sigkill"), 0);
    assert_eq!(flat_key(&cgroup, "memory.events", "oom_kill"), 0);
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

    let action = |action| {
        counter(
            &daemon,
            "sentinel_actions_total",
            &[("service", cgroup.service()), ("action", action)],
        )
    };
    assert!(eventually(HANG_GUARD, || action("sigkill") == 1));
    assert_eq!(action("sigterm"), 1);
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

    // With the spinner gone the kernel's figures stand still; the export must equal them.
    let periods = flat_key(&cgroup, "cpu.stat", "nr_throttled");
    let seconds = flat_key(&cgroup, "cpu.stat", "throttled_usec") as f64 / 1e6;
    let service = [("service", cgroup.service())];
    let exported = |name: &str| daemon.scrape().value(name, &service);
    assert!(
        eventually(HANG_GUARD, || {
            exported("sentinel_cpu_throttled_periods_total") == Some(periods as f64)
        }),
        "exported {:?}, cpu.stat nr_throttled {periods}",
        exported("sentinel_cpu_throttled_periods_total")
    );
    let exported_seconds = exported("sentinel_cpu_throttled_seconds_total")
        .expect("sentinel_cpu_throttled_seconds_total exported");
    assert!(
        (exported_seconds - seconds).abs() < 1e-6,
        "exported {exported_seconds} s, cpu.stat {seconds} s"
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
    assert!(eventually(HANG_GUARD, || counter(
        &daemon,
        "sentinel_policy_drift_total",
        &drift
    ) == 1));
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
    assert!(eventually(HANG_GUARD, || {
        counter(&daemon, "sentinel_policy_reload_errors_total", &[]) == 1
    }));
    daemon.signal(libc::SIGHUP);
    assert!(eventually(HANG_GUARD, || {
        counter(&daemon, "sentinel_policy_reload_errors_total", &[]) == 2
    }));
    assert_eq!(limits(), before, "a rejected reload changed the limits");
    assert!(
        daemon
            .log()
            .contains("memory.high (1G) must not be above memory.max (64M)")
    );

    // A valid change is applied...
    fs::write(daemon.config_path(), good("96M")).unwrap();
    wait_for(&cgroup, "memory.max", &(96 * MIB).to_string());
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
    let _daemon = daemon_with(
        "  - name: nested\n    cgroup: sentinel-test-nest-*/inner\n    memory.max: 64M\n    cpu.max: 50%\n    pids.max: 50\n",
    );
    let cgroup = TestCgroup::new("nest");
    assert_eq!(read(&cgroup, "cgroup.subtree_control"), "");
    let inner = cgroup.path().join("inner");
    fs::create_dir(&inner).expect("create the nested cgroup");
    let nested_reads =
        |file: &str| fs::read_to_string(inner.join(file)).map(|value| value.trim().to_owned());
    assert!(
        eventually(HANG_GUARD, || nested_reads("memory.max")
            .is_ok_and(|value| value == (64 * MIB).to_string())),
        "memory.max of the nested cgroup: {:?}",
        nested_reads("memory.max")
    );
    assert_eq!(nested_reads("cpu.max").unwrap(), "50000 100000");
    assert_eq!(nested_reads("pids.max").unwrap(), "50");
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
    assert!(eventually(HANG_GUARD, || {
        daemon.scrape().value("sentinel_policy_applied", &applied) == Some(1.0)
    }));
    fs::write(daemon.config_path(), NO_FIREWALL).expect("remove the policy");
    wait_for(&cgroup, "memory.max", &original);

    // A policy removed while the daemon was down: given back at the next start.
    let daemon = Daemon::start_with_state(&policy, state.path());
    wait_for(&cgroup, "memory.max", &limited);
    kill(daemon);
    let _daemon = Daemon::start_with_state(NO_FIREWALL, state.path());
    wait_for(&cgroup, "memory.max", &original);
}
