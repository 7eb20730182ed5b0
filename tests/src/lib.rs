//! Harness for the privileged tests: a real daemon, real cgroups, real scrapes.

pub mod floor;
pub mod lapi;
pub mod measure;
pub mod netlab;
pub mod sshlab;

use std::{
    collections::BTreeSet,
    fs::{self, File},
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpListener, TcpStream},
    os::unix::process::CommandExt,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Output, Stdio},
    sync::{Mutex, MutexGuard},
    time::{Duration, Instant},
};

/// The daemon under test: `SENTINEL_BIN`, or `sentinel` in the test's target directory.
pub fn sentinel_bin() -> PathBuf {
    target_binary("sentinel", "SENTINEL_BIN")
}

/// This package's workload helper: `SENTINEL_TESTKIT`, or from the target directory.
pub fn testkit_bin() -> PathBuf {
    target_binary("sentinel-testkit", "SENTINEL_TESTKIT")
}

fn target_binary(name: &str, override_env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(override_env) {
        return path.into();
    }
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let candidate = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join(name));
    match candidate {
        Some(path) if path.exists() => path,
        _ => panic!(
            "{name} was not found next to {}; run the suite with `cargo xtask test` or set \
             {override_env}",
            exe.display()
        ),
    }
}

/// Tests that load eBPF programs or count them run one at a time.
pub fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let path = std::env::temp_dir().join(format!("{}-{}", tag, unique_suffix()));
        fs::create_dir_all(&path).expect("create temp dir");
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

pub fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!(
        "{}-{}-{nanos}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// A port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// A running `sentinel run`, stopped (SIGKILL) on drop if the test did not stop it.
pub struct Daemon {
    child: Child,
    pub addr: SocketAddr,
    dir: TempDir,
}

/// A configuration that keeps the daemon off the machine's own firewall: tests that ban do
/// so in network namespaces they create.
pub const NO_FIREWALL: &str = "ssh_guard:\n  enabled: false\n";

impl Daemon {
    /// Starts the daemon with the SSH guard off and waits until `/metrics` answers.
    pub fn start(env: &[(&str, &str)]) -> Self {
        Self::start_with_config(NO_FIREWALL, env)
    }

    /// Starts the daemon with `config` (YAML) and waits until `/metrics` answers.
    pub fn start_with_config(config: &str, env: &[(&str, &str)]) -> Self {
        let daemon = Self::spawn_with_config(free_port(), config, env);
        daemon.wait_ready();
        daemon
    }

    /// Starts the daemon with the SSH guard off, without waiting for it.
    pub fn spawn(port: u16, env: &[(&str, &str)]) -> Self {
        Self::spawn_with_config(port, NO_FIREWALL, env)
    }

    /// Starts the daemon without waiting for it; its state lives in its own directory.
    pub fn spawn_with_config(port: u16, config_text: &str, env: &[(&str, &str)]) -> Self {
        Self::spawn_command(port, config_text, env, None, |_| {})
    }

    /// Starts the daemon with `config` and its state in `state_dir` (kept across daemons by
    /// the caller), and waits until `/metrics` answers.
    pub fn start_with_state(config: &str, state_dir: &Path) -> Self {
        let daemon = Self::spawn_command(free_port(), config, &[], Some(state_dir), |_| {});
        daemon.wait_ready();
        daemon
    }

    /// Starts the daemon with `config` (YAML) under an open-file limit of `soft` and `hard`
    /// descriptors, as a service manager would set it, and waits until `/metrics` answers.
    pub fn start_with_open_files_limit(config: &str, soft: u64, hard: u64) -> Self {
        let limit = libc::rlimit {
            rlim_cur: soft,
            rlim_max: hard,
        };
        let daemon = Self::spawn_command(free_port(), config, &[], None, |command| {
            // SAFETY: only setrlimit(2), async-signal-safe, runs between fork and exec.
            unsafe {
                command.pre_exec(move || {
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0 {
                        Ok(())
                    } else {
                        Err(std::io::Error::last_os_error())
                    }
                });
            }
        });
        daemon.wait_ready();
        daemon
    }

    /// Spawns the daemon; its state lives in `state_dir`, or in its own directory.
    fn spawn_command(
        port: u16,
        config_text: &str,
        env: &[(&str, &str)],
        state_dir: Option<&Path>,
        adjust: impl FnOnce(&mut Command),
    ) -> Self {
        let dir = TempDir::new("sentinel-daemon");
        let state_dir = state_dir.map_or_else(|| dir.path().join("state"), Path::to_path_buf);
        let config = dir.path().join("sentinel.yaml");
        fs::write(&config, config_text).expect("write config");
        let log = File::create(dir.path().join("daemon.log")).expect("create log");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut command = Command::new(sentinel_bin());
        command
            .args(["run", "--log-format", "json", "--config"])
            .arg(&config)
            .arg("--metrics-addr")
            .arg(addr.to_string())
            .arg("--control-socket")
            .arg(dir.path().join("control.sock"))
            .arg("--state-dir")
            .arg(state_dir)
            .env("SENTINEL_LOG", "info")
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("clone log"))
            .stderr(log);
        adjust(&mut command);
        let child = command.spawn().expect("spawn sentinel");
        Self { child, addr, dir }
    }

    /// The daemon's control socket, for `sentinel bans|ban|unban --socket`.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// `sentinel ARGS --socket SOCKET` (`bans`, `ban`, `unban`) against this daemon.
    pub fn control_output(&self, args: &[&str]) -> Output {
        Command::new(sentinel_bin())
            .args(args)
            .arg("--socket")
            .arg(self.control_socket())
            .output()
            .expect("run the sentinel client")
    }

    /// `control_output` of a command that must succeed; returns what it printed.
    pub fn control(&self, args: &[&str]) -> String {
        let output = self.control_output(args);
        assert!(
            output.status.success(),
            "sentinel {args:?} failed: {}\ndaemon log:\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.log()
        );
        String::from_utf8(output.stdout).expect("UTF-8")
    }

    /// The configuration file the daemon was started with (tests rewrite it to reload).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.yaml")
    }

    /// Waits until `/metrics` answers and the daemon has logged that it runs: the server may
    /// answer a moment before that line is written.
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if http_get(self.addr, "/metrics", None).is_ok()
                && !self
                    .log_records(&[("message", "sentinel is running")])
                    .is_empty()
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "sentinel did not serve /metrics and say it runs within 20 s; log:\n{}",
            self.log()
        );
    }

    pub fn log(&self) -> String {
        fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The log records of refused reloads (`configuration rejected ...`), oldest first.
    pub fn rejected_reloads(&self) -> Vec<serde_json::Value> {
        self.log_records(&[])
            .into_iter()
            .filter(|record| {
                record["message"]
                    .as_str()
                    .is_some_and(|message| message.starts_with("configuration rejected"))
            })
            .collect()
    }

    /// JSON log records whose fields match every `(key, value)` pair.
    pub fn log_records(&self, matching: &[(&str, &str)]) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| {
                matching
                    .iter()
                    .all(|(key, value)| record.get(key).and_then(|v| v.as_str()) == Some(value))
            })
            .collect()
    }

    pub fn scrape(&self) -> Scrape {
        Scrape(http_get(self.addr, "/metrics", None).expect("scrape /metrics"))
    }

    /// Waits until the series `name{labels}` counts `expected`; fails with the last value seen
    /// and the daemon's log after `limit`, which is a hang guard, not a timing.
    pub fn await_count(&self, name: &str, labels: &[(&str, &str)], expected: u64, limit: Duration) {
        let mut seen = None;
        let reached = eventually(limit, || {
            seen = self.scrape().find(name, labels);
            seen == Some(expected as f64)
        });
        assert!(
            reached,
            "{} is {seen:?} after {limit:?}, not {expected}; log:\n{}",
            series(name, labels),
            self.log()
        );
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: plain syscall on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.child.id() as i32, signal) }, 0);
    }

    /// Waits for the daemon to exit by itself, up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<(ExitStatus, Duration)> {
        let started = Instant::now();
        while started.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some((status, started.elapsed()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        None
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A minimal HTTP/1.1 GET; returns the body. `accept` sets the Accept header.
pub fn http_get(addr: SocketAddr, path: &str, accept: Option<&str>) -> std::io::Result<String> {
    let mut response = Vec::new();
    let body = http_get_into(addr, path, accept, &mut response)?;
    String::from_utf8(response.split_off(body))
        .map_err(|_| std::io::Error::other("the body is not UTF-8"))
}

/// [`http_get`] into `response`, a buffer kept between requests (as a scraper keeps one, so
/// that a bench times the server rather than its own allocations); returns where the body
/// starts in it. A chunked body is decoded as it is read; one cut off before its last chunk is
/// an error.
pub fn http_get_into(
    addr: SocketAddr,
    path: &str,
    accept: Option<&str>,
    response: &mut Vec<u8>,
) -> std::io::Result<usize> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let accept = accept
        .map(|a| format!("Accept: {a}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{accept}Connection: close\r\n\r\n"
    )?;
    response.clear();
    let mut reader = BufReader::new(stream);
    loop {
        let line_start = response.len();
        if reader.read_until(b'\n', response)? == 0 {
            return Err(std::io::Error::other("malformed HTTP response"));
        }
        if response[line_start..] == *b"\r\n" {
            break;
        }
    }
    let body_start = response.len();
    let head = String::from_utf8_lossy(&response[..body_start]);
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("HTTP error: {head}")));
    }
    let chunked = head
        .lines()
        .any(|line| line.eq_ignore_ascii_case("transfer-encoding: chunked"));
    if chunked {
        read_chunked(&mut reader, response)?;
    } else {
        reader.read_to_end(response)?;
    }
    Ok(body_start)
}

/// Appends a chunked body's data to `body`, up to its last (empty) chunk.
fn read_chunked(reader: &mut impl BufRead, body: &mut Vec<u8>) -> std::io::Result<()> {
    let malformed = || std::io::Error::other("malformed or incomplete chunked body");
    let mut line = String::new();
    loop {
        line.clear();
        reader.read_line(&mut line)?;
        let size = line
            .strip_suffix("\r\n")
            .and_then(|line| usize::from_str_radix(line.split(';').next()?.trim(), 16).ok())
            .ok_or_else(malformed)?;
        let read = reader.take(size as u64).read_to_end(body)?;
        if read != size {
            return Err(malformed());
        }
        let mut end = [0u8; 2];
        reader.read_exact(&mut end).map_err(|_| malformed())?;
        if end != *b"\r\n" {
            return Err(malformed());
        }
        if size == 0 {
            return Ok(());
        }
    }
}

/// One scrape of `/metrics` in the classic text format. A series that must exist must be found:
/// `value` and `count` fail on an absent series, `find` says "maybe" (for waiting), and
/// `assert_absent` checks a series that must not be there (a labelled counter that never counted).
pub struct Scrape(pub String);

impl Scrape {
    /// The value of the sample `name{labels}`, with labels given in exposition order; `None`
    /// when it is not exported (yet), for waiting until it appears.
    pub fn find(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let series = series(name, labels);
        self.0.lines().find_map(|line| {
            let (key, value) = line.rsplit_once(' ')?;
            (key == series).then(|| value.parse().ok())?
        })
    }

    /// The value of `name{labels}`; an absent series fails the test.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.find(name, labels).unwrap_or_else(|| {
            panic!(
                "no series {} in the scrape:\n{}",
                series(name, labels),
                self.0
            )
        })
    }

    /// `value` of a series that counts things: a whole number.
    pub fn count(&self, name: &str, labels: &[(&str, &str)]) -> u64 {
        let value = self.value(name, labels);
        assert!(
            value >= 0.0 && value.fract() == 0.0,
            "{} is {value}, not a count",
            series(name, labels)
        );
        value as u64
    }

    /// Fails if the series `name{labels}` is exported. Labelled counters get a series when they
    /// first count (a family with none is not exported at all), so this is how "never counted"
    /// is checked; the same names must be found by the tests' other assertions.
    pub fn assert_absent(&self, name: &str, labels: &[(&str, &str)]) {
        if let Some(value) = self.find(name, labels) {
            panic!(
                "{} is exported ({value}), expected none",
                series(name, labels)
            );
        }
    }
}

/// `name{key="value",...}` as the text format writes it.
fn series(name: &str, labels: &[(&str, &str)]) -> String {
    if labels.is_empty() {
        return name.to_string();
    }
    let rendered: Vec<String> = labels
        .iter()
        .map(|(key, value)| format!("{key}=\"{value}\""))
        .collect();
    format!("{name}{{{}}}", rendered.join(","))
}

/// A child cgroup under the cgroup2 mount, removed on drop (its processes are killed first).
pub struct TestCgroup {
    path: PathBuf,
    service: String,
}

impl TestCgroup {
    pub fn new(tag: &str) -> Self {
        let root = cgroup2_mount();
        let name = format!("sentinel-test-{tag}-{}", unique_suffix());
        let path = root.join(&name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path,
            service: name,
        }
    }

    /// A cgroup named `name` inside this one (say `web.service`), removed on drop; drop it
    /// before its parent.
    pub fn child(&self, name: &str) -> Self {
        let path = self.path.join(name);
        fs::create_dir(&path).unwrap_or_else(|e| panic!("mkdir {}: {e}", path.display()));
        Self {
            path,
            service: format!("{}/{name}", self.service),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `service` label Sentinel gives this cgroup.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// A command that moves itself into this cgroup before it execs.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        let mut command = Command::new(program);
        // SAFETY: only a write(2) on an already open descriptor runs between fork and exec.
        unsafe {
            command.pre_exec(move || procs.write_all(b"0"));
        }
        command
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        if let Ok(procs) = fs::read_to_string(self.path.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|pid| pid.parse::<i32>().ok()) {
                // SAFETY: plain syscall.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while fs::remove_dir(&self.path).is_err() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The cgroup2 mount point, from /proc/self/mountinfo.
pub fn cgroup2_mount() -> PathBuf {
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read mountinfo");
    info.lines()
        .find_map(|line| {
            let (mount, fs_type) = line.split_once(" - ")?;
            let fields: Vec<&str> = mount.split_whitespace().collect();
            (fs_type.starts_with("cgroup2 ") && fields.get(3) == Some(&"/"))
                .then(|| PathBuf::from(fields[4]))
        })
        .expect("no cgroup2 mount in /proc/self/mountinfo")
}

/// Ids of loaded eBPF programs whose name starts with `sentinel_`.
pub fn loaded_sentinel_programs() -> BTreeSet<u32> {
    aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .filter(|program| {
            program
                .name_as_str()
                .is_some_and(|name| name.starts_with("sentinel_"))
        })
        .map(|program| program.id())
        .collect()
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held.
pub fn eventually(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// `promtool check metrics` on a scrape must report nothing. `SENTINEL_PROMTOOL` names it
/// (`cargo xtask test` unpacks it from Debian's prometheus package); in the VM it is on PATH.
pub fn assert_promtool_clean(scrape: &Scrape) {
    let promtool = std::env::var("SENTINEL_PROMTOOL").unwrap_or_else(|_| "promtool".into());
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("run {promtool} (Debian package prometheus): {e}"));
    check
        .stdin
        .take()
        .expect("promtool's stdin")
        .write_all(scrape.0.as_bytes())
        .expect("write the scrape to promtool");
    let output = check.wait_with_output().expect("wait for promtool");
    let complaints =
        String::from_utf8_lossy(&output.stdout) + String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success() && complaints.trim().is_empty(),
        "promtool: {complaints}\nscrape:\n{}",
        scrape.0
    );
}

/// The records of an audit log, one JSON object a line; none while it does not exist.
pub fn audit_records(path: &Path) -> Vec<serde_json::Value> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|line| serde_json::from_str(line).expect("an audit record is one JSON object"))
        .collect()
}

/// Milliseconds since the epoch of a timestamp like `2026-11-21T15:04:05.123Z`.
pub fn rfc3339_millis(text: &str) -> i64 {
    let field = |range: std::ops::Range<usize>| -> i64 {
        text[range]
            .parse()
            .unwrap_or_else(|_| panic!("{text:?} is not an audit timestamp"))
    };
    let (year, month, day) = (field(0..4), field(5..7), field(8..10));
    // Days since 1970-01-01 of a Gregorian date (Howard Hinnant's days_from_civil).
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let day_of_year = (153 * (month + if month > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    let days = era * 146_097 + day_of_era - 719_468;
    let seconds = ((days * 24 + field(11..13)) * 60 + field(14..16)) * 60 + field(17..19);
    seconds * 1000 + field(20..23)
}

#[cfg(test)]
mod tests {
    use super::read_chunked;

    #[test]
    fn a_chunked_body_is_decoded_and_a_cut_one_refused() {
        let mut body = b"kept".to_vec();
        read_chunked(
            &mut &b"5\r\nhello\r\n1;x=y\r\n!\r\n0\r\n\r\n"[..],
            &mut body,
        )
        .unwrap();
        assert_eq!(body, b"kepthello!");
        for cut in [
            &b"5\r\nhello\r\n"[..],
            b"9\r\nhello\r\n0\r\n\r\n",
            b"5\r\nhelloXX",
        ] {
            assert!(read_chunked(&mut &cut[..], &mut Vec::new()).is_err());
        }
    }
}
