//! The firewall on the real kernel with real packets: a server namespace and an attacker
//! namespace joined by a veth pair, the firewall opened inside the server namespace, TCP
//! connections from the attacker's addresses. Nothing here touches the root namespace's ruleset.
//! Needs root: `cargo test -p sentinel-tests --test firewall`.

use std::{
    io::{self, Read, Write},
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread::{self, JoinHandle},
    time::Duration,
};

use sentinel_tests::{eventually, netlab::Netns};
use sentinel_user::firewall::{ActiveBan, Ban, Firewall, FirewallOptions, IpNet};

const SERVER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Numerically below the attacker, so a ban must not spill onto lower addresses.
const BYSTANDER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 10);
const ATTACKER_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);
const SERVER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xa, 0, 0, 0, 0, 1);
const ATTACKER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 1);
/// Another address in the attacker's /64.
const ATTACKER_V6_NEIGHBOUR: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xb, 0, 0, 0, 0, 2);
const BYSTANDER_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, 1);
/// Only ever set elements: no packet is sent to or from these addresses.
const STANDING_BANS: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 0);
const PORT: u16 = 7000;
const HOUR: Duration = Duration::from_secs(3600);

/// A table the test owns in the server namespace; Sentinel must never change it.
const OTHER_TABLE: &str = "table inet other {
	set allowed {
		type ipv4_addr
		elements = { 198.51.100.7 }
	}
	chain input {
		type filter hook input priority 0; policy accept;
		ip saddr @allowed accept
		tcp dport 9 drop
	}
}
";

/// A TCP echo server in the server namespace, stopped on drop.
struct EchoServer {
    stop: Arc<AtomicBool>,
    acceptor: Option<JoinHandle<()>>,
}

impl EchoServer {
    fn start(listener: TcpListener) -> Self {
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let acceptor = thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        thread::spawn(move || echo(stream));
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        thread::sleep(Duration::from_millis(5));
                    }
                    Err(error) => panic!("accept: {error}"),
                }
            }
        });
        Self {
            stop,
            acceptor: Some(acceptor),
        }
    }
}

/// Echoes until the peer goes quiet for a while (its packets may be dropped for good).
fn echo(mut stream: TcpStream) {
    stream.set_nonblocking(false).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buffer = [0u8; 64];
    while let Ok(read @ 1..) = stream.read(&mut buffer) {
        if stream.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }
}

/// A server and an attacker namespace joined by a veth pair, with an echo server and a foreign
/// table on the server side.
struct Lab {
    // Dropped first: the echo server, then the namespaces.
    _echo: EchoServer,
    server: Netns,
    attacker: Netns,
    /// `nft list table inet other` right after the lab was built.
    other_table: String,
}

impl Lab {
    fn new() -> Self {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the firewall tests need root"
        );
        let server = Netns::new("fw-srv");
        let attacker = Netns::new("fw-atk");
        server.veth("srv0", &attacker, "atk0");
        server.ip(&format!("addr add {SERVER_V4}/24 dev srv0"));
        for addr in [BYSTANDER_V4, ATTACKER_V4] {
            attacker.ip(&format!("addr add {addr}/24 dev atk0"));
        }
        // nodad: the addresses work at once instead of after duplicate address detection.
        server.ip(&format!("addr add {SERVER_V6}/64 dev srv0 nodad"));
        for addr in [ATTACKER_V6, ATTACKER_V6_NEIGHBOUR, BYSTANDER_V6] {
            attacker.ip(&format!("addr add {addr}/64 dev atk0 nodad"));
        }
        for prefix in ["2001:db8:b::/64", "2001:db8:c::/64"] {
            server.ip(&format!("-6 route add {prefix} dev srv0"));
        }
        attacker.ip("-6 route add 2001:db8:a::/64 dev atk0");
        server.nft(&["-f", "-"], OTHER_TABLE);
        let other_table = server.nft(&["list", "table", "inet", "other"], "");

        let listener = server.run(|| TcpListener::bind(("::", PORT)).expect("listen"));
        Self {
            _echo: EchoServer::start(listener),
            server,
            attacker,
            other_table,
        }
    }

    fn open_firewall(&self) -> Firewall {
        Firewall::open(self.options()).expect("open the firewall")
    }

    fn options(&self) -> FirewallOptions {
        FirewallOptions {
            netns: Some(self.server.path()),
            ..FirewallOptions::default()
        }
    }

    /// The echo server's address in the family of `source` (an attacker address).
    fn echo_server_for(source: IpAddr) -> SocketAddr {
        let server: IpAddr = match source {
            IpAddr::V4(_) => SERVER_V4.into(),
            IpAddr::V6(_) => SERVER_V6.into(),
        };
        SocketAddr::new(server, PORT)
    }

    /// A TCP connection from `source` (an attacker address) to the server.
    fn connect_from(&self, source: IpAddr) -> io::Result<TcpStream> {
        self.attacker.connect(source, Self::echo_server_for(source))
    }

    fn assert_connects(&self, source: impl Into<IpAddr>) {
        let source = source.into();
        self.attacker
            .assert_connects(source, Self::echo_server_for(source));
    }

    fn assert_blocked(&self, source: impl Into<IpAddr>) {
        let source = source.into();
        self.attacker
            .assert_blocked(source, Self::echo_server_for(source));
    }

    fn table_names(&self) -> String {
        self.server.nft(&["list", "tables"], "")
    }

    fn assert_other_table_untouched(&self) {
        let listed = self.server.nft(&["list", "table", "inet", "other"], "");
        assert_eq!(listed, self.other_table);
    }
}

fn ban(net: impl Into<IpNet>, timeout: Duration) -> Ban {
    Ban {
        net: net.into(),
        timeout,
    }
}

fn nth_after(first: Ipv4Addr, n: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(first) + n)
}

fn find(bans: &[ActiveBan], net: &str) -> Option<ActiveBan> {
    let net: IpNet = net.parse().unwrap();
    bans.iter().find(|ban| ban.net == net).copied()
}

#[test]
fn ban_drops_new_and_established_connections_of_the_banned_address_only() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    lab.assert_connects(ATTACKER_V4);
    lab.assert_connects(BYSTANDER_V4);
    let mut established = lab.connect_from(ATTACKER_V4.into()).unwrap();
    established
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let mut reply = [0u8; 4];
    established.write_all(b"ping").unwrap();
    established.read_exact(&mut reply).unwrap();
    assert_eq!(&reply, b"ping");

    firewall.ban(&[ban(ATTACKER_V4, HOUR)]).unwrap();

    lab.assert_blocked(ATTACKER_V4);
    lab.assert_connects(BYSTANDER_V4);
    established.write_all(b"pong").unwrap();
    let error = established.read_exact(&mut reply).unwrap_err();
    assert!(
        matches!(
            error.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
        ),
        "the established connection still answered: {error}"
    );
    let dropped = firewall.drop_counters().unwrap();
    assert!(dropped.ipv4.packets > 0, "{dropped:?}");

    firewall.unban(&[ATTACKER_V4.into()]).unwrap();
    lab.assert_connects(ATTACKER_V4);
    assert!(lab.server.sentinel_set("banned_v4").is_empty());
    lab.assert_other_table_untouched();
}

/// A generous bound after which a ban that should have been lifted counts as stuck; when the
/// kernel lifts it is its timeout, read from the element, not a clock in the test.
const HANG_GUARD: Duration = Duration::from_secs(30);

#[test]
fn ban_expires_by_itself() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    firewall
        .ban(&[ban(ATTACKER_V4, Duration::from_secs(2))])
        .unwrap();
    // The kernel holds the element with the ban's timeout, counting down by itself.
    let elements = lab.server.sentinel_set("banned_v4");
    assert_eq!(elements.len(), 1, "{elements:?}");
    assert_eq!(elements[0].net, "192.0.2.20");
    assert_eq!(elements[0].timeout, Some(2));
    assert!(
        elements[0].expires.is_some_and(|left| left <= 2),
        "{elements:?}"
    );
    lab.assert_blocked(ATTACKER_V4);

    // No daemon and no further call: the kernel removes the element and the address connects.
    assert!(
        eventually(HANG_GUARD, || lab
            .server
            .sentinel_set("banned_v4")
            .is_empty()),
        "the element outlived its timeout: {:?}",
        lab.server.sentinel_set("banned_v4")
    );
    lab.assert_connects(ATTACKER_V4);
    assert_eq!(find(&firewall.list().unwrap(), "192.0.2.20"), None);
    lab.assert_other_table_untouched();
}

#[test]
fn an_ipv6_prefix_ban_covers_the_whole_prefix() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    lab.assert_connects(ATTACKER_V6_NEIGHBOUR);

    firewall
        .ban(&[ban("2001:db8:b::/64".parse::<IpNet>().unwrap(), HOUR)])
        .unwrap();

    lab.assert_blocked(ATTACKER_V6);
    lab.assert_blocked(ATTACKER_V6_NEIGHBOUR);
    lab.assert_connects(BYSTANDER_V6);
    lab.assert_connects(BYSTANDER_V4);
    let bans = firewall.list().unwrap();
    assert_eq!(bans.len(), 1, "{bans:?}");
    assert!(find(&bans, "2001:db8:b::/64").is_some(), "{bans:?}");
    assert!(firewall.drop_counters().unwrap().ipv6.packets > 0);
    lab.assert_other_table_untouched();
}

/// An attacker in the server's own /64 gets the prefix banned, the server's address with it; the
/// server's connections to itself (over `lo`) must still work.
#[test]
fn a_ban_covering_the_servers_own_address_spares_its_own_traffic() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    firewall
        .ban(&[ban("2001:db8:a::/64".parse::<IpNet>().unwrap(), HOUR)])
        .unwrap();

    for server in [IpAddr::from(SERVER_V6), SERVER_V4.into()] {
        lab.server
            .assert_connects(server, SocketAddr::new(server, PORT));
    }
    assert!(find(&firewall.list().unwrap(), "2001:db8:a::/64").is_some());
    lab.assert_other_table_untouched();
}

#[test]
fn reopening_adopts_bans_without_duplicating_them() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    firewall.ban(&[ban(ATTACKER_V4, HOUR)]).unwrap();
    firewall.close().unwrap();
    lab.assert_blocked(ATTACKER_V4);

    let mut firewall = lab.open_firewall();
    let adopted = find(&firewall.list().unwrap(), "192.0.2.20").expect("adopted ban");
    let expires_in = adopted.expires_in.expect("a timeout");
    assert!(
        expires_in > HOUR - Duration::from_secs(60) && expires_in <= HOUR + Duration::from_secs(2),
        "{expires_in:?}"
    );

    // A shorter ban of the same address changes nothing; a longer one extends it in place.
    firewall
        .ban(&[ban(ATTACKER_V4, Duration::from_secs(60))])
        .unwrap();
    firewall.ban(&[ban(ATTACKER_V4, 2 * HOUR)]).unwrap();
    let elements = lab.server.sentinel_set("banned_v4");
    assert_eq!(elements.len(), 1, "{elements:?}");
    assert_eq!(elements[0].net, "192.0.2.20");
    assert_eq!(elements[0].timeout, Some(2 * 3600));
    lab.assert_blocked(ATTACKER_V4);
    lab.assert_other_table_untouched();
}

#[test]
fn deleted_or_misshaped_table_is_recreated() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();

    lab.server.nft(&["delete", "table", "inet", "sentinel"], "");
    firewall.ban(&[ban(ATTACKER_V4, HOUR)]).unwrap();
    lab.assert_blocked(ATTACKER_V4);

    lab.server.nft(&["delete", "table", "inet", "sentinel"], "");
    let mut firewall = lab.open_firewall();
    assert!(firewall.list().unwrap().is_empty());
    firewall.ban(&[ban(ATTACKER_V4, HOUR)]).unwrap();
    lab.assert_blocked(ATTACKER_V4);

    // No interval flag and no drop rule: an older or hand-edited table.
    lab.server.nft(&["delete", "table", "inet", "sentinel"], "");
    lab.server.nft(
        &["-f", "-"],
        "table inet sentinel {
            set banned_v4 { type ipv4_addr; flags timeout; elements = { 192.0.2.20 timeout 1h } }
            chain input { type filter hook input priority 0; policy accept; }
        }",
    );
    lab.assert_connects(ATTACKER_V4);
    let mut firewall = lab.open_firewall();
    assert!(find(&firewall.list().unwrap(), "192.0.2.20").is_some());
    lab.assert_blocked(ATTACKER_V4);
    firewall
        .ban(&[ban("2001:db8:b::/48".parse::<IpNet>().unwrap(), HOUR)])
        .unwrap();
    lab.assert_blocked(ATTACKER_V6);
    lab.assert_other_table_untouched();
}

#[test]
fn closing_with_flush_on_exit_removes_only_sentinels_table() {
    let lab = Lab::new();
    let options = FirewallOptions {
        flush_on_exit: true,
        ..lab.options()
    };
    let mut firewall = Firewall::open(options).unwrap();
    firewall
        .ban(&[ban(ATTACKER_V4, HOUR), ban(ATTACKER_V6, HOUR)])
        .unwrap();
    lab.assert_blocked(ATTACKER_V4);

    firewall.close().unwrap();

    lab.assert_connects(ATTACKER_V4);
    lab.assert_connects(ATTACKER_V6);
    let tables = lab.table_names();
    assert!(!tables.contains("sentinel"), "{tables}");
    lab.assert_other_table_untouched();

    lab.open_firewall().remove_table().unwrap();
    assert!(!lab.table_names().contains("sentinel"));
    lab.assert_other_table_untouched();
}

#[test]
fn a_batch_of_eleven_thousand_bans_commits_whole() {
    let lab = Lab::new();
    let mut firewall = lab.open_firewall();
    let v4 = (0..10_000).map(|n| ban(nth_after(STANDING_BANS, n), HOUR));
    let v6 = (0..1_000).map(|n| ban(Ipv6Addr::new(0x2001, 0xdb8, 0xd, n, 0, 0, 0, 1), HOUR));
    let batch: Vec<Ban> = v4.chain(v6).collect();

    firewall.ban(&batch).unwrap();

    assert_eq!(lab.server.sentinel_set("banned_v4").len(), 10_000);
    assert_eq!(lab.server.sentinel_set("banned_v6").len(), 1_000);
    assert_eq!(firewall.list().unwrap().len(), 11_000);
    lab.assert_other_table_untouched();
}

/// Sentinel's table with the IPv6 set limited to one element, which a standing ban fills: the
/// kernel refuses any further IPv6 element. The limit is not part of the shape Sentinel checks,
/// so the table is adopted as it is.
const FULL_V6_SET: &str = "table inet sentinel {
	set banned_v4 { type ipv4_addr; flags interval, timeout; }
	set banned_v6 {
		type ipv6_addr; size 1; flags interval, timeout;
		elements = { 2001:db8:c::1 timeout 1h }
	}
	chain input {
		type filter hook input priority -10; policy accept;
		iif \"lo\" accept
		ip saddr @banned_v4 counter drop
		ip6 saddr @banned_v6 counter drop
	}
}
";

#[test]
fn a_batch_the_kernel_refuses_changes_nothing() {
    let lab = Lab::new();
    lab.server.nft(&["-f", "-"], FULL_V6_SET);
    let mut firewall = lab.open_firewall();
    assert_eq!(firewall.list().unwrap().len(), 1);

    // One batch: an IPv4 ban the kernel would take, and an IPv6 ban it cannot.
    let refused = firewall.ban(&[ban(ATTACKER_V4, HOUR), ban(ATTACKER_V6, HOUR)]);
    assert!(refused.is_err(), "the over-full set took the batch");

    // Neither is in force: the IPv4 half was not committed alone.
    assert!(lab.server.sentinel_set("banned_v4").is_empty());
    let v6 = lab.server.sentinel_set("banned_v6");
    assert_eq!(v6.len(), 1, "{v6:?}");
    assert_eq!(v6[0].net, "2001:db8:c::1");
    lab.assert_connects(ATTACKER_V4);
    lab.assert_connects(ATTACKER_V6);
    let listed: Vec<String> = firewall
        .list()
        .unwrap()
        .iter()
        .map(|ban| ban.net.to_string())
        .collect();
    assert_eq!(listed, ["2001:db8:c::1"]);

    // The same IPv4 ban alone commits.
    firewall.ban(&[ban(ATTACKER_V4, HOUR)]).unwrap();
    lab.assert_blocked(ATTACKER_V4);
    lab.assert_other_table_untouched();
}
