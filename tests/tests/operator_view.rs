//! The operator's commands against the real daemon and the built binary: `sentinel status`,
//! `sentinel top` driven in tmux as a person would, `sentinel reload`, their JSON, the exit
//! statuses, and the bounds of the control socket's new requests. Needs root and tmux:
//! `cargo test -p sentinel-tests --test operator_view`.

use std::{
    fs,
    io::{BufRead, BufReader, Write},
    os::unix::{fs::PermissionsExt, net::UnixStream, process::CommandExt},
    path::Path,
    process::Command,
    time::Duration,
};

use sentinel_tests::{
    Daemon, NO_FIREWALL, TempDir, TestCgroup, eventually, free_port, netlab::Netns, sentinel_bin,
    serial, unique_suffix,
};
use serde_json::{Value, json};

/// How long the daemon may take to apply a reloaded policy, or top to show a change.
const WAIT: Duration = Duration::from_secs(15);

/// A finished `sentinel` command.
struct Ran {
    code: i32,
    stdout: String,
    stderr: String,
}

fn sentinel(args: &[&str]) -> Ran {
    sentinel_as(0, args)
}

fn sentinel_as(uid: u32, args: &[&str]) -> Ran {
    let output = Command::new(sentinel_bin())
        .args(args)
        .uid(uid)
        .gid(uid)
        .output()
        .expect("run sentinel");
    Ran {
        code: output
            .status
            .code()
            .expect("sentinel was killed by a signal"),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// `sentinel COMMAND [ARGS] --socket SOCKET`.
fn ask(daemon: &Daemon, args: &[&str]) -> Ran {
    let socket = daemon.control_socket();
    let mut all = args.to_vec();
    all.extend(["--socket", socket.to_str().expect("UTF-8 socket path")]);
    sentinel(&all)
}

fn json_of(ran: &Ran) -> Value {
    serde_json::from_str(&ran.stdout)
        .unwrap_or_else(|error| panic!("not JSON ({error}): {}{}", ran.stdout, ran.stderr))
}

/// An observe-mode policy per cgroup: nothing is written, every service shows as observing.
fn observe_policies(policies: &[(&str, &TestCgroup)]) -> String {
    let mut config = format!("{NO_FIREWALL}policies:\n");
    for (name, cgroup) in policies {
        config.push_str(&format!(
            "  - name: {name}\n    cgroup: {}\n    mode: observe\n    memory.max: 64M\n",
            cgroup.service()
        ));
    }
    config
}

/// Whether the cgroup2 root offers the memory controller (not on a hybrid host).
fn memory_controller_available() -> bool {
    fs::read_to_string(sentinel_tests::cgroup2_mount().join("cgroup.controllers"))
        .expect("read cgroup.controllers")
        .split_whitespace()
        .any(|controller| controller == "memory")
}

#[test]
fn status_names_each_probe_policy_and_service_and_its_exit_status_says_whether_all_works() {
    let _serial = serial();
    let watched = TestCgroup::new("status-watched");
    let limited = TestCgroup::new("status-limited");
    let config = format!(
        "{}  - name: limited\n    cgroup: {}\n    memory.max: 64M\n",
        observe_policies(&[("watched", &watched)]),
        limited.service()
    );
    let daemon =
        Daemon::start_with_config(&config, &[("SENTINEL_FAULT_INJECT_PROBE", "tcp_state")]);
    let mut status = ask(&daemon, &["status"]);
    // The enforcer publishes its first state once it has walked the hierarchy.
    assert!(eventually(WAIT, || {
        status = ask(&daemon, &["status"]);
        status.stdout.contains(limited.service())
    }));
    let text = &status.stdout;
    assert!(text.starts_with("sentinel 0.1.0, up "), "{text}");
    assert!(text.contains("probes: 10 of 11 attached\n"), "{text}");
    assert!(
        text.contains("\n  exec                   attached\n"),
        "{text}"
    );
    assert!(
        // The fault injection names a tracepoint that does not exist.
        text.contains(
            "\n  tcp_state              NOT ATTACHED: attaching to tracepoint \
             sentinel_fault_injected failed: "
        ),
        "{text}"
    );
    assert!(
        text.contains(&format!(
            "policies:\n  watched (observe):\n    {:<40} observing\n",
            watched.service()
        )),
        "{text}"
    );
    let limited_line = if memory_controller_available() {
        format!(
            "  limited (enforce):\n    {:<40} enforcing\n",
            limited.service()
        )
    } else {
        format!(
            "  limited (enforce):\n    {:<40} FAILED: the memory controller is not available in /",
            limited.service()
        )
    };
    assert!(text.contains(&limited_line), "{text}");
    assert!(text.contains("ssh guard: disabled\n"), "{text}");
    assert!(
        text.contains("last reload: none since the start\n"),
        "{text}"
    );
    let mut problems = vec!["probe tcp_state is not attached".to_owned()];
    if !memory_controller_available() {
        problems.push(format!(
            "policy limited is not applied to {}",
            limited.service()
        ));
    }
    let heading = match problems.len() {
        1 => "1 problem:".to_owned(),
        count => format!("{count} problems:"),
    };
    let listed: String = problems.iter().map(|p| format!("\n  - {p}")).collect();
    assert!(text.ends_with(&format!("{heading}{listed}\n")), "{text}");
    assert_eq!(status.code, 1, "{text}");

    let document = json_of(&ask(&daemon, &["status", "--output", "json"]));
    assert_eq!(document["version"], "0.1.0");
    assert_eq!(document["problems"], json!(problems));
    let probes = document["probes"].as_array().expect("probes");
    assert_eq!(probes.len(), 11);
    let tcp_state = probes
        .iter()
        .find(|probe| probe["name"] == "tcp_state")
        .expect("the tcp_state probe");
    assert_eq!(tcp_state["attached"], false);
    assert!(
        tcp_state["reason"]
            .as_str()
            .is_some_and(|reason| reason
                .starts_with("attaching to tracepoint sentinel_fault_injected failed: ")),
        "{tcp_state}"
    );
    assert_eq!(
        document["policies"][0],
        json!({"name": "watched", "mode": "observe",
               "services": [{"service": watched.service(), "state": "observing"}]})
    );
    assert_eq!(document["ssh_guard"], json!({"state": "disabled"}));
    assert_eq!(document["last_reload"], Value::Null);
}

#[test]
fn status_of_a_daemon_whose_every_part_works_exits_0() {
    let _serial = serial();
    let watched = TestCgroup::new("status-healthy");
    let daemon = Daemon::start_with_config(&observe_policies(&[("watched", &watched)]), &[]);
    let mut status = ask(&daemon, &["status"]);
    assert!(eventually(WAIT, || {
        status = ask(&daemon, &["status"]);
        status.stdout.contains(watched.service())
    }));
    assert!(
        status
            .stdout
            .ends_with("\neverything Sentinel is asked to do works\n"),
        "{}",
        status.stdout
    );
    assert_eq!(status.code, 0);
}

#[test]
fn reload_reports_the_outcome_and_a_refused_file_changes_nothing() {
    let _serial = serial();
    let cgroup = TestCgroup::new("reload");
    let daemon = Daemon::start_with_config(&observe_policies(&[("first", &cgroup)]), &[]);
    let config = daemon.config_path();

    fs::write(
        &config,
        format!(
            "{NO_FIREWALL}policies:\n  - name: second\n    cgroup: {}\n    memroy.max: 64M\n",
            cgroup.service()
        ),
    )
    .unwrap();
    let refused = ask(&daemon, &["reload"]);
    assert_eq!(refused.code, 78, "{}", refused.stderr);
    let path = config.display();
    assert_eq!(
        refused.stderr,
        format!(
            "sentinel: reload refused; the running configuration stays in force\n\
             {path}:4:5: policy sets nothing; add one of memory.max, memory.high, cpu.max, \
             cpu.weight, pids.max, terminate_above, exec.allow\n\
             {path}:6:5: unknown policy key \"memroy.max\"; did you mean \"memory.max\"?\n"
        )
    );
    let refused = ask(&daemon, &["reload", "--output", "json"]);
    assert_eq!(refused.code, 78);
    let report = json_of(&refused);
    assert_eq!(report["ok"], false);
    assert_eq!(
        report["problems"][1],
        json!({"file": config.display().to_string(), "line": 6, "column": 5,
               "reason": "unknown policy key \"memroy.max\"; did you mean \"memory.max\"?"})
    );
    // The running policy stays, and status says the last reload was refused.
    let status = ask(&daemon, &["status", "--output", "json"]);
    assert_eq!(status.code, 1);
    let status = json_of(&status);
    assert_eq!(status["policies"][0]["name"], "first");
    assert_eq!(status["last_reload"]["ok"], false);
    assert_eq!(status["problems"], json!(["the last reload was refused"]));

    fs::write(&config, observe_policies(&[("second", &cgroup)])).unwrap();
    let reloaded = ask(&daemon, &["reload"]);
    assert_eq!(reloaded.code, 0, "{}", reloaded.stderr);
    assert_eq!(reloaded.stdout, "reloaded: ok, 1 policy in force\n");
    let mut status = json!(null);
    let applied = eventually(WAIT, || {
        status = json_of(&ask(&daemon, &["status", "--output", "json"]));
        status["policies"][0]["services"][0]["service"] == cgroup.service()
    });
    assert!(applied, "{status:#}");
    assert_eq!(status["policies"][0]["name"], "second");
    assert_eq!(status["last_reload"]["ok"], true);
    assert_eq!(status["last_reload"]["policies"], 1);
}

/// A tmux server of its own, killed on drop, with one 80x24 window running `command`.
struct Tmux {
    server: String,
}

impl Tmux {
    fn start(command: &str) -> Self {
        let tmux = Self {
            server: format!("sentinel-test-{}", unique_suffix()),
        };
        let started = tmux
            .command(&[
                "new-session",
                "-d",
                "-s",
                "top",
                "-x",
                "80",
                "-y",
                "24",
                command,
            ])
            .status()
            .expect("run tmux; install it with `cargo xtask setup`");
        assert!(started.success());
        tmux
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("tmux");
        command
            .args(["-L", &self.server, "-f", "/dev/null"])
            .args(args);
        command
    }

    fn screen(&self) -> String {
        let output = self
            .command(&["capture-pane", "-p", "-t", "top"])
            .output()
            .expect("tmux capture-pane");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    fn keys(&self, keys: &[&str]) {
        for key in keys {
            assert!(
                self.command(&["send-keys", "-t", "top", key])
                    .status()
                    .expect("tmux send-keys")
                    .success()
            );
        }
    }

    /// Waits until the screen satisfies `condition`; returns the screen.
    fn await_screen(&self, what: &str, condition: impl Fn(&str) -> bool) -> String {
        let mut screen = String::new();
        let shown = eventually(WAIT, || {
            screen = self.screen();
            condition(&screen)
        });
        assert!(shown, "the screen never showed {what}:\n{screen}");
        screen
    }

    fn running(&self) -> bool {
        self.command(&["has-session", "-t", "top"])
            .output()
            .is_ok_and(|output| output.status.success())
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.command(&["kill-server"]).output();
    }
}

/// The table's rows (below the title and the header, above the events pane) that name one of
/// `cgroups`, in order.
fn rows_of<'a>(screen: &str, cgroups: &[&'a TestCgroup]) -> Vec<&'a str> {
    screen
        .lines()
        .skip(2)
        .take_while(|line| !line.starts_with("┌ events "))
        .filter_map(|line| {
            cgroups
                .iter()
                .find(|cgroup| line.contains(tail_of(cgroup)))
                .map(|cgroup| cgroup.service())
        })
        .collect()
}

/// The end of a service's name, which top shows however narrow the column.
fn tail_of(cgroup: &TestCgroup) -> &str {
    let service = cgroup.service();
    &service[service.len() - 10..]
}

#[test]
fn top_in_tmux_shows_the_services_sorts_filters_and_quits() {
    let _serial = serial();
    let quiet = TestCgroup::new("topa");
    let busy = TestCgroup::new("topb");
    let config = observe_policies(&[("quiet", &quiet), ("busy", &busy)]);
    let daemon = Daemon::start_with_config(&config, &[]);
    // Killed with its cgroup; reaped here.
    let mut exec_loop = busy
        .command("/bin/sh")
        .args(["-c", "while :; do /bin/true; done"])
        .spawn()
        .expect("start the exec loop");

    let top = Tmux::start(&format!(
        "{} top --socket {}",
        sentinel_bin().display(),
        daemon.control_socket().display()
    ));
    let screen = top.await_screen("both services", |screen| {
        rows_of(screen, &[&quiet, &busy]).len() == 2
    });
    let lines: Vec<&str> = screen.lines().collect();
    assert_eq!(lines.len(), 24, "{screen}");
    assert!(
        lines.iter().all(|line| line.chars().count() <= 80),
        "{screen}"
    );
    assert_eq!(
        lines[1].trim_end(),
        "SERVICE        MEMORY▼          CPU%  THR%  PIDS      PSI%  EXEC/s  CONN/s  OOM"
    );
    assert_eq!(
        lines[23].trim_end(),
        "q quit  / filter  sort: n name m mem c cpu p pids e exec t conn o oom"
    );

    // Only these two services, typed as a person would.
    top.keys(&["/", "sentinel-test-top", "Enter"]);
    let screen = top.await_screen("the filter", |screen| {
        screen.contains("services, filter \"sentinel-test-top\"")
    });
    assert!(screen.contains(" sentinel top: 2 of "), "{screen}");

    top.keys(&["e"]);
    let screen = top.await_screen("the busy service first by exec/s", |screen| {
        screen.contains("EXEC/s▼")
            && rows_of(screen, &[&quiet, &busy]).first() == Some(&busy.service())
    });
    let busy_row = screen
        .lines()
        .find(|line| line.contains(tail_of(&busy)))
        .expect("the busy row");
    let exec_rate: f64 = busy_row
        .split_whitespace()
        .nth_back(2)
        .and_then(|rate| rate.parse().ok())
        .unwrap_or_else(|| panic!("no exec rate in {busy_row:?}"));
    assert!(exec_rate > 0.0, "{busy_row}");

    top.keys(&["n"]);
    top.await_screen("the names in order", |screen| {
        screen.contains("SERVICE▼")
            && rows_of(screen, &[&quiet, &busy]) == [quiet.service(), busy.service()]
    });

    top.keys(&["q"]);
    assert!(eventually(WAIT, || !top.running()), "q did not quit top");
    exec_loop.kill().expect("stop the exec loop");
    exec_loop.wait().expect("reap the exec loop");
}

#[test]
fn top_once_and_json_show_what_the_metrics_show() {
    let _serial = serial();
    let cgroup = TestCgroup::new("top-once");
    let daemon = Daemon::start_with_config(&observe_policies(&[("counted", &cgroup)]), &[]);
    const EXECS: u64 = 5;
    for _ in 0..EXECS {
        let status = cgroup.command("/bin/true").status().expect("run /bin/true");
        assert!(status.success());
    }
    let scraped = daemon
        .scrape()
        .value("sentinel_exec_total", &[("service", cgroup.service())]);
    assert_eq!(scraped, EXECS as f64);

    let json = ask(&daemon, &["top", "--json"]);
    assert_eq!(json.code, 0, "{}", json.stderr);
    let document = json_of(&json);
    let row = document["services"]
        .as_array()
        .expect("services")
        .iter()
        .find(|row| row["service"] == cgroup.service())
        .unwrap_or_else(|| panic!("no row for {} in {document:#}", cgroup.service()));
    assert_eq!(row["policy"], "counted");
    assert_eq!(row["execs"], EXECS);
    assert_eq!(row["tcp_connects"], 0);
    assert_eq!(row["oom_kills"], 0);

    let once = ask(&daemon, &["top", "--once"]);
    assert_eq!(once.code, 0, "{}", once.stderr);
    let lines: Vec<&str> = once.stdout.lines().collect();
    assert!(
        lines.iter().all(|line| line.chars().count() <= 80),
        "{}",
        once.stdout
    );
    assert!(lines[1].starts_with("SERVICE "), "{}", once.stdout);
    let row = lines
        .iter()
        .find(|line| line.contains(tail_of(&cgroup)))
        .unwrap_or_else(|| panic!("no row for the cgroup in\n{}", once.stdout));
    // Nothing ran in the second between the two samples, and no OOM kill.
    assert!(row.ends_with(" 0.0     0.0     0"), "{row}");
}

/// The events pane's lines, newest first.
fn pane_events(screen: &str) -> Vec<&str> {
    let mut lines = screen
        .lines()
        .skip_while(|line| !line.starts_with("┌ events "));
    lines.next();
    lines
        .map_while(|line| line.strip_prefix('│'))
        .map(|line| line.trim_end_matches(['│', ' ']))
        .collect()
}

#[test]
fn top_shows_the_daemons_events_from_before_it_started_and_after() {
    let _serial = serial();
    let netns = Netns::new("top-events");
    let dir = TempDir::new("sentinel-top-events");
    let cgroup = TestCgroup::new("events");
    let audit_log = dir.path().join("audit.log");
    let config = format!(
        "ssh_guard:\n  enabled: true\n  mode: enforce\n  audit_log: {}\n  netns: {}\n\
         policies:\n  - name: watched\n    cgroup: {}\n    mode: observe\n    memory.max: 64M\n",
        audit_log.display(),
        netns.path().display(),
        cgroup.service()
    );
    let daemon = Daemon::start_with_config(&config, &[]);
    assert_eq!(
        daemon.control(&["ban", "203.0.113.7", "--for", "1h"]),
        "banned 203.0.113.7 for 1h\n"
    );
    let mut events = json!(null);
    let both = eventually(WAIT, || {
        events = json_of(&ask(&daemon, &["top", "--json"]))["events"].clone();
        events.as_array().is_some_and(|events| events.len() == 2)
    });
    assert!(both, "{events:#}");
    let of_kind = |kind: &str| {
        events
            .as_array()
            .and_then(|events| events.iter().find(|event| event["kind"] == kind))
            .unwrap_or_else(|| panic!("no {kind} event in {events:#}"))
            .clone()
    };
    // The ban's event is its audit record: the same time to the millisecond.
    let audit = fs::read_to_string(&audit_log).expect("read the audit log");
    let records: Vec<Value> = audit
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit record is JSON"))
        .collect();
    assert_eq!(records.len(), 1, "{audit}");
    let ban_time = records[0]["time"].as_str().expect("the record's time");
    assert_eq!(
        of_kind("ban"),
        json!({"time": ban_time, "kind": "ban", "subject": "203.0.113.7", "detail": "operator"})
    );
    let observed = of_kind("would_set_limits");
    assert_eq!(observed["subject"], cgroup.service());
    assert_eq!(observed["detail"], "");

    let top = Tmux::start(&format!(
        "{} top --socket {}",
        sentinel_bin().display(),
        daemon.control_socket().display()
    ));
    let clock = |time: &str| time[11..19].to_owned();
    let ban_line = format!("{} ban 203.0.113.7: operator", clock(ban_time));
    let observed_line = format!(
        "{} would_set_limits {}",
        clock(observed["time"].as_str().expect("a time")),
        cgroup.service()
    );
    let screen = top.await_screen("the events from before top started", |screen| {
        pane_events(screen).len() == 2
    });
    // Newest first: the reverse of the answer's order.
    let mut before = vec![ban_line, observed_line];
    if events[0]["kind"] == "ban" {
        before.reverse();
    }
    assert_eq!(pane_events(&screen), before, "{screen}");

    // Newer events come in on top, while top runs.
    assert_eq!(
        daemon.control(&["unban", "203.0.113.7"]),
        "unbanned 203.0.113.7\n"
    );
    assert_eq!(
        ask(&daemon, &["reload"]).stdout,
        "reloaded: ok, 1 policy in force\n"
    );
    let screen = top.await_screen("the unban and the reload", |screen| {
        pane_events(screen).len() == 4
    });
    let shown = pane_events(&screen);
    assert!(
        shown[0].ends_with(" reload sentinel reload: policies in force: 1"),
        "{screen}"
    );
    assert!(
        shown[1].ends_with(" unban 203.0.113.7: operator"),
        "{screen}"
    );
    assert_eq!(shown[2..], before, "{screen}");
    top.keys(&["q"]);
    assert!(eventually(WAIT, || !top.running()), "q did not quit top");
}

#[test]
fn exit_statuses_are_distinct_for_usage_unreachable_daemon_and_bad_configuration() {
    let dir = TempDir::new("sentinel-exit");
    for usage in [
        &["frobnicate"][..],
        &["ban", "192.0.2.7"],
        &["ban", "1.2.3", "--for", "1h"],
        &["top", "--once", "--json"],
        &["status", "--output", "yaml"],
    ] {
        let ran = sentinel(usage);
        assert_eq!(ran.code, 64, "{usage:?}: {}", ran.stderr);
    }
    let nowhere = dir.path().join("control.sock");
    let nowhere = nowhere.to_str().unwrap();
    for command in [
        &["status"][..],
        &["bans"],
        &["bans", "--output", "json"],
        &["reload"],
        &["top", "--json"],
        &["unban", "192.0.2.7"],
    ] {
        let mut args = command.to_vec();
        args.extend(["--socket", nowhere]);
        let ran = sentinel(&args);
        assert_eq!(ran.code, 69, "{command:?}: {}", ran.stderr);
        assert_eq!(
            ran.stderr,
            format!(
                "sentinel: error: cannot reach the sentinel daemon at {nowhere}: is it running? \
                 (start it with `sentinel run`)\n"
            )
        );
    }
    let bad = dir.path().join("bad.yaml");
    fs::write(&bad, "polices: []\n").unwrap();
    let bad = bad.to_str().unwrap();
    let problem =
        format!("{bad}:1:1: unknown top-level key \"polices\"; did you mean \"policies\"?");
    let checked = sentinel(&["check", bad]);
    assert_eq!(
        (checked.code, checked.stderr.trim_end()),
        (78, problem.as_str())
    );
    let checked = sentinel(&["check", "--output", "json", bad]);
    assert_eq!(checked.code, 78);
    assert_eq!(
        json_of(&checked),
        json!({"file": bad, "valid": false, "problems": [{"file": bad, "line": 1, "column": 1,
               "reason": "unknown top-level key \"polices\"; did you mean \"policies\"?"}]})
    );
    // The daemon refuses to start on it the same way, before touching anything.
    let port = format!("127.0.0.1:{}", free_port());
    let started = sentinel(&["run", "--config", bad, "--metrics-addr", &port]);
    assert_eq!(started.code, 78, "{}", started.stderr);
    assert!(started.stderr.contains(&problem), "{}", started.stderr);

    let help = sentinel(&["--help"]);
    assert_eq!(help.code, 0);
    for line in [
        "  64  the command line is wrong",
        "  69  the daemon cannot be reached",
        "  78  the configuration file is invalid",
    ] {
        assert!(
            help.stdout.contains(line),
            "{line:?} not in\n{}",
            help.stdout
        );
    }
    let man = sentinel(&["man"]);
    assert_eq!(man.code, 0);
    assert!(man.stdout.starts_with(".ie "), "{}", man.stdout);
    for text in [
        ".TH sentinel 1",
        "78  the configuration file is invalid",
        "status",
        "reload",
    ] {
        assert!(man.stdout.contains(text), "{text:?} not in the man page");
    }
}

#[test]
fn completion_scripts_name_every_command_and_bash_reads_its_own() {
    let dir = TempDir::new("sentinel-completions");
    for shell in ["bash", "zsh", "fish"] {
        let script = sentinel(&["completions", shell]);
        assert_eq!(script.code, 0, "{shell}: {}", script.stderr);
        for command in [
            "status", "top", "bans", "ban", "unban", "reload", "check", "run",
        ] {
            assert!(script.stdout.contains(command), "{shell} lacks {command}");
        }
        if shell == "bash" {
            let file = dir.path().join("sentinel.bash");
            fs::write(&file, &script.stdout).unwrap();
            let syntax = Command::new("bash").arg("-n").arg(&file).status().unwrap();
            assert!(syntax.success(), "bash -n refused the script");
        }
    }
}

/// Sends `request` exactly as given and returns the one-line answer.
fn exchange(socket: &Path, request: &[u8]) -> Value {
    let mut stream = UnixStream::connect(socket).expect("connect to the control socket");
    stream.write_all(request).expect("send the request");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("read the answer");
    serde_json::from_str(&answer).unwrap_or_else(|error| panic!("{error}: {answer:?}"))
}

#[test]
fn new_requests_are_root_only_bounded_and_malformed_ones_get_an_error() {
    let _serial = serial();
    let daemon = Daemon::start(&[]);
    let socket = daemon.control_socket();
    let malformed = |request: &str, expected: &str| {
        let answer = exchange(&socket, request.as_bytes());
        assert_eq!(answer["ok"], false, "{request}");
        let error = answer["error"].as_str().unwrap_or_default();
        assert!(error.starts_with(expected), "{request}: {error}");
    };
    malformed(
        "{\"command\":\"status\",\"verbose\":true}\n",
        "malformed request: unknown field `verbose`",
    );
    malformed(
        "{\"command\":\"stats\"\n",
        "malformed request: EOF while parsing",
    );
    malformed(
        "{\"command\":\"reload\",\"file\":\"/etc/shadow\"}\n",
        "malformed request: unknown field `file`",
    );
    malformed(
        "{\"command\":\"ban\",\"address\":\"10.0.0.0/33\",\"for_seconds\":60}\n",
        "malformed request: prefix length /33 is too long",
    );
    let padding = "x".repeat(5000);
    malformed(
        &format!("{{\"command\":\"stats\",\"padding\":\"{padding}\"}}\n"),
        "request too long: the limit is 4096 bytes",
    );
    // A client that never finishes its request is answered when its time is up.
    malformed(
        "{\"command\":\"status\"",
        "timed out waiting for the request",
    );

    // Other users: refused by the daemon even with the socket opened up, and nothing reloaded.
    fs::set_permissions(&socket, fs::Permissions::from_mode(0o666)).unwrap();
    let socket_arg = socket.to_str().unwrap();
    for command in [&["status"][..], &["top", "--json"], &["reload"]] {
        let mut args = command.to_vec();
        args.extend(["--socket", socket_arg]);
        let refused = sentinel_as(65534, &args);
        assert_eq!(refused.code, 1, "{command:?}");
        assert_eq!(
            refused.stderr,
            "sentinel: error: permission denied: root only\n"
        );
    }
    let status = json_of(&ask(&daemon, &["status", "--output", "json"]));
    assert_eq!(status["last_reload"], Value::Null);
    assert_eq!(exchange(&socket, b"{\"command\":\"stats\"}\n")["ok"], true);
}
