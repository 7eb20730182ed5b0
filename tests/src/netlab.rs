//! Network namespaces for the tests that ban: each test builds its own namespaces joined by
//! veth pairs, and nothing here touches the root namespace's interfaces or ruleset.

use std::{
    fs::File,
    io::{self, Write},
    net::{IpAddr, SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::Duration,
};

use nix::sched::{CloneFlags, setns};
use socket2::{Domain, Socket, Type};

use crate::unique_suffix;

/// Long enough for a connection over a veth pair, short enough to keep failing tests quick.
pub const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);

/// A network namespace made with `ip netns add`, loopback up; on drop, whatever still runs
/// inside is killed and the namespace is deleted (its veth ends go with it).
pub struct Netns {
    name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Self {
        let name = format!("sentinel-{tag}-{}", unique_suffix());
        run("ip", &["netns", "add", &name]);
        let netns = Self { name };
        netns.ip("link set lo up");
        netns
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace file, as Sentinel's `ssh_guard.netns` setting takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME COMMAND`, with the words of `command` as arguments.
    pub fn ip(&self, command: &str) {
        let mut args = vec!["-n", &self.name];
        args.extend(command.split_whitespace());
        run("ip", &args);
    }

    /// A veth pair: `local` here, `remote` in `peer`, both up.
    pub fn veth(&self, local: &str, peer: &Netns, remote: &str) {
        self.ip(&format!(
            "link add {local} type veth peer name {remote} netns {}",
            peer.name
        ));
        self.ip(&format!("link set {local} up"));
        peer.ip(&format!("link set {remote} up"));
    }

    /// `program` to be run inside the namespace (through `ip netns exec`).
    pub fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// `nft ARGS` inside the namespace, with `input` on its standard input; returns stdout.
    pub fn nft(&self, args: &[&str], input: &str) -> String {
        let mut child = self
            .command("nft")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run nft");
        child
            .stdin
            .take()
            .expect("nft's stdin")
            .write_all(input.as_bytes())
            .expect("write nft's input");
        let output = child.wait_with_output().expect("wait for nft");
        assert!(
            output.status.success(),
            "nft {args:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("nft prints UTF-8")
    }

    /// Elements of one of Sentinel's ban sets (`banned_v4`, `banned_v6`) as the kernel holds them.
    pub fn sentinel_set(&self, set: &str) -> Vec<SetElement> {
        self.set_elements("inet", "sentinel", set)
    }

    /// Elements of the set `family table set` as the kernel holds them.
    pub fn set_elements(&self, family: &str, table: &str, set: &str) -> Vec<SetElement> {
        let listing = self.nft(&["-j", "list", "set", family, table, set], "");
        let listing: serde_json::Value = serde_json::from_str(&listing).expect("nft JSON");
        listing["nftables"]
            .as_array()
            .expect("an nftables array")
            .iter()
            .filter_map(|entry| entry["set"]["elem"].as_array())
            .flatten()
            .map(SetElement::from_json)
            .collect()
    }

    /// Runs `task` on a thread inside the namespace; sockets it creates stay in there.
    pub fn run<T: Send>(&self, task: impl FnOnce() -> T + Send) -> T {
        in_netns(&self.path(), task)
    }

    /// A TCP connection from `source` (an address of this namespace) to `destination`.
    pub fn connect(&self, source: IpAddr, destination: SocketAddr) -> io::Result<TcpStream> {
        self.run(|| {
            let local = SocketAddr::new(source, 0);
            let socket = Socket::new(Domain::for_address(local), Type::STREAM, None)?;
            socket.bind(&local.into())?;
            socket.connect_timeout(&destination.into(), CONNECT_TIMEOUT)?;
            Ok(socket.into())
        })
    }

    pub fn assert_connects(&self, source: IpAddr, destination: SocketAddr) {
        if let Err(error) = self.connect(source, destination) {
            panic!("{source} could not connect to {destination}: {error}");
        }
    }

    /// A dropped SYN shows as a connect that times out (not one that is refused).
    pub fn assert_blocked(&self, source: IpAddr, destination: SocketAddr) {
        match self.connect(source, destination) {
            Ok(_) => panic!("{source} connected to {destination} although it is banned"),
            Err(error) => assert_eq!(error.kind(), io::ErrorKind::TimedOut, "{source}: {error}"),
        }
    }

    /// Debian's `nmap` from this namespace: a SYN scan (`-sS`) or a connect scan (`-sT`) of
    /// `ports` (such as `1000-1019`) on `target`, without host discovery or retries; returns how
    /// many ports it found closed (answered with a reset). A missing nmap fails with the package
    /// to install.
    pub fn nmap_closed(&self, kind: &str, target: IpAddr, ports: &str) -> u16 {
        self.nmap_closed_with(kind, target, ports, &[])
    }

    /// `nmap_closed` with more of nmap's options (a source address, a fixed rate).
    pub fn nmap_closed_with(
        &self,
        kind: &str,
        target: IpAddr,
        ports: &str,
        options: &[&str],
    ) -> u16 {
        assert!(
            Command::new("nmap").arg("--version").output().is_ok(),
            "nmap is not installed (Debian's package `nmap`; `cargo xtask setup` installs it)"
        );
        let family = if target.is_ipv6() { "-6" } else { "-4" };
        let output = self
            .command("nmap")
            .args(["-n", "-Pn", family, kind, "--max-retries", "0", "-oG", "-"])
            .args(options)
            .arg("-p")
            .arg(ports)
            .arg(target.to_string())
            .output()
            .expect("run nmap");
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(
            output.status.success(),
            "nmap {kind} -p {ports} {target} failed: {}\n{stdout}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Grepable output: `Ignored State: closed (N)`, or each port listed as `N/closed/`.
        let ignored = stdout
            .split("Ignored State: closed (")
            .nth(1)
            .and_then(|rest| rest.split(')').next())
            .and_then(|n| n.parse::<u16>().ok())
            .unwrap_or(0);
        ignored + stdout.matches("/closed/").count() as u16
    }

    /// Processes running inside the namespace.
    pub fn pids(&self) -> Vec<i32> {
        let output = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .expect("run ip netns pids");
        String::from_utf8_lossy(&output.stdout)
            .split_whitespace()
            .filter_map(|pid| pid.parse().ok())
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // A process left inside would keep the namespace alive after `ip netns del`.
        for pid in self.pids() {
            // SAFETY: plain syscall on a process of this test's own namespace.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Runs `task` on a thread inside the network namespace of the file `netns`; sockets it
/// creates stay in there.
pub fn in_netns<T: Send>(netns: &Path, task: impl FnOnce() -> T + Send) -> T {
    let namespace = File::open(netns).expect("open the namespace");
    thread::scope(|scope| {
        scope
            .spawn(|| {
                setns(&namespace, CloneFlags::CLONE_NEWNET).expect("enter the namespace");
                task()
            })
            .join()
            .expect("the task inside the namespace panicked")
    })
}

/// One element of a ban set, as `nft -j` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetElement {
    /// `192.0.2.20`, `2001:db8:b::/64`, or `FIRST-LAST` for a range.
    pub net: String,
    /// The element's timeout in whole seconds.
    pub timeout: Option<u64>,
    /// Whole seconds until the kernel removes it.
    pub expires: Option<u64>,
}

impl SetElement {
    fn from_json(element: &serde_json::Value) -> Self {
        // Elements with a timeout come wrapped in {"elem": {"val": ..., "timeout": ...}}.
        let (value, details) = match element.get("elem") {
            Some(details) => (&details["val"], Some(details)),
            None => (element, None),
        };
        let net = if let Some(addr) = value.as_str() {
            addr.to_string()
        } else if let Some(prefix) = value.get("prefix") {
            format!("{}/{}", text(&prefix["addr"]), prefix["len"])
        } else if let Some([first, last]) = value
            .get("range")
            .and_then(|r| r.as_array())
            .map(Vec::as_slice)
        {
            format!("{}-{}", text(first), text(last))
        } else {
            panic!("unexpected set element {element}")
        };
        let seconds = |key: &str| details.and_then(|d| d[key].as_u64());
        Self {
            net,
            timeout: seconds("timeout"),
            expires: seconds("expires"),
        }
    }
}

fn text(value: &serde_json::Value) -> &str {
    value.as_str().expect("an address string")
}

/// Runs `program` to completion; panics with its stderr if it fails.
pub fn run(program: &str, args: &[&str]) {
    let output = Command::new(program).args(args).output().expect(program);
    assert!(
        output.status.success(),
        "{program} {args:?} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
