//! The attack's stage: a server namespace running a real OpenSSH server, an attacker namespace
//! with a fresh address for every attack, real `ssh` clients failing to log in, probes that
//! tell when the attacker's packets start being dropped, and `nft monitor` in the server
//! namespace stamping each set element as the kernel commits it. The namespaces come from the
//! test suite's netlab; nothing touches the root namespace's interfaces or ruleset.

use std::{
    fs::{self, File},
    io::{self, Write},
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::Path,
    process::{Child, Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicU8, Ordering},
    },
    thread,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, Result, bail, ensure};
use sentinel_tests::{
    eventually,
    netlab::Netns,
    sshlab::{KEY_SSH_OPTIONS, SshdAuth},
};

use super::timeline::{REALTIME_PRIORITY, Stamped, Timeline, lock};
use crate::{host::run, interrupt};

pub const SERVER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 1);
/// Inside `ALLOWED_NETWORK`, which every guard is told never to ban.
pub const ALLOWED_ATTACKER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 100);
pub const ALLOWED_NETWORK: &str = "192.0.2.0/24";
const ALLOWED_SERVER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Attackers get 198.51.100.100, .101, ... one per attack (apart from the addresses the
/// test suite's SSH lab uses).
const FIRST_ATTACKER_HOST: u8 = 100;
pub const SSH_PORT: u16 = 22;
/// Nothing listens here: the server answers a connect with a reset unless a ban drops the SYN.
/// Every guard drops all of a banned address's TCP traffic, and a probe here costs sshd no
/// fork and adds no line to the log the peers read.
pub const CLOSED_PORT: u16 = 9;
const SERVER_LINK: &str = "atk0";
const ATTACKER_LINK: &str = "eth0";

/// An account every Debian system has: a wrong password for it is exactly one "Failed
/// password" line and one PAM failure (an unknown user name would add an "Invalid user" line,
/// which some peers count as a failure of its own).
pub const ACCOUNT: &str = "nobody";
const WRONG_PASSWORD: &str = "not-the-password";
const CLIENT_OPTIONS: [&str; 6] = [
    "StrictHostKeyChecking=no",
    "UserKnownHostsFile=/dev/null",
    "LogLevel=ERROR",
    "PreferredAuthentications=password",
    // One password per connection: one PAM failure, one log line.
    "NumberOfPasswordPrompts=1",
    "ConnectTimeout=5",
];
const SSHD: &str = "/usr/sbin/sshd";
/// sshd refuses to start without its privilege separation directory.
const SSHD_PRIVSEP_DIR: &str = "/run/sshd";
const START_TIMEOUT: Duration = Duration::from_secs(10);
/// Between probes of one attacker: with the probe's own ~0.2 ms, the resolution of the
/// end-to-end time-to-ban.
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// How often the log is looked at while a failure is awaited.
const LOG_POLL: Duration = Duration::from_micros(200);
/// How long a set element may take to reach this process once the kernel has it.
const READ_GRACE: Duration = Duration::from_secs(2);

pub struct SshLab {
    // Dropped in this order: the processes inside the server namespace, then the namespaces.
    sshd: Sshd,
    monitor: ElementMonitor,
    attacker: Netns,
    server: Netns,
    attackers_made: AtomicU8,
}

/// Where the lab's timelines stood at the start of an attack.
pub struct Bookmark {
    log: usize,
    elements: usize,
}

impl SshLab {
    /// Everything is written under `dir`: the host key, the logs, the monitor's output. sshd
    /// lets users in as `auth` says.
    pub fn start(dir: &Path, auth: SshdAuth) -> Result<Self> {
        let server = Netns::new("bench-ssh");
        let attacker = Netns::new("bench-atk");
        server.veth(SERVER_LINK, &attacker, ATTACKER_LINK);
        for address in [SERVER, ALLOWED_SERVER] {
            server.ip(&format!("addr add {address}/24 dev {SERVER_LINK}"));
        }
        attacker.ip(&format!(
            "addr add {ALLOWED_ATTACKER}/24 dev {ATTACKER_LINK}"
        ));
        let monitor = ElementMonitor::start(&server, &dir.join("nft-monitor.log"))?;
        let sshd = Sshd::start(&server, dir, auth)?;
        Ok(Self {
            sshd,
            monitor,
            attacker,
            server,
            attackers_made: AtomicU8::new(0),
        })
    }

    pub fn server(&self) -> &Netns {
        &self.server
    }

    /// A new address in the attacker namespace, never used before in this run.
    pub fn new_attacker(&self) -> Result<Ipv4Addr> {
        let made = self.attackers_made.fetch_add(1, Ordering::Relaxed);
        let host = FIRST_ATTACKER_HOST
            .checked_add(made)
            .filter(|host| *host < 255)
            .context("the attacker network 198.51.100.0/24 has no address left")?;
        let [a, b, c, _] = SERVER.octets();
        let address = Ipv4Addr::new(a, b, c, host);
        self.attacker
            .ip(&format!("addr add {address}/24 dev {ATTACKER_LINK}"));
        Ok(address)
    }

    /// From now on sshd's log also goes to `path`, one syslog-format line per message.
    pub fn copy_log_to(&self, path: &Path) -> Result<()> {
        let file =
            File::create(path).with_context(|| format!("cannot create {}", path.display()))?;
        *lock(&self.sshd.copy) = Some(file);
        Ok(())
    }

    pub fn bookmark(&self) -> Bookmark {
        Bookmark {
            log: self.sshd.log.len(),
            elements: self.monitor.elements.len(),
        }
    }

    /// `count` failing password logins from `source`, all at once; returns when every client
    /// has exited, each refused by sshd.
    pub fn fail_logins(&self, source: Ipv4Addr, count: u32) -> Result<()> {
        let clients = (0..count)
            .map(|_| self.start_failing_login(source))
            .collect::<Result<Vec<_>>>()?;
        clients
            .into_iter()
            .try_for_each(|client| self.expect_refused(client, source))
    }

    pub fn start_failing_login(&self, source: Ipv4Addr) -> Result<Child> {
        self.failing_login(source)
            .spawn()
            .context("cannot start sshpass (is it installed?)")
    }

    /// Waits for a client of `start_failing_login`, which sshd must have refused.
    pub fn expect_refused(&self, client: Child, source: Ipv4Addr) -> Result<()> {
        let output = client
            .wait_with_output()
            .context("waiting for ssh failed")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        ensure!(
            !output.status.success() && stderr.contains("Permission denied"),
            "a failing login from {source} ended otherwise ({}): {}; sshd's last line: {:?}",
            output.status,
            stderr.trim(),
            self.sshd.log.last_line()
        );
        Ok(())
    }

    fn failing_login(&self, source: Ipv4Addr) -> Command {
        let mut command = self.attacker.command("sshpass");
        command
            .env("SSHPASS", WRONG_PASSWORD)
            .args(["-e", "ssh", "-F", "/dev/null"]);
        for option in CLIENT_OPTIONS {
            command.arg("-o").arg(option);
        }
        command
            .arg("-b")
            .arg(source.to_string())
            .arg(format!("{ACCOUNT}@{SERVER}"))
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        command
    }

    /// A login as `user` from `source` offering only `key`, which the key-only sshd refuses
    /// (no password is ever asked).
    pub fn start_key_login(&self, source: Ipv4Addr, user: &str, key: &Path) -> Result<Child> {
        self.attacker
            .command("ssh")
            .args(KEY_SSH_OPTIONS.concat())
            .arg("-i")
            .arg(key)
            .arg("-b")
            .arg(source.to_string())
            .args(["-l", user])
            .arg(SERVER.to_string())
            .arg("true")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start ssh")
    }

    /// Waits up to `limit` for a client of `start_key_login`; returns when it exited, refused
    /// by sshd, or `None` when it did not end so (it is killed after `limit`): a ban that
    /// dropped its connection midway, which the caller checks.
    pub fn finish_key_login(
        &self,
        mut client: Child,
        source: Ipv4Addr,
        limit: Duration,
    ) -> Result<Option<Instant>> {
        let started = Instant::now();
        let ended = loop {
            if client.try_wait()?.is_some() {
                break Instant::now();
            }
            if started.elapsed() >= limit {
                let _ = client.kill();
                client.wait()?;
                return Ok(None);
            }
            interrupt::check()?;
            thread::sleep(LOG_POLL);
        };
        let output = client
            .wait_with_output()
            .context("waiting for ssh failed")?;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stderr.contains("Permission denied (publickey)") {
            return Ok(Some(ended));
        }
        ensure!(
            !output.status.success(),
            "a key login from {source} succeeded; sshd's last line: {:?}",
            self.sshd.log.last_line()
        );
        Ok(None)
    }

    /// Debian's nmap from `source`: `kind` (`-sS` or `-sT`) of `ports` on the server, `rate`
    /// probes a second, one probe per port; returns how many ports it found closed (answered
    /// with a reset, so not yet dropped).
    pub fn scan(&self, source: Ipv4Addr, kind: &str, ports: &str, rate: u32) -> u16 {
        let source = source.to_string();
        let rate = rate.to_string();
        self.attacker.nmap_closed_with(
            kind,
            SERVER.into(),
            ports,
            &[
                "-S",
                &source,
                "-e",
                ATTACKER_LINK,
                "--min-rate",
                &rate,
                "--max-rate",
                &rate,
            ],
        )
    }

    /// Probes from `source` every few milliseconds until its packets are dropped; returns when
    /// the first dropped probe was sent, or `None` if none was within `limit`.
    pub fn await_drop(&self, source: Ipv4Addr, limit: Duration) -> Result<Option<Instant>> {
        let started = Instant::now();
        while started.elapsed() < limit {
            interrupt::check()?;
            let sent = Instant::now();
            if self.is_dropped(source, CLOSED_PORT)? {
                return Ok(Some(sent));
            }
            thread::sleep(PROBE_INTERVAL);
        }
        Ok(None)
    }

    /// Whether `source`'s connects to the server's sshd are dropped right now.
    pub fn sshd_drops(&self, source: Ipv4Addr) -> Result<bool> {
        self.is_dropped(source, SSH_PORT)
    }

    /// Whether any connect from `source` is dropped right now (a probe to a closed port).
    pub fn drops(&self, source: Ipv4Addr) -> Result<bool> {
        self.is_dropped(source, CLOSED_PORT)
    }

    /// A dropped SYN shows as a connect that times out; an answered one connects or is reset.
    fn is_dropped(&self, source: Ipv4Addr, port: u16) -> Result<bool> {
        let destination = SocketAddr::from((SERVER, port));
        match self.attacker.connect(source.into(), destination) {
            Ok(_) => Ok(false),
            Err(error) => match error.kind() {
                io::ErrorKind::ConnectionRefused => Ok(false),
                io::ErrorKind::TimedOut => Ok(true),
                _ => Err(error)
                    .with_context(|| format!("probe from {source} to {destination} failed")),
            },
        }
    }

    /// When sshd logged the `nth` failed password from `source` since `bookmark` (as this
    /// process read it); fails after `limit`.
    pub fn await_failure_logged(
        &self,
        source: Ipv4Addr,
        bookmark: &Bookmark,
        nth: usize,
        limit: Duration,
    ) -> Result<Instant> {
        let prefix = format!("Failed password for {ACCOUNT} from {source} port ");
        let started = Instant::now();
        loop {
            let logged = self
                .sshd
                .log
                .since(bookmark.log, |line| line.starts_with(&prefix));
            if let Some(line) = logged.get(nth - 1) {
                return Ok(line.at);
            }
            interrupt::check()?;
            ensure!(
                started.elapsed() < limit,
                "sshd logged {} failed passwords from {source} within {limit:?}, not {nth}",
                logged.len()
            );
            thread::sleep(LOG_POLL);
        }
    }

    /// When this process read the last line sshd logged about `source` since `bookmark` and
    /// before `moment`.
    pub fn last_logged_before(
        &self,
        source: Ipv4Addr,
        bookmark: &Bookmark,
        moment: Instant,
    ) -> Option<Instant> {
        // "from 198.51.100.100 port 4242", "user nobody 198.51.100.100 port 4242 [preauth]"
        let address = format!(" {source} port ");
        self.sshd
            .log
            .since(bookmark.log, |line| line.contains(&address))
            .iter()
            .map(|line| line.at)
            .take_while(|at| *at <= moment)
            .last()
    }

    /// When `nft monitor` showed the first set element holding `source` since `bookmark`,
    /// waiting a little for it when it is `expected`.
    pub fn committed(
        &self,
        source: Ipv4Addr,
        bookmark: &Bookmark,
        expected: bool,
    ) -> Option<Instant> {
        let address = source.to_string();
        let first = || {
            self.monitor
                .elements
                .since(bookmark.elements, |line| {
                    added_elements(line).contains(&address.as_str())
                })
                .first()
                .map(|line| line.at)
        };
        if expected {
            eventually(READ_GRACE, || first().is_some());
        }
        first()
    }

    /// When each element added to `table` (`FAMILY NAME`) since `bookmark` was seen.
    pub fn elements_added(&self, table: &str, bookmark: &Bookmark) -> Vec<Instant> {
        let prefix = format!("add element {table} ");
        self.monitor
            .elements
            .since(bookmark.elements, |line| line.starts_with(&prefix))
            .iter()
            // A line may list several elements: each counts, at the line's moment.
            .flat_map(|line| std::iter::repeat_n(line.at, added_elements(&line.text).len()))
            .collect()
    }
}

/// The addresses of an `nft monitor` line that adds set elements, e.g.
/// `add element inet sentinel banned_v4 { 198.51.100.10 timeout 1m expires 59s996ms }`.
fn added_elements(line: &str) -> Vec<&str> {
    let Some(list) = line
        .strip_prefix("add element ")
        .and_then(|rest| rest.split_once('{'))
        .and_then(|(_, rest)| rest.rsplit_once('}'))
        .map(|(list, _)| list)
    else {
        return Vec::new();
    };
    list.split(',')
        .filter_map(|element| element.split_whitespace().next())
        // sshguard adds single addresses as /32 networks.
        .map(|element| element.trim_end_matches("/32"))
        .collect()
}

/// The lab's own OpenSSH server. Its log (stderr) is read line by line and, for the peers that
/// read logs, copied to a file in the syslog format their filters expect.
struct Sshd {
    process: Child,
    log: Timeline,
    copy: Arc<Mutex<Option<File>>>,
}

impl Sshd {
    fn start(server: &Netns, dir: &Path, auth: SshdAuth) -> Result<Self> {
        ensure!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server"
        );
        fs::create_dir_all(SSHD_PRIVSEP_DIR)
            .with_context(|| format!("cannot create {SSHD_PRIVSEP_DIR}"))?;
        let host_key = dir.join("ssh_host_ed25519_key");
        if !host_key.exists() {
            run(Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(&host_key))
            .context("cannot make the lab's host key")?;
        }
        // No configuration file: OpenSSH's defaults (password logins on), none of this
        // host's /etc/ssh, and PAM as Debian's sshd uses it. MaxStartups: each banned
        // attacker leaves a connection sshd waits on until LoginGraceTime (its packets are
        // dropped), and by default sshd starts refusing at 10 of those. Key-only: what
        // hardened servers run; PAM still starts for every user a client names.
        let authentication: &[&str] = match auth {
            SshdAuth::Password => &[],
            SshdAuth::KeysOnly => &[
                "-o",
                "PasswordAuthentication=no",
                "-o",
                "KbdInteractiveAuthentication=no",
                "-o",
                "PubkeyAuthentication=yes",
            ],
        };
        let mut process = server
            .command(SSHD)
            .args(["-D", "-e", "-f", "/dev/null", "-o", "UsePAM=yes"])
            .args(authentication)
            .args(["-o", "MaxStartups=200", "-o"])
            .arg(format!("HostKey={}", host_key.display()))
            .arg("-o")
            .arg(format!("PidFile={}", dir.join("sshd.pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("cannot start sshd")?;
        let stderr = process.stderr.take().context("sshd's stderr")?;
        let copy = Arc::new(Mutex::new(None::<File>));
        let pid = process.id();
        let log = Timeline::record(stderr, {
            let copy = Arc::clone(&copy);
            move |line: &Stamped| {
                if let Some(file) = lock(&copy).as_mut() {
                    // A failed write shows up as a peer that never bans.
                    let _ =
                        file.write_all(syslog_line(&format!("sshd[{pid}]"), &line.text).as_bytes());
                }
            }
        });
        let sshd = Self { process, log, copy };
        let address = IpAddr::from(SERVER);
        let listening = eventually(START_TIMEOUT, || {
            server
                .connect(address, SocketAddr::new(address, SSH_PORT))
                .is_ok()
        });
        if !listening {
            bail!(
                "sshd did not listen within {START_TIMEOUT:?}; its last line: {:?}",
                sshd.log.last_line()
            );
        }
        Ok(sshd)
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// `Nov 21 16:23:48 sentinel-bench PROGRAM: MESSAGE` (`PROGRAM` such as `sshd[PID]` or
/// `kernel`), in local time like syslog writes it.
pub fn syslog_line(program: &str, message: &str) -> String {
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let seconds = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs()) as libc::time_t;
    // SAFETY: tm is plain old data, for which all zeros is a valid value.
    let mut local: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are valid for the call; localtime_r is the thread-safe variant.
    unsafe { libc::localtime_r(&seconds, &mut local) };
    format!(
        "{} {:>2} {:02}:{:02}:{:02} sentinel-bench {program}: {message}\n",
        MONTHS[local.tm_mon.clamp(0, 11) as usize],
        local.tm_mday,
        local.tm_hour,
        local.tm_min,
        local.tm_sec
    )
}

/// `nft monitor new elements` inside the server namespace, under a real-time policy like its
/// reader: every element any guard adds, stamped when read.
struct ElementMonitor {
    process: Child,
    elements: Timeline,
}

impl ElementMonitor {
    fn start(server: &Netns, output: &Path) -> Result<Self> {
        let mut process = server
            .command("chrt")
            .args(["--fifo", &REALTIME_PRIORITY.to_string()])
            .args(["nft", "monitor", "new", "elements"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start nft monitor")?;
        let stdout = process.stdout.take().context("nft monitor's stdout")?;
        let mut copy =
            File::create(output).with_context(|| format!("cannot create {}", output.display()))?;
        let elements = Timeline::record(stdout, move |line: &Stamped| {
            let _ = writeln!(copy, "{}", line.text);
        });
        let monitor = Self { process, elements };
        monitor.await_listening(server)?;
        Ok(monitor)
    }

    /// Adds an element to a throwaway table until the monitor reports it: from then on no
    /// guard's element can be missed.
    fn await_listening(&self, server: &Netns) -> Result<()> {
        const TABLE: &str = "sentinel-bench-monitor-check";
        server.nft(
            &["-f", "-"],
            &format!("add table inet {TABLE}\nadd set inet {TABLE} probe {{ type ipv4_addr; }}\n"),
        );
        // A new element each time: re-adding one the set holds may not be reported.
        let mut host = 0u8;
        let seen = eventually(START_TIMEOUT, || {
            host = host.wrapping_add(1);
            server.nft(
                &[
                    "add",
                    "element",
                    "inet",
                    TABLE,
                    "probe",
                    &format!("{{ 10.0.0.{host} }}"),
                ],
                "",
            );
            self.elements.len() > 0
        });
        server.nft(&["delete", "table", "inet", TABLE], "");
        ensure!(
            seen,
            "nft monitor reported nothing within {START_TIMEOUT:?}"
        );
        Ok(())
    }
}

impl Drop for ElementMonitor {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_are_read_from_each_guards_monitor_lines() {
        assert_eq!(
            added_elements(
                "add element inet sentinel banned_v4 { 198.51.100.10 timeout 1m expires 59s996ms }"
            ),
            ["198.51.100.10"]
        );
        assert_eq!(
            added_elements("add element inet f2b-sentinel-bench addr-set-sshd { 198.51.100.11 }"),
            ["198.51.100.11"]
        );
        assert_eq!(
            added_elements("add element ip sshguard attackers { 198.51.100.12/32 }"),
            ["198.51.100.12"]
        );
        assert_eq!(
            added_elements("add element inet t s { 192.0.2.1, 192.0.2.2 timeout 1m }"),
            ["192.0.2.1", "192.0.2.2"]
        );
        assert!(added_elements("delete element inet t s { 192.0.2.1 }").is_empty());
    }

    #[test]
    fn syslog_lines_carry_date_host_and_pid() {
        let line = syslog_line(
            "sshd[42]",
            "Failed password for nobody from 198.51.100.10 port 1 ssh2",
        );
        let (date, rest) = line.split_at(15);
        assert_eq!(date.len(), 15, "{line}");
        assert!(
            date.as_bytes()[3] == b' ' && date.as_bytes()[9] == b':',
            "{line}"
        );
        assert_eq!(
            rest,
            " sentinel-bench sshd[42]: Failed password for nobody from 198.51.100.10 port 1 ssh2\n"
        );
    }
}
