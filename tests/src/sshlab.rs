//! Real OpenSSH for the tests of the SSH guard and the fleet: the test's own sshd in a server
//! namespace, client namespaces linked to it, `ssh` through sshpass, and a local account to log
//! in as. The SSH probes see every sshd on the machine: suites that use this run only one at a
//! time (`--test-threads=1`, and never beside another such suite).

use std::{
    fs::{self, File},
    io::Write,
    net::{IpAddr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{
    eventually,
    netlab::{Netns, run},
    unique_suffix,
};

pub const SSHD: &str = "/usr/sbin/sshd";
pub const SSH_PORT: u16 = 22;
pub const USER_PASSWORD: &str = "Sentinel-test-7c41e9";
pub const WRONG_PASSWORD: &str = "not-the-password";
/// Options of every test client: no user or host configuration, no host key checks, quiet.
const CLIENT_OPTIONS: &[&str] = &[
    "-F",
    "/dev/null",
    "-o",
    "StrictHostKeyChecking=no",
    "-o",
    "UserKnownHostsFile=/dev/null",
    "-o",
    "LogLevel=ERROR",
    "-o",
    "ConnectTimeout=3",
];

/// With [`CLIENT_OPTIONS`]: one password, through PAM.
const PASSWORD_OPTIONS: &[&str] = &[
    "-o",
    "PreferredAuthentications=password",
    "-o",
    "PubkeyAuthentication=no",
    // One password per connection: each attempt is exactly one PAM failure.
    "-o",
    "NumberOfPasswordPrompts=1",
];

/// `ssh` options for logging in with keys only, each key file given with `-i`, in order.
pub const KEY_SSH_OPTIONS: [&[&str]; 2] = [
    CLIENT_OPTIONS,
    &[
        "-o",
        "BatchMode=yes",
        "-o",
        "IdentitiesOnly=yes",
        "-o",
        "PreferredAuthentications=publickey",
    ],
];

/// How the test's sshd lets users in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SshdAuth {
    /// Passwords through PAM, as the SSH guard's failures need.
    Password,
    /// Public keys only (`PasswordAuthentication no`), as hardened servers run: attackers never
    /// reach `pam_authenticate`. Keys are listed in `DIR/authorized_keys`.
    KeysOnly,
}

/// A session whose packets are dropped ends within seconds instead of hanging the test. Not for
/// the failing logins: the same limit applies to waiting for the answer to a password, which
/// sshd gives only after PAM's failure delay, rounded up by sshd to hide timings (up to ~4 s).
pub const SESSION_SSH_OPTIONS: &[&str] =
    &["-o", "ServerAliveInterval=1", "-o", "ServerAliveCountMax=3"];
/// How long sshd may take to listen.
const WAIT: Duration = Duration::from_secs(15);

/// A client namespace with one veth link to the server.
pub struct Peer {
    pub netns: Netns,
    /// The address its SSH clients and probes use (its first address).
    pub address: IpAddr,
    /// The server's address on this link.
    pub server: IpAddr,
}

impl Peer {
    /// A namespace linked to `server` by a veth pair named `link` on the server's side, with
    /// `server_address` there and `addresses` here, all in one /24 or /64.
    pub fn link(
        server: &Netns,
        link: &str,
        server_address: impl Into<IpAddr>,
        addresses: &[IpAddr],
    ) -> Self {
        let netns = Netns::new(link);
        server.veth(link, &netns, "eth0");
        let server_address = server_address.into();
        server.ip(&address_command(server_address, link));
        for address in addresses {
            netns.ip(&address_command(*address, "eth0"));
        }
        Self {
            netns,
            address: addresses[0],
            server: server_address,
        }
    }

    pub fn sshd(&self) -> SocketAddr {
        SocketAddr::new(self.server, SSH_PORT)
    }

    /// What the guard counts and bans for this peer with `ipv6_prefix: 64`: its address, or its
    /// IPv6 /64.
    pub fn offender(&self) -> String {
        match self.address {
            IpAddr::V4(address) => address.to_string(),
            IpAddr::V6(address) => {
                let network = u128::from(address) & !(u128::MAX >> 64);
                format!("{}/64", Ipv6Addr::from(network))
            }
        }
    }

    /// `ssh -l USER [OPTIONS] SERVER REMOTE_COMMAND` from this peer's address, the password
    /// given by sshpass.
    pub fn ssh(
        &self,
        user: &str,
        password: &str,
        options: &[&str],
        remote_command: &str,
    ) -> Command {
        let mut command = self.netns.command("sshpass");
        command
            .env("SSHPASS", password)
            .args(["-e", "ssh"])
            .args(CLIENT_OPTIONS)
            .args(PASSWORD_OPTIONS)
            .args(options);
        self.to_server(command, user, remote_command)
    }

    /// `command` (an `ssh` with its options) completed: from this peer's address, as `user`,
    /// to the server, running `remote_command`.
    fn to_server(&self, mut command: Command, user: &str, remote_command: &str) -> Command {
        command
            .arg("-b")
            .arg(self.address.to_string())
            .args(["-l", user])
            .arg(self.server.to_string())
            .arg(remote_command)
            .stdin(Stdio::null());
        command
    }

    /// `ssh -l USER -i KEY... SERVER REMOTE_COMMAND` from this peer's address, offering the
    /// keys in order and no password.
    pub fn ssh_with_keys(&self, user: &str, keys: &[&Path], remote_command: &str) -> Command {
        let mut command = self.netns.command("ssh");
        command.args(KEY_SSH_OPTIONS.concat());
        for key in keys {
            command.arg("-i").arg(key);
        }
        self.to_server(command, user, remote_command)
    }

    pub fn can_connect(&self) -> bool {
        self.netns.connect(self.address, self.sshd()).is_ok()
    }

    pub fn assert_connects(&self) {
        self.netns.assert_connects(self.address, self.sshd());
    }

    pub fn assert_blocked(&self) {
        self.assert_blocked_from(self.address);
    }

    pub fn assert_blocked_from(&self, source: impl Into<IpAddr>) {
        self.netns.assert_blocked(source.into(), self.sshd());
    }

    pub fn assert_connects_from(&self, source: impl Into<IpAddr>) {
        self.netns.assert_connects(source.into(), self.sshd());
    }
}

/// `addr add ADDRESS/LEN dev LINK`; IPv6 addresses skip duplicate address detection so that
/// they work at once.
fn address_command(address: IpAddr, link: &str) -> String {
    match address {
        IpAddr::V4(_) => format!("addr add {address}/24 dev {link}"),
        IpAddr::V6(_) => format!("addr add {address}/64 dev {link} nodad"),
    }
}

/// The test's own OpenSSH server in the server namespace, with its own configuration, host key
/// and pid file: nothing of the machine's sshd setup is used or changed.
pub struct Sshd {
    process: Child,
    log: PathBuf,
}

impl Sshd {
    pub fn start(server: &Netns, listen: &[IpAddr], dir: &Path) -> Self {
        Self::start_with(server, listen, dir, SshdAuth::Password)
    }

    /// An sshd that lets users in as `auth` says.
    pub fn start_with(server: &Netns, listen: &[IpAddr], dir: &Path, auth: SshdAuth) -> Self {
        assert!(
            Path::new(SSHD).exists(),
            "{SSHD} is missing: install openssh-server"
        );
        // sshd refuses to start without its privilege separation directory.
        fs::create_dir_all("/run/sshd").expect("create /run/sshd");
        let host_key = key_pair(&dir.join("ssh_host_ed25519_key"));
        let listen_lines: String = listen
            .iter()
            .map(|address| format!("ListenAddress {}\n", SocketAddr::new(*address, SSH_PORT)))
            .collect();
        let config = dir.join("sshd_config");
        fs::write(
            &config,
            format!(
                "{listen_lines}HostKey {}
PidFile {}
UsePAM yes
{authentication}KbdInteractiveAuthentication no
PermitRootLogin no
UseDNS no
# Attackers connect many at a time; sshd's own throttling must not turn them away.
MaxStartups 100
",
                host_key.display(),
                dir.join("sshd.pid").display(),
                authentication = match auth {
                    SshdAuth::Password =>
                        "PasswordAuthentication yes\nPubkeyAuthentication no\n".to_owned(),
                    // The key file lives in the test's directory, under /tmp, which StrictModes
                    // would refuse as world-writable.
                    SshdAuth::KeysOnly => format!(
                        "PasswordAuthentication no\nPubkeyAuthentication yes\n\
                         AuthorizedKeysFile {}\nStrictModes no\n",
                        dir.join("authorized_keys").display()
                    ),
                },
            ),
        )
        .expect("write sshd_config");
        let log = dir.join("sshd.log");
        let log_file = File::create(&log).expect("create sshd.log");
        let process = server
            .command(SSHD)
            .args(["-D", "-e", "-f"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log_file.try_clone().expect("clone sshd.log"))
            .stderr(log_file)
            .spawn()
            .expect("start sshd");
        let sshd = Self { process, log };
        let listening = eventually(WAIT, || {
            listen.iter().all(|address| {
                server
                    .connect(*address, SocketAddr::new(*address, SSH_PORT))
                    .is_ok()
            })
        });
        assert!(listening, "sshd did not listen:\n{}", sshd.log());
        sshd
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Runs `count` failing logins from each peer, all at once, and checks that every one was
    /// refused by this sshd. Half name an account that does not exist, half give a wrong password.
    pub fn fail_logins(&self, user: &TestUser, attempts: &[(&Peer, u64)]) {
        let mut clients = Vec::new();
        for (peer, count) in attempts {
            for attempt in 0..*count {
                let user = if attempt % 2 == 0 {
                    format!("no-such-user-{attempt}")
                } else {
                    user.name.clone()
                };
                let client = peer
                    .ssh(&user, WRONG_PASSWORD, &[], "true")
                    .stdout(Stdio::null())
                    .stderr(Stdio::piped())
                    .spawn()
                    .expect("run sshpass ssh");
                clients.push((format!("from {} as {user}", peer.address), client));
            }
        }
        for (login, client) in clients {
            let output = client.wait_with_output().expect("wait for ssh");
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert!(
                !output.status.success() && stderr.contains("Permission denied"),
                "the failing login {login} ended otherwise ({}): {stderr}\nsshd:\n{}",
                output.status,
                self.log()
            );
        }
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// A new ed25519 key pair at `path` (private) and `path.pub`.
pub fn key_pair(path: &Path) -> PathBuf {
    run(
        "ssh-keygen",
        &[
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-f",
            &path.to_string_lossy(),
        ],
    );
    path.to_owned()
}

/// A local account with a known password for the successful logins, removed on drop.
pub struct TestUser {
    pub name: String,
}

impl TestUser {
    pub fn create(home: &Path) -> Self {
        // Well within the 32 characters a user name may have.
        let name = format!("sntl-{}", unique_suffix());
        run(
            "useradd",
            &[
                "--no-create-home",
                "--home-dir",
                &home.to_string_lossy(),
                "--shell",
                "/bin/sh",
                &name,
            ],
        );
        let user = Self { name };
        let mut chpasswd = Command::new("chpasswd")
            .stdin(Stdio::piped())
            .spawn()
            .expect("run chpasswd");
        writeln!(
            chpasswd.stdin.take().expect("chpasswd's stdin"),
            "{}:{USER_PASSWORD}",
            user.name
        )
        .expect("write to chpasswd");
        assert!(chpasswd.wait().expect("wait for chpasswd").success());
        user
    }
}

impl Drop for TestUser {
    fn drop(&mut self) {
        // --force: a session process may still be on its way out.
        let _ = Command::new("userdel")
            .args(["--force", &self.name])
            .status();
    }
}
