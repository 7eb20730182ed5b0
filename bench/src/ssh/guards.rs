//! The three guards, one at a time against the same sshd: Sentinel, and Debian's fail2ban and
//! sshguard run by hand in the foreground with configuration files of the bench's own (no
//! /etc configuration and no system service is used), their nftables backends working inside
//! the server namespace in tables of their own. Each runs in a cgroup of its own, which
//! accounts the CPU of every process it starts, short-lived `nft` commands included.

use std::{
    fs::{self, File},
    net::SocketAddr,
    os::unix::fs::symlink,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use sentinel_tests::{TestCgroup, netlab::Netns};

use super::lab::ALLOWED_NETWORK;
use crate::{
    interrupt,
    system::process_usage,
    tools::{free_loopback_address, sample, scrape},
};

/// The thresholds every guard gets: a ban at the fifth failure within ten minutes, for 60 s.
pub const MAX_FAILURES: u32 = 5;
const WINDOW_SECONDS: u32 = 600;
const BAN_SECONDS: u32 = 60;
/// sshguard scores attacks instead of counting them: 10 for a failed password, 2 for the
/// "Connection closed by authenticating user" line sshd writes after it. Four failed logins
/// make 48; the fifth failed password makes 58.
const SSHGUARD_THRESHOLD: u32 = 50;
const SSHGUARD_LIBEXEC: &str = "/usr/libexec/sshguard";
/// fail2ban's own table in the server namespace.
const FAIL2BAN_TABLE: &str = "f2b-sentinel-bench";
/// The probes the attack needs (`program` labels of `sentinel_probe_attached`).
const SENTINEL_SSH_PROBES: [&str; 4] = [
    "ssh_pam_rhost",
    "ssh_pam_call",
    "ssh_auth_result",
    "ssh_preauth_end",
];
/// The port-scan probe (its `program` label).
const SENTINEL_SCAN_PROBE: &str = "port_scan";
/// psad's danger level 2 is 15 packets from one address (level 3 is 150): the nearest to
/// Sentinel's 20 distinct closed ports. Its auto IDS blocks from this level on.
pub const PSAD_DANGER_LEVEL: u32 = 2;
const READY_TIMEOUT: Duration = Duration::from_secs(30);
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Sentinel,
    Fail2ban,
    Sshguard,
    /// Port scans only: reads the kernel's log of packets an nftables `log` rule logged.
    Psad,
}

impl Guard {
    pub const PEERS: [Self; 2] = [Self::Fail2ban, Self::Sshguard];

    pub fn label(self) -> &'static str {
        match self {
            Self::Sentinel => "Sentinel",
            Self::Fail2ban => "fail2ban",
            Self::Sshguard => "sshguard",
            Self::Psad => "psad",
        }
    }

    /// Names its files.
    pub fn stem(self) -> &'static str {
        match self {
            Self::Sentinel => "sentinel",
            Self::Fail2ban => "fail2ban",
            Self::Sshguard => "sshguard",
            Self::Psad => "psad",
        }
    }

    /// The `FAMILY NAME` of the table its bans go to, as `nft monitor` names it.
    pub fn table(self) -> String {
        match self {
            Self::Sentinel => "inet sentinel".to_owned(),
            Self::Fail2ban => format!("inet {FAIL2BAN_TABLE}"),
            Self::Sshguard => "ip sshguard".to_owned(),
            // Its iptables commands, through iptables-nft.
            Self::Psad => "ip filter".to_owned(),
        }
    }
}

/// Sentinel's SSH guard settings that differ between the attack and the flood.
pub struct SentinelSettings {
    pub max_failures: u32,
    pub ban_seconds: u32,
    pub max_tracked: usize,
    pub max_banned: usize,
    /// A program that calls libpam as sshd does, to be trusted like sshd (the flood's feeder).
    pub feeder: Option<PathBuf>,
    /// `port_scan: {mode: enforce}` with its defaults, and its probe awaited at start.
    pub port_scan: bool,
}

impl SentinelSettings {
    /// The same thresholds as the peers; the tables' bounds as shipped.
    pub const ATTACK: Self = Self {
        max_failures: MAX_FAILURES,
        ban_seconds: BAN_SECONDS,
        max_tracked: 100_000,
        max_banned: 100_000,
        feeder: None,
        port_scan: false,
    };

    /// The attack's settings, with port scans detected and banned.
    pub const SCAN: Self = Self {
        port_scan: true,
        ..Self::ATTACK
    };

    fn yaml(&self, server: &Netns, audit_log: &Path) -> String {
        let sshd_paths = match &self.feeder {
            Some(feeder) => format!("  sshd_paths: [/usr/sbin/sshd, {}]\n", feeder.display()),
            None => String::new(),
        };
        let port_scan = if self.port_scan {
            "port_scan:\n  mode: enforce\n"
        } else {
            ""
        };
        format!(
            "ssh_guard:
  enabled: true
  mode: enforce
  max_failures: {}
  window: {WINDOW_SECONDS}s
  ban_for: {}s
  allow: [{ALLOWED_NETWORK}]
  max_tracked: {}
  max_banned: {}
  # Each run starts from an empty set.
  flush_on_exit: true
  audit_log: {}
  netns: {}
{sshd_paths}{port_scan}",
            self.max_failures,
            self.ban_seconds,
            self.max_tracked,
            self.max_banned,
            audit_log.display(),
            server.path().display()
        )
    }
}

/// Where a guard finds what it needs.
pub struct GuardSetup<'a> {
    /// Sentinel's binary.
    pub daemon: &'a Path,
    pub server: &'a Netns,
    /// The bench's directory for this section; each guard writes under a directory of its own.
    pub dir: &'a Path,
}

/// CPU and memory of a guard's processes.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    /// User plus system time of every process the cgroup has held.
    pub cpu_seconds: f64,
    /// Summed over the processes alive now.
    pub rss_kib: u64,
    /// Each live process's peak, summed.
    pub hwm_kib: u64,
}

/// A started guard; stopped with SIGTERM by `stop`, killed with its cgroup on drop.
pub struct RunningGuard {
    guard: Guard,
    main: Child,
    cgroup: TestCgroup,
    /// Sentinel's /metrics.
    metrics: Option<SocketAddr>,
    /// The guard's standard output and error.
    output: PathBuf,
}

impl RunningGuard {
    /// Starts a peer reading `sshd_log`, or Sentinel with the attack's settings.
    pub fn start(guard: Guard, setup: &GuardSetup, sshd_log: &Path) -> Result<Self> {
        match guard {
            Guard::Sentinel => Self::sentinel(setup, &SentinelSettings::ATTACK, "sentinel"),
            Guard::Fail2ban => Self::fail2ban(setup, sshd_log),
            Guard::Sshguard => Self::sshguard(setup, sshd_log),
            Guard::Psad => bail!("psad reads no SSH log: it is started with a kernel log"),
        }
    }

    /// Sentinel with `settings`, its files under `name/`.
    pub fn sentinel(setup: &GuardSetup, settings: &SentinelSettings, name: &str) -> Result<Self> {
        let dir = guard_dir(setup, name)?;
        let config = dir.join("sentinel.yaml");
        let yaml = settings.yaml(setup.server, &dir.join("audit.log"));
        fs::write(&config, yaml).with_context(|| format!("cannot write {}", config.display()))?;
        let metrics = free_loopback_address()?;
        let cgroup = TestCgroup::new("bench-sentinel");
        let mut command = cgroup.command(setup.daemon);
        command
            .arg("run")
            .arg("--config")
            .arg(&config)
            .arg("--metrics-addr")
            .arg(metrics.to_string())
            .arg("--control-socket")
            .arg(dir.join("sentinel.sock"))
            .arg("--state-dir")
            .arg(dir.join("state"));
        let mut running = Self::spawn(Guard::Sentinel, command, cgroup, &dir)?;
        running.metrics = Some(metrics);
        running.wait_ready(|| {
            let Ok(metrics) = scrape(metrics) else {
                return Ok(false);
            };
            let scan_probe = settings.port_scan.then_some(SENTINEL_SCAN_PROBE);
            for probe in SENTINEL_SSH_PROBES.into_iter().chain(scan_probe) {
                let series = format!("sentinel_probe_attached{{program=\"{probe}\"}}");
                ensure!(
                    sample::<u64>(&metrics, &series) == Some(1),
                    "Sentinel's {probe} probe is not attached"
                );
            }
            Ok(has_table(setup.server, Guard::Sentinel))
        })?;
        Ok(running)
    }

    /// fail2ban's server in the foreground, with Debian's sshd filter and nftables action.
    fn fail2ban(setup: &GuardSetup, sshd_log: &Path) -> Result<Self> {
        let dir = guard_dir(setup, Guard::Fail2ban.stem())?;
        let log = dir.join("fail2ban.log");
        write_fail2ban_config(&dir, &log, sshd_log)?;
        let cgroup = TestCgroup::new("bench-fail2ban");
        let mut command = in_namespace(&cgroup, setup.server, "fail2ban-server");
        // -x: start even if a killed earlier run left its socket behind.
        command.args(["-f", "-x", "-c"]).arg(&dir);
        let running = Self::spawn(Guard::Fail2ban, command, cgroup, &dir)?;
        // fail2ban creates its table with the first ban, not at start.
        running.wait_ready(|| {
            Ok(fs::read_to_string(&log).is_ok_and(|log| log.contains("Jail 'sshd' started")))
        })?;
        Ok(running)
    }

    /// The pipeline Debian's `sshguard` script builds, without its /etc configuration:
    /// log tail | parser | blocker | nftables backend.
    fn sshguard(setup: &GuardSetup, sshd_log: &Path) -> Result<Self> {
        let dir = guard_dir(setup, Guard::Sshguard.stem())?;
        let cgroup = TestCgroup::new("bench-sshguard");
        let mut command = in_namespace(&cgroup, setup.server, "sh");
        command
            .arg("-c")
            .arg(format!(
                "{SSHGUARD_LIBEXEC}/sshg-logtail \"$1\" | {SSHGUARD_LIBEXEC}/sshg-parser \
                 | {SSHGUARD_LIBEXEC}/sshg-blocker -a {SSHGUARD_THRESHOLD} -p {BAN_SECONDS} \
                 -s {WINDOW_SECONDS} -w {ALLOWED_NETWORK} | {SSHGUARD_LIBEXEC}/sshg-fw-nft-sets"
            ))
            .arg("sshguard")
            .arg(sshd_log);
        let running = Self::spawn(Guard::Sshguard, command, cgroup, &dir)?;
        running.wait_ready(|| {
            Ok(has_table(setup.server, Guard::Sshguard) && running.has_open(sshd_log))
        })?;
        Ok(running)
    }

    /// Debian's psad in the foreground, reading `kernel_log` (syslog lines of the packets the
    /// server namespace logs), with its auto IDS blocking through iptables-nft in the server
    /// namespace. Debian's configuration, changed only where this file says.
    pub fn psad(setup: &GuardSetup, kernel_log: &Path) -> Result<Self> {
        let dir = guard_dir(setup, Guard::Psad.stem())?;
        let config = dir.join("psad.conf");
        write_psad_config(&dir, &config, kernel_log)?;
        let cgroup = TestCgroup::new("bench-psad");
        let mut command = in_namespace(&cgroup, setup.server, "psad");
        command.args(["--no-daemon", "-c"]).arg(&config);
        let running = Self::spawn(Guard::Psad, command, cgroup, &dir)?;
        running.wait_ready(|| Ok(running.has_open(kernel_log)))?;
        Ok(running)
    }

    fn spawn(guard: Guard, mut command: Command, cgroup: TestCgroup, dir: &Path) -> Result<Self> {
        let output = dir.join("output.log");
        let file =
            File::create(&output).with_context(|| format!("cannot create {}", output.display()))?;
        let main = command
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {}", guard.label()))?;
        Ok(Self {
            guard,
            main,
            cgroup,
            metrics: None,
            output,
        })
    }

    fn wait_ready(&self, mut ready: impl FnMut() -> Result<bool>) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            interrupt::check()?;
            ensure!(
                self.pids()?.contains(&self.main.id()),
                "{} exited at start; see {}",
                self.guard.label(),
                self.output.display()
            );
            if ready()? {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "{} was not ready within {READY_TIMEOUT:?}; see {}",
                self.guard.label(),
                self.output.display()
            );
            thread::sleep(POLL);
        }
    }

    fn pids(&self) -> Result<Vec<u32>> {
        let procs = self.cgroup.path().join("cgroup.procs");
        let listing = fs::read_to_string(&procs)
            .with_context(|| format!("cannot read {}", procs.display()))?;
        Ok(listing.lines().filter_map(|pid| pid.parse().ok()).collect())
    }

    /// Whether one of the guard's processes has `path` open (sshguard's `tail` has started
    /// following the log).
    fn has_open(&self, path: &Path) -> bool {
        self.pids().unwrap_or_default().iter().any(|pid| {
            fs::read_dir(format!("/proc/{pid}/fd")).is_ok_and(|descriptors| {
                descriptors
                    .filter_map(Result::ok)
                    .any(|descriptor| fs::read_link(descriptor.path()).is_ok_and(|p| p == path))
            })
        })
    }

    pub fn usage(&self) -> Result<Usage> {
        let stat_path = self.cgroup.path().join("cpu.stat");
        let stat = fs::read_to_string(&stat_path)
            .with_context(|| format!("cannot read {}", stat_path.display()))?;
        let usage_usec: f64 = stat
            .lines()
            .find_map(|line| line.strip_prefix("usage_usec "))
            .and_then(|value| value.parse().ok())
            .with_context(|| format!("{} has no usage_usec", stat_path.display()))?;
        let mut usage = Usage {
            cpu_seconds: usage_usec / 1e6,
            rss_kib: 0,
            hwm_kib: 0,
        };
        // A short-lived child (an `nft` command) may be gone by the time it is read.
        for process in self
            .pids()?
            .into_iter()
            .filter_map(|pid| process_usage(pid).ok())
        {
            usage.rss_kib += process.rss_kib;
            usage.hwm_kib += process.hwm_kib;
        }
        Ok(usage)
    }

    /// Sentinel's /metrics; `None` for the peers.
    pub fn metrics(&self) -> Result<Option<String>> {
        self.metrics.map(scrape).transpose()
    }

    /// SIGTERM to every process of the guard, so that each removes its table; then waits.
    pub fn stop(self) -> Result<()> {
        for pid in self.pids()? {
            // SAFETY: kill has no memory-safety preconditions; the pid is in this guard's
            // cgroup, which only the guard's processes can be in.
            unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
        }
        let deadline = Instant::now() + STOP_TIMEOUT;
        while !self.pids()?.is_empty() {
            if Instant::now() >= deadline {
                bail!(
                    "{} did not stop within {STOP_TIMEOUT:?} of SIGTERM",
                    self.guard.label()
                );
            }
            thread::sleep(POLL);
        }
        Ok(())
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        // The cgroup kills whatever is left; this reaps the main process.
        if matches!(self.main.try_wait(), Ok(None)) {
            let _ = self.main.kill();
        }
        let _ = self.main.wait();
    }
}

/// A guard's own directory, emptied: each start begins without the state, audit log or
/// output of an earlier run (remembered offenders would make every ban a repeat offense).
fn guard_dir(setup: &GuardSetup, name: &str) -> Result<PathBuf> {
    let dir = setup.dir.join(name);
    match fs::remove_dir_all(&dir) {
        Err(error) if error.kind() != std::io::ErrorKind::NotFound => {
            return Err(error).with_context(|| format!("cannot empty {}", dir.display()));
        }
        _ => {}
    }
    fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// `program` run inside the server namespace, as a member of `cgroup`.
fn in_namespace(cgroup: &TestCgroup, server: &Netns, program: &str) -> Command {
    let mut command = cgroup.command("ip");
    command.args(["netns", "exec", server.name(), program]);
    command
}

fn has_table(server: &Netns, guard: Guard) -> bool {
    server
        .nft(&["list", "tables"], "")
        .lines()
        .any(|line| line.trim() == format!("table {}", guard.table()))
}

/// A configuration directory of the bench's own: fail2ban.conf and jail.conf written here,
/// Debian's filters and actions read from /etc/fail2ban (and never changed).
fn write_fail2ban_config(dir: &Path, log: &Path, sshd_log: &Path) -> Result<()> {
    for shared in ["filter.d", "action.d"] {
        let link = dir.join(shared);
        if !link.exists() {
            symlink(Path::new("/etc/fail2ban").join(shared), &link)
                .with_context(|| format!("cannot link {}", link.display()))?;
        }
    }
    let server_conf = format!(
        "[Definition]
loglevel = INFO
logtarget = {}
syslogsocket = auto
socket = {}
pidfile = {}
allowipv6 = auto
# Nothing carries over between runs: no repeat offenders from an earlier bench.
dbfile = :memory:
dbpurgeage = 1d
",
        log.display(),
        dir.join("fail2ban.sock").display(),
        dir.join("fail2ban.pid").display()
    );
    // pyinotify: woken by each write, as the Debian package does when python3-pyinotify is
    // installed (the polling backend would look once a second). blocktype drop: packets are
    // dropped as by the other guards, not rejected.
    let jail_conf = format!(
        "[DEFAULT]
ignoreip = {ALLOWED_NETWORK}
maxretry = {MAX_FAILURES}
findtime = {WINDOW_SECONDS}
bantime = {BAN_SECONDS}
backend = pyinotify
usedns = no

[sshd]
enabled = true
filter = sshd
logpath = {}
action = nftables-allports[name=sshd, table={FAIL2BAN_TABLE}, blocktype=drop]
",
        sshd_log.display()
    );
    for (name, text) in [("fail2ban.conf", server_conf), ("jail.conf", jail_conf)] {
        let path = dir.join(name);
        fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(())
}

/// Debian's /etc/psad/psad.conf with these values instead (`NAME value;` lines).
fn write_psad_config(dir: &Path, config: &Path, kernel_log: &Path) -> Result<()> {
    let mut state_dirs = Vec::new();
    for name in ["log", "run", "lib"] {
        let state = dir.join(name);
        fs::create_dir_all(&state).with_context(|| format!("cannot create {}", state.display()))?;
        state_dirs.push(state.display().to_string());
    }
    let kernel_log = kernel_log.display().to_string();
    let danger_level = PSAD_DANGER_LEVEL.to_string();
    let changes: [(&str, &str); 13] = [
        ("HOSTNAME", "sentinel-bench"),
        ("IPT_SYSLOG_FILE", &kernel_log),
        ("PSAD_DIR", &state_dirs[0]),
        ("PSAD_RUN_DIR", &state_dirs[1]),
        ("PSAD_FIFO_DIR", &state_dirs[2]),
        // It would look for LOG rules in the root namespace's iptables.
        ("ENABLE_FW_LOGGING_CHECK", "N"),
        // Nothing leaves the machine: no mail, no lookups.
        ("ALERTING_METHODS", "noemail"),
        ("ENABLE_AUTO_IDS_EMAILS", "N"),
        ("ENABLE_DNS_LOOKUPS", "N"),
        ("ENABLE_WHOIS_LOOKUPS", "N"),
        ("ENABLE_AUTO_IDS", "Y"),
        ("AUTO_IDS_DANGER_LEVEL", &danger_level),
        ("AUTO_BLOCK_TIMEOUT", "60"),
    ];
    let stock = "/etc/psad/psad.conf";
    let text = fs::read_to_string(stock).with_context(|| format!("cannot read {stock}"))?;
    let mut changed = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            let name = line.split_whitespace().next().unwrap_or_default();
            match changes.iter().find(|(key, _)| *key == name) {
                Some((key, value)) => {
                    changed += 1;
                    format!("{key} {value};")
                }
                None => line.to_owned(),
            }
        })
        .collect();
    ensure!(
        changed == changes.len(),
        "{stock} sets {changed} of the {} values the bench changes: another psad version?",
        changes.len()
    );
    fs::write(config, lines.join("\n") + "\n")
        .with_context(|| format!("cannot write {}", config.display()))
}
