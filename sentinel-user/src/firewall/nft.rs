//! The `nft` command: creates the table from a readable script in one transaction and reads the
//! table back as JSON. Both happen rarely (start-up, recovery, metrics), so one process per call
//! costs nothing that matters, and the ruleset stays in the syntax operators know.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    io::{self, Write as _},
    process::{Command, Output, Stdio},
    time::{Duration, Instant},
};

use serde::Deserialize;
use serde_json::{Value, json};
use tracing::warn;

use super::{
    DropCounters, Dropped, Error, IpNet, SET_V4, SET_V6, TABLE, netns::NetNamespace, view::Expiry,
};

const CHAIN: &str = "input";

/// Ahead of the filter-priority (0) chains of iptables-nft, ufw and most hand-written rulesets,
/// so a banned packet is dropped before their rules count, log or queue it. A drop is final in
/// nftables whatever the order; running first only saves that work. Still after conntrack
/// (-200), so the rule sees every packet of an established connection too and kills it.
const CHAIN_PRIORITY: i32 = -10;

/// The whole table, as created. `interval` lets a set hold networks (IPv6 /64s, CIDR ranges),
/// `timeout` lets the kernel expire bans without the daemon. The rules match every packet, not
/// only new connections, so a banned attacker's open sessions die as well. Packets on `lo` are
/// the host talking to itself, never an attacker: they pass even when a ban covers one of the
/// host's own addresses (an IPv6 prefix shared with an attacker).
pub(super) fn ruleset() -> String {
    format!(
        "table inet {TABLE} {{
	set {SET_V4} {{
		type ipv4_addr
		flags interval, timeout
	}}
	set {SET_V6} {{
		type ipv6_addr
		flags interval, timeout
	}}
	chain {CHAIN} {{
		type filter hook input priority {CHAIN_PRIORITY}; policy accept;
		iif \"lo\" accept
		ip saddr @{SET_V4} counter drop
		ip6 saddr @{SET_V6} counter drop
	}}
}}
"
    )
}

#[derive(Debug)]
pub(super) struct Nft {
    netns: Option<NetNamespace>,
}

impl Nft {
    pub(super) fn new(netns: Option<NetNamespace>) -> Self {
        Self { netns }
    }

    /// Replaces the table (if any) with a fresh one holding `bans`, in one transaction. The
    /// `add` first makes the `delete` valid when there is no table.
    pub(super) fn recreate_table(
        &self,
        bans: &[(IpNet, Expiry)],
        now: Instant,
    ) -> Result<(), Error> {
        let mut script = format!("add table inet {TABLE}\ndelete table inet {TABLE}\n");
        script.push_str(&ruleset());
        for (net, expiry) in bans {
            let set = if net.is_ipv4() { SET_V4 } else { SET_V6 };
            let timeout = match expiry.timeout_ms(now) {
                Some(ms) => format!(" timeout {ms}ms"),
                None => String::new(),
            };
            writeln!(
                script,
                "add element inet {TABLE} {set} {{ {net}{timeout} }}"
            )
            .expect("writing to a String cannot fail");
        }
        self.run_script(&script)
    }

    /// Deletes the table and every ban in it; no error when there is none.
    pub(super) fn delete_table(&self) -> Result<(), Error> {
        self.run_script(&format!(
            "add table inet {TABLE}\ndelete table inet {TABLE}\n"
        ))
    }

    /// The table as it is in the kernel, or `None` when there is no such table.
    pub(super) fn table(&self) -> Result<Option<TableListing>, Error> {
        match self.list(&["list", "table", "inet", TABLE]) {
            Ok(listing) => Ok(Some(TableListing(listing))),
            // The failure may have another cause than a missing table: look before saying so.
            Err(error) if self.table_exists()? => Err(error),
            Err(_) => Ok(None),
        }
    }

    pub(super) fn drop_counters(&self) -> Result<DropCounters, Error> {
        let listing = self.list(&["list", "chain", "inet", TABLE, CHAIN])?;
        let dropped_from = |set: &str| {
            listing
                .rules()
                .filter(|rule| rule.references(set))
                .find_map(RuleListing::counter)
                .unwrap_or_default()
        };
        Ok(DropCounters {
            ipv4: dropped_from(SET_V4),
            ipv6: dropped_from(SET_V6),
        })
    }

    fn table_exists(&self) -> Result<bool, Error> {
        self.table_exists_named(TABLE)
    }

    fn table_exists_named(&self, name: &str) -> Result<bool, Error> {
        let tables = self.list(&["list", "tables", "inet"])?;
        Ok(tables
            .nftables
            .iter()
            .filter_map(|entry| entry.table.as_ref())
            .any(|table| table.name == name))
    }

    /// The rules of `table` (family inet) with their handles; `None` when there is no table.
    pub(super) fn rules(&self, table: &str) -> Result<Option<Vec<Rule>>, Error> {
        match self.list(&["-a", "list", "table", "inet", table]) {
            Ok(listing) => Ok(Some(
                listing
                    .rules()
                    .map(|rule| Rule {
                        chain: rule.chain.clone(),
                        handle: rule.handle,
                        comment: rule.comment.clone(),
                    })
                    .collect(),
            )),
            Err(error) if self.table_exists_named(table)? => Err(error),
            Err(_) => Ok(None),
        }
    }

    pub(super) fn run_script(&self, script: &str) -> Result<(), Error> {
        let args = ["-f", "-"];
        let mut child = self
            .command(&args)
            .stdin(Stdio::piped())
            .spawn()
            .map_err(spawn_error)?;
        let mut stdin = child.stdin.take().expect("stdin is piped");
        let written = stdin.write_all(script.as_bytes());
        drop(stdin);
        let output = child.wait_with_output().map_err(Error::NftSpawn)?;
        check(&args, &output)?;
        // A write error without an nft error would mean nft exited without reading its input.
        written.map_err(Error::NftSpawn)
    }

    fn list(&self, args: &[&str]) -> Result<Listing, Error> {
        let args: Vec<&str> = ["-j"].iter().chain(args).copied().collect();
        let output = self.command(&args).output().map_err(spawn_error)?;
        check(&args, &output)?;
        serde_json::from_slice(&output.stdout).map_err(|source| Error::NftOutput {
            command: args.join(" "),
            source,
        })
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new("nft");
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(netns) = &self.netns {
            netns.enter_on_exec(&mut command);
        }
        command
    }
}

fn spawn_error(error: io::Error) -> Error {
    if error.kind() == io::ErrorKind::NotFound {
        Error::NftMissing
    } else {
        Error::NftSpawn(error)
    }
}

fn check(args: &[&str], output: &Output) -> Result<(), Error> {
    if output.status.success() {
        return Ok(());
    }
    Err(Error::NftFailed {
        command: args.join(" "),
        stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
    })
}

/// `nft -j` output: a list of objects, each keyed by its kind (`table`, `set`, `chain`, `rule`,
/// and kinds Sentinel never creates, which are skipped).
#[derive(Debug, Deserialize)]
struct Listing {
    nftables: Vec<ListingEntry>,
}

#[derive(Debug, Deserialize)]
struct ListingEntry {
    table: Option<TableEntry>,
    set: Option<SetListing>,
    chain: Option<ChainListing>,
    rule: Option<RuleListing>,
}

#[derive(Debug, Deserialize)]
struct TableEntry {
    name: String,
}

#[derive(Debug, Deserialize)]
struct SetListing {
    name: String,
    #[serde(rename = "type")]
    key_type: Value,
    #[serde(default)]
    flags: BTreeSet<String>,
    #[serde(default)]
    elem: Vec<Value>,
}

#[derive(Debug, PartialEq, Deserialize)]
struct ChainListing {
    name: String,
    #[serde(rename = "type")]
    chain_type: Option<String>,
    hook: Option<String>,
    prio: Option<i32>,
    policy: Option<String>,
}

#[derive(Debug, Deserialize)]
struct RuleListing {
    chain: String,
    expr: Vec<Value>,
    #[serde(default)]
    handle: u64,
    comment: Option<String>,
}

/// A rule of a table, as `rules` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Rule {
    pub(super) chain: String,
    pub(super) handle: u64,
    pub(super) comment: Option<String>,
}

impl Listing {
    fn sets(&self) -> impl Iterator<Item = &SetListing> {
        self.nftables.iter().filter_map(|entry| entry.set.as_ref())
    }

    fn chains(&self) -> impl Iterator<Item = &ChainListing> {
        self.nftables
            .iter()
            .filter_map(|entry| entry.chain.as_ref())
    }

    fn rules(&self) -> impl Iterator<Item = &RuleListing> {
        self.nftables.iter().filter_map(|entry| entry.rule.as_ref())
    }
}

impl RuleListing {
    fn references(&self, set: &str) -> bool {
        let reference = Value::String(format!("@{set}"));
        self.expr
            .iter()
            .any(|statement| statement.pointer("/match/right") == Some(&reference))
    }

    fn counter(&self) -> Option<Dropped> {
        self.expr.iter().find_map(|statement| {
            let counter = statement.get("counter")?;
            Some(Dropped {
                packets: counter.get("packets")?.as_u64()?,
                bytes: counter.get("bytes")?.as_u64()?,
            })
        })
    }

    /// The statements with counter values blanked, which change as packets arrive.
    fn statements_without_counts(&self) -> Vec<Value> {
        self.expr
            .iter()
            .map(|statement| match statement.get("counter") {
                Some(_) => json!({ "counter": null }),
                None => statement.clone(),
            })
            .collect()
    }
}

/// Sentinel's table as listed by `nft -j list table`.
#[derive(Debug)]
pub(super) struct TableListing(Listing);

impl TableListing {
    /// Whether the table is exactly what `ruleset()` creates, elements aside.
    pub(super) fn has_expected_shape(&self) -> bool {
        let interval_timeout: BTreeSet<String> = ["interval", "timeout"].map(String::from).into();
        let sets: Vec<(&str, &Value, &BTreeSet<String>)> = self
            .0
            .sets()
            .map(|set| (set.name.as_str(), &set.key_type, &set.flags))
            .collect();
        let expected_sets = [
            (SET_V4, &json!("ipv4_addr"), &interval_timeout),
            (SET_V6, &json!("ipv6_addr"), &interval_timeout),
        ];
        let chains: Vec<&ChainListing> = self.0.chains().collect();
        let expected_chain = ChainListing {
            name: CHAIN.to_owned(),
            chain_type: Some("filter".to_owned()),
            hook: Some("input".to_owned()),
            prio: Some(CHAIN_PRIORITY),
            policy: Some("accept".to_owned()),
        };
        let rules: Vec<(&str, Vec<Value>)> = self
            .0
            .rules()
            .map(|rule| (rule.chain.as_str(), rule.statements_without_counts()))
            .collect();
        let expected_rules = [
            (CHAIN, loopback_rule()),
            (CHAIN, drop_rule("ip", SET_V4)),
            (CHAIN, drop_rule("ip6", SET_V6)),
        ];
        sets == expected_sets && chains == [&expected_chain] && rules == expected_rules
    }

    /// The elements of the banned sets. Elements that are not an address or a prefix (a range
    /// added by hand) cannot be represented and are left out with a warning.
    pub(super) fn bans(&self, now: Instant) -> Vec<(IpNet, Expiry)> {
        let banned_sets = self
            .0
            .sets()
            .filter(|set| set.name == SET_V4 || set.name == SET_V6);
        let mut bans = Vec::new();
        for set in banned_sets {
            for element in &set.elem {
                match parse_element(element, now) {
                    Some(ban) => bans.push(ban),
                    None => warn!("ignoring element {element} of set {}", set.name),
                }
            }
        }
        bans
    }
}

fn loopback_rule() -> Vec<Value> {
    vec![
        json!({ "match": { "op": "==", "left": { "meta": { "key": "iif" } }, "right": "lo" } }),
        json!({ "accept": null }),
    ]
}

fn drop_rule(protocol: &str, set: &str) -> Vec<Value> {
    vec![
        json!({ "match": {
            "op": "==",
            "left": { "payload": { "protocol": protocol, "field": "saddr" } },
            "right": format!("@{set}"),
        } }),
        json!({ "counter": null }),
        json!({ "drop": null }),
    ]
}

/// An element is a bare value, or `{"elem": {"val": ..., "expires": seconds}}` when it has a
/// timeout. `nft` prints whole seconds, rounded down; rounding up instead keeps the mirror from
/// forgetting an element that the kernel still holds.
fn parse_element(element: &Value, now: Instant) -> Option<(IpNet, Expiry)> {
    let (value, expires) = match element.get("elem") {
        Some(wrapped) => (wrapped.get("val")?, wrapped.get("expires")),
        None => (element, None),
    };
    let net = match value {
        Value::String(addr) => addr.parse().ok()?,
        _ => {
            let prefix = value.get("prefix")?;
            let addr = prefix.get("addr")?.as_str()?.parse().ok()?;
            let len = prefix.get("len")?.as_u64()?.try_into().ok()?;
            IpNet::new(addr, len).ok()?
        }
    };
    let expiry = match expires {
        Some(seconds) => Expiry::At(now + Duration::from_secs(seconds.as_u64()? + 1)),
        None => Expiry::Never,
    };
    Some((net, expiry))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from nft 1.0.6 on a table made by `ruleset()`, with a ban in each set.
    const LISTING: &str = r#"{"nftables": [
        {"metainfo": {"version": "1.0.6", "release_name": "Lester Gooch #5", "json_schema_version": 1}},
        {"table": {"family": "inet", "name": "sentinel", "handle": 1}},
        {"set": {"family": "inet", "name": "banned_v4", "table": "sentinel", "type": "ipv4_addr", "handle": 1, "flags": ["interval", "timeout"],
            "elem": [{"elem": {"val": "10.1.1.1", "timeout": 3600, "expires": 3599}}, {"prefix": {"addr": "10.1.2.0", "len": 24}}]}},
        {"set": {"family": "inet", "name": "banned_v6", "table": "sentinel", "type": "ipv6_addr", "handle": 2, "flags": ["interval", "timeout"],
            "elem": [{"elem": {"val": {"prefix": {"addr": "2001:db8:1:2::", "len": 64}}, "timeout": 10800, "expires": 10609}}]}},
        {"chain": {"family": "inet", "table": "sentinel", "name": "input", "handle": 3, "type": "filter", "hook": "input", "prio": -10, "policy": "accept"}},
        {"rule": {"family": "inet", "table": "sentinel", "chain": "input", "handle": 4, "expr": [
            {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}}, {"accept": null}]}},
        {"rule": {"family": "inet", "table": "sentinel", "chain": "input", "handle": 5, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip", "field": "saddr"}}, "right": "@banned_v4"}},
            {"counter": {"packets": 3, "bytes": 180}}, {"drop": null}]}},
        {"rule": {"family": "inet", "table": "sentinel", "chain": "input", "handle": 6, "expr": [
            {"match": {"op": "==", "left": {"payload": {"protocol": "ip6", "field": "saddr"}}, "right": "@banned_v6"}},
            {"counter": {"packets": 0, "bytes": 0}}, {"drop": null}]}}
    ]}"#;

    fn listing(text: &str) -> TableListing {
        TableListing(serde_json::from_str(text).unwrap())
    }

    #[test]
    fn recognises_its_own_table_whatever_the_counters_say() {
        assert!(listing(LISTING).has_expected_shape());
    }

    #[test]
    fn notices_a_changed_shape() {
        for (from, to) in [
            (r#""prio": -10"#, r#""prio": 0"#),
            (r#""interval", "timeout""#, r#""timeout""#),
            (r#""ip6", "field": "saddr""#, r#""ip6", "field": "daddr""#),
            (r#""right": "lo""#, r#""right": "eth0""#),
            (
                r#"{"drop": null}]}}
    ]}"#,
                r#"{"accept": null}]}}
    ]}"#,
            ),
        ] {
            assert!(LISTING.contains(from), "{from}");
            let changed = LISTING.replace(from, to);
            assert!(!listing(&changed).has_expected_shape(), "{from} -> {to}");
        }
    }

    #[test]
    fn reads_elements_with_and_without_timeouts() {
        let now = Instant::now();
        let bans = listing(LISTING).bans(now);
        let expected = [
            ("10.1.1.1", Expiry::At(now + Duration::from_secs(3600))),
            ("10.1.2.0/24", Expiry::Never),
            (
                "2001:db8:1:2::/64",
                Expiry::At(now + Duration::from_secs(10610)),
            ),
        ]
        .map(|(net, expiry)| (net.parse().unwrap(), expiry));
        assert_eq!(bans, expected);
    }
}
