//! The whole configuration: bounded reading, every section's refusals with their positions,
//! what a reload refuses and which settings need a restart.

use std::{path::PathBuf, time::Duration};

use super::*;
use crate::policy::{NESTED_GROUPS, POLICY_KEYS};
use crate::{
    crowdsec::settings::CROWDSEC_KEYS,
    port_scan::settings::PORT_SCAN_KEYS,
    ssh_guard::{GuardMode, settings::SSH_GUARD_KEYS},
};

const SAMPLE: &str = include_str!("../../../deploy/sentinel.yaml");
const SCHEMA: &str = include_str!("../../../deploy/sentinel.schema.json");

/// A path in the temp dir, removed (whatever it is) when dropped.
struct TempPath(PathBuf);

impl TempPath {
    fn new(name: &str) -> Self {
        Self(std::env::temp_dir().join(format!("{}-{name}", std::process::id())))
    }

    fn file(name: &str, contents: &[u8]) -> Self {
        let path = Self::new(name);
        std::fs::write(&path.0, contents).unwrap();
        path
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_dir(&self.0);
    }
}

fn problems(yaml: &str) -> Vec<String> {
    match Config::parse("c.yaml", yaml) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(problems) => problems.iter().map(ToString::to_string).collect(),
    }
}

/// What `sentinel check` prints for the file at `path`.
fn load_problems(path: &Path) -> String {
    match Config::load(Some(path)) {
        Ok(config) => panic!("accepted: {config:?}"),
        Err(error) => error.to_string(),
    }
}

#[test]
fn empty_file_means_defaults() {
    assert_eq!(Config::parse("c.yaml", "").unwrap(), Config::default());
    assert_eq!(
        Config::parse("c.yaml", "# nothing yet\n").unwrap(),
        Config::default()
    );
    assert_eq!(
        Config::default().metrics.listen.to_string(),
        "127.0.0.1:9848"
    );
}

#[test]
fn every_cgroup_backend_is_read() {
    for (text, backend) in [
        ("auto", CgroupBackend::Auto),
        ("systemd", CgroupBackend::Systemd),
        ("cgroupfs", CgroupBackend::Cgroupfs),
    ] {
        let file = format!("services:\n  cgroup_backend: {text}\n");
        let config = Config::parse("c.yaml", &file).unwrap();
        assert_eq!(config.services.cgroup_backend, backend, "{text}");
    }
    assert_eq!(
        Config::default().services.cgroup_backend,
        CgroupBackend::Auto
    );
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    assert_eq!(
        schema["properties"]["services"]["properties"]["cgroup_backend"]["enum"],
        serde_json::json!(["auto", "systemd", "cgroupfs"])
    );
}

#[test]
fn reads_every_section() {
    let config = Config::parse(
        "c.yaml",
        "metrics:\n  listen: 0.0.0.0:9000\n  resource_refresh: 30s\n  resource_detail: \
         full\nservices:\n  max_labels: 3\n  cgroup_backend: \
         cgroupfs\n  forget_removed_after: 1h\nssh_guard:\n  ban_for: 1h\n  multiplier: 1.5\n  allow: [10.0.0.0/8]\n  \
         netns: /run/netns/web\n",
    )
    .unwrap();
    assert_eq!(config.metrics.listen.to_string(), "0.0.0.0:9000");
    assert_eq!(config.metrics.resource_refresh, Duration::from_secs(30));
    assert_eq!(config.metrics.resource_detail, ResourceDetail::Full);
    assert_eq!(config.services.max_labels, 3);
    assert_eq!(config.services.cgroup_backend, CgroupBackend::Cgroupfs);
    assert_eq!(
        config.services.forget_removed_after,
        Duration::from_secs(3600)
    );
    assert_eq!(config.ssh_guard.ban_for, Duration::from_secs(3600));
    assert_eq!(config.ssh_guard.multiplier, 1.5);
    assert_eq!(config.ssh_guard.allow, vec!["10.0.0.0/8".parse().unwrap()]);
    assert_eq!(
        config.ssh_guard.netns,
        Some(PathBuf::from("/run/netns/web"))
    );
    // Empty sections keep their defaults.
    assert_eq!(
        Config::parse("c.yaml", "metrics:\nservices: {}\nssh_guard:\n").unwrap(),
        Config::default()
    );
}

#[test]
fn forget_removed_after_is_bounded_to_a_second_and_a_day() {
    for (value, problem) in [
        ("500ms", "must be at least 1s, found \"500ms\""),
        ("2d", "must be at most 1d, found \"2d\""),
        (
            "soon",
            "expected a duration from 1s to 1d, such as 10m, found \"soon\"",
        ),
    ] {
        assert_eq!(
            problems(&format!("services:\n  forget_removed_after: {value}\n")),
            [format!("c.yaml:2:25: forget_removed_after: {problem}")]
        );
    }
}

#[test]
fn the_sample_configuration_is_valid() {
    let config = Config::parse("sentinel.yaml", SAMPLE);
    assert!(config.is_ok(), "{:?}", config.err());
}

#[test]
fn every_section_reports_every_problem_with_its_position() {
    assert_eq!(
        problems(
            "metrics:
  listen: localhost:http
  lisen: 127.0.0.1:1
  resource_refresh: 500ms
  resource_detail: everything
services:
  max_labels: 0
  cgroup_backend: systemd-ish
policies:
  - name: web
    unit: web.service
    memory.max: 512
ssh_guard:
  enabled: yes please
  max_failures: 0
  window: 0s
  ban_for: 0
  multiplier: 0.5
  max_ban: 36501d
  allow: [10.0.0.0/8, 300.1.2.3]
  ipv6_prefix: 129
  max_tracked: 0
  max_banned: 0
  audit_log: audit.log
  ban_fro: 1h
sentinel: {}
"
        ),
        [
            "c.yaml:2:11: listen: expected an address and port such as 127.0.0.1:9848 or \
             [::1]:9848, found \"localhost:http\"",
            "c.yaml:3:3: unknown metrics setting \"lisen\"; did you mean \"listen\"?",
            "c.yaml:4:21: resource_refresh: must be at least 1s, found \"500ms\"",
            "c.yaml:5:20: resource_detail: expected basic or full, found \"everything\"",
            "c.yaml:7:15: max_labels: must be at least 1, found 0",
            "c.yaml:8:19: cgroup_backend: expected auto, systemd or cgroupfs, found \"systemd-ish\"",
            "c.yaml:12:17: memory.max: must be at least 1M; a number without a suffix is bytes, \
             found 512",
            "c.yaml:14:12: enabled: expected true or false, found \"yes please\"",
            "c.yaml:15:17: max_failures: must be at least 1, found 0",
            "c.yaml:16:11: window: must be longer than 0s, found \"0s\"",
            "c.yaml:17:12: ban_for: must be longer than 0s, found 0",
            "c.yaml:18:15: multiplier: must be at least 1 (1 keeps every ban as long as the \
             first), found 0.5",
            "c.yaml:19:12: max_ban: must be at most 36500d (100 years), the longest ban the \
             firewall sets, found \"36501d\"",
            "c.yaml:20:23: allow: expected an address or network such as 192.0.2.7, 10.0.0.0/8 \
             or 2001:db8::/32, found \"300.1.2.3\"",
            "c.yaml:21:16: ipv6_prefix: must be between 1 and 128, found 129",
            "c.yaml:22:16: max_tracked: must be at least 1, found 0",
            "c.yaml:23:15: max_banned: must be at least 1, found 0",
            "c.yaml:24:14: audit_log: expected an absolute path, found \"audit.log\"",
            "c.yaml:25:3: unknown ssh_guard setting \"ban_fro\"; did you mean \"ban_for\"?",
            "c.yaml:26:1: unknown top-level key \"sentinel\"; expected one of metrics, \
             services, policies, ssh_guard, crowdsec, port_scan",
        ]
    );
}

#[test]
fn ban_lengths_stay_within_what_the_firewall_sets() {
    assert_eq!(
        problems("ssh_guard:\n  ban_for: 2h\n  max_ban: 1h\n"),
        ["c.yaml:3:12: max_ban (1h) must not be shorter than ban_for (2h)"]
    );
    // Against the default max_ban (1w), the position is ban_for's.
    assert_eq!(
        problems("ssh_guard:\n  ban_for: 2w\n"),
        ["c.yaml:2:12: max_ban (1w) must not be shorter than ban_for (2w)"]
    );
    let longest = Config::parse(
        "c.yaml",
        "ssh_guard:\n  ban_for: 36500d\n  max_ban: 36500d\n",
    )
    .unwrap()
    .ssh_guard;
    assert_eq!(longest.max_ban, crate::firewall::MAX_BAN_TIMEOUT);
    assert_eq!(
        problems("ssh_guard:\n  ipv6_prefix: 0\n  multiplier: .inf\n  window: -1m\n"),
        [
            "c.yaml:2:16: ipv6_prefix: must be between 1 and 128, found 0",
            "c.yaml:3:15: multiplier: expected a number of at least 1, such as 2 or 1.5, found \
             \".inf\"",
            "c.yaml:4:11: window: must not be negative, found \"-1m\"",
        ]
    );
    assert_eq!(
        problems("ssh_guard:\n  preauth_weight: 1.5\n"),
        [
            "c.yaml:2:19: preauth_weight: must be from 0 (pre-authentication disconnects not \
             counted) to 1 (counted as a failed password), found 1.5"
        ]
    );
    assert_eq!(
        problems("ssh_guard: {preauth_weight: 0.333}\n"),
        ["c.yaml:1:29: preauth_weight: must have at most two decimal places, found 0.333"]
    );
    assert_eq!(
        problems("ssh_guard: {preauth_weight: half}\n"),
        ["c.yaml:1:29: preauth_weight: expected a number from 0 to 1, such as 0.5, found \"half\""]
    );
    for (text, hundredths) in [("0", 0), ("0.25", 25), ("1", 100)] {
        let config = Config::parse(
            "c.yaml",
            &format!("ssh_guard: {{preauth_weight: {text}}}\n"),
        )
        .unwrap();
        assert_eq!(
            config.ssh_guard.preauth_weight,
            crate::ssh_guard::engine::Weight(hundredths)
        );
    }
    assert_eq!(
        problems("metrics: {listen: 127.0.0.1:0}\nssh_guard: {max_failures: 4294967296}\n"),
        [
            "c.yaml:1:19: listen: needs a port: 0 would pick a different one at every start, \
             found \"127.0.0.1:0\"",
            "c.yaml:2:27: max_failures: is too large, found 4294967296",
        ]
    );
}

#[test]
fn wrong_section_shapes() {
    assert_eq!(
        problems("metrics: [listen]\nssh_guard: 5\nservices:\n  max_labels: {}\n"),
        [
            "c.yaml:1:10: metrics: expected a mapping of settings, found a list",
            "c.yaml:2:12: ssh_guard: expected a mapping of settings, found 5",
            "c.yaml:4:15: max_labels: expected a whole number of at least 1, found a mapping",
        ]
    );
    assert_eq!(
        problems("ssh_guard:\n  allow: 10.0.0.0/8\n"),
        ["c.yaml:2:10: allow: expected a list of addresses and networks, found \"10.0.0.0/8\""]
    );
}

#[test]
fn non_regular_files_are_refused_without_reading() {
    let fifo = TempPath::new("config.fifo");
    nix::unistd::mkfifo(&fifo.0, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
    let name = fifo.0.display();
    assert_eq!(
        load_problems(&fifo.0),
        format!(
            "{name}:1:1: not a regular file but a FIFO (named pipe); the configuration must be \
             a regular file"
        )
    );
    assert_eq!(
        load_problems(Path::new("/dev/zero")),
        "/dev/zero:1:1: not a regular file but a character device; the configuration must be \
         a regular file"
    );
    let dir = TempPath::new("config.d");
    std::fs::create_dir(&dir.0).unwrap();
    assert!(load_problems(&dir.0).ends_with(
        ":1:1: not a regular file but a directory; the \
                                          configuration must be a regular file"
    ));
}

#[test]
fn files_over_one_mebibyte_are_refused_before_parsing() {
    // Unparsable: any YAML error would show that parsing had started.
    let oversized = TempPath::file("oversized.yaml", &vec![b'['; 2 << 20]);
    assert_eq!(
        load_problems(&oversized.0),
        format!(
            "{}:1:1: the file is 2097152 bytes; the limit is 1 MiB (1048576 bytes)",
            oversized.0.display()
        )
    );
    let mut at_the_limit = vec![b'#'; MAX_FILE_BYTES as usize - 1];
    at_the_limit.push(b'\n');
    let at_the_limit = TempPath::file("at-the-limit.yaml", &at_the_limit);
    assert_eq!(
        Config::load(Some(&at_the_limit.0)).unwrap(),
        Config::default()
    );
}

#[test]
fn a_huge_key_is_refused_with_its_position() {
    let mut text = "k".repeat(MAX_FILE_BYTES as usize - 16);
    text.push_str(": 1\n");
    assert_eq!(
        problems(&text),
        [
            "c.yaml:1:1048561: mapping values are not allowed in this context; a key may be at \
             most 1024 characters long"
        ]
    );
    // Up to the limit, an unknown key is named, cut short.
    assert_eq!(
        problems(&format!("{}: 1\n", "k".repeat(1024))),
        [format!(
            "c.yaml:1:1: unknown top-level key {:?}… (1024 bytes); expected one of metrics, \
             services, policies, ssh_guard, crowdsec, port_scan",
            "k".repeat(40)
        )]
    );
}

#[test]
fn deep_nesting_is_refused_with_its_position() {
    let text = format!("policies: {}{}\n", "[".repeat(100), "]".repeat(100));
    assert_eq!(
        problems(&text),
        [
            "c.yaml:1:26: YAML document too large or too complex: limits breached: Depth { depth: \
          17 }"
        ]
    );
}

#[test]
fn unreadable_files_say_why_and_where() {
    let binary = TempPath::file("binary.yaml", b"policies:\n  - n\xffme: web\n");
    assert_eq!(
        load_problems(&binary.0),
        format!(
            "{}:2:6: the file is not UTF-8 text: byte 0xff here is not valid",
            binary.0.display()
        )
    );
    assert!(
        load_problems(Path::new("/nonexistent/sentinel.yaml"))
            .starts_with("/nonexistent/sentinel.yaml:1:1: cannot read the file: "),
    );
}

#[test]
fn a_reload_refuses_a_file_without_settings() {
    for (name, contents) in [
        ("empty.yaml", ""),
        ("blank.yaml", "\n\n"),
        ("comments.yaml", "# policies:\n"),
    ] {
        let file = TempPath::file(name, contents.as_bytes());
        // At start, the same file means every default.
        assert_eq!(Config::load(Some(&file.0)).unwrap(), Config::default());
        let refused = Config::reload(&file.0).unwrap_err().to_string();
        assert_eq!(
            refused,
            format!("{}:1:1: {NOTHING_TO_RELOAD}", file.0.display())
        );
    }
    let no_policies = TempPath::file("no-policies.yaml", b"policies: []\n");
    assert_eq!(Config::reload(&no_policies.0).unwrap(), Config::default());
    let cut_short = TempPath::file(
        "cut-short.yaml",
        b"policies:\n  - name: web\n    unit: web.service\n    memory.max: 51",
    );
    assert_eq!(
        Config::reload(&cut_short.0).unwrap_err().to_string(),
        format!(
            "{}:4:17: memory.max: must be at least 1M; a number without a suffix is bytes, \
             found 51",
            cut_short.0.display()
        )
    );
}

/// The `ssh_guard` settings a reload applies to the running guard.
const SSH_GUARD_LIVE: [&str; 11] = [
    "allow",
    "ban_for",
    "flush_on_exit",
    "ipv6_prefix",
    "max_ban",
    "max_banned",
    "max_failures",
    "max_tracked",
    "multiplier",
    "preauth_weight",
    "window",
];

#[test]
fn restart_only_changes_name_every_setting_a_reload_does_not_apply() {
    let started = Config::default();
    let unchanged = started.restart_only_changes(&started);
    assert!(unchanged.iter().all(|(_, changed)| !changed));
    let mut names: Vec<&str> = unchanged.iter().map(|(name, _)| *name).collect();
    names.sort_unstable();
    let mut expected = vec![
        "metrics.listen",
        "metrics.resource_detail",
        "metrics.resource_refresh",
        "services.max_labels",
        "services.cgroup_backend",
        "services.forget_removed_after",
    ];
    let ssh_guard: Vec<String> = SSH_GUARD_KEYS
        .iter()
        .filter(|key| !SSH_GUARD_LIVE.contains(key))
        .map(|key| format!("ssh_guard.{key}"))
        .collect();
    expected.extend(ssh_guard.iter().map(String::as_str));
    // The fleet's client, credentials and tasks are set up at start.
    let crowdsec: Vec<String> = CROWDSEC_KEYS
        .iter()
        .map(|key| format!("crowdsec.{key}"))
        .collect();
    expected.extend(crowdsec.iter().map(String::as_str));
    // Its kernel program is attached at start or not at all; its settings apply on reload.
    expected.push("port_scan");
    expected.sort_unstable();
    assert_eq!(names, expected);

    let new = Config::parse(
        "c.yaml",
        "ssh_guard: {max_failures: 3, mode: observe, allow: [192.0.2.0/24]}\nservices: \
         {max_labels: 9}\npolicies:\n  - {name: web, unit: web.service, cpu.weight: 50}\n",
    )
    .unwrap();
    let changed: Vec<&str> = started
        .restart_only_changes(&new)
        .into_iter()
        .filter(|(_, changed)| *changed)
        .map(|(name, _)| name)
        .collect();
    assert_eq!(changed, ["services.max_labels", "ssh_guard.mode"]);
    // What a reload hands to the running guard.
    let live = new.ssh_guard.live();
    assert_eq!(live.rules.max_failures, 3);
    assert_eq!(live.rules.allow, ["192.0.2.0/24".parse().unwrap()]);
}

#[test]
fn the_schema_knows_every_key() {
    let schema: serde_json::Value = serde_json::from_str(SCHEMA).unwrap();
    let keys = |properties: &serde_json::Value| {
        let mut keys: Vec<String> = properties.as_object().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    };
    let sorted = |keys: &[&str]| {
        let mut keys: Vec<String> = keys.iter().map(ToString::to_string).collect();
        keys.sort();
        keys
    };
    let sections = &schema["properties"];
    assert_eq!(keys(sections), sorted(TOP_LEVEL_KEYS));
    assert_eq!(
        keys(&sections["metrics"]["properties"]),
        sorted(METRICS_KEYS)
    );
    assert_eq!(
        keys(&sections["services"]["properties"]),
        sorted(SERVICES_KEYS)
    );
    assert_eq!(
        keys(&sections["ssh_guard"]["properties"]),
        sorted(SSH_GUARD_KEYS)
    );
    assert_eq!(
        keys(&sections["crowdsec"]["properties"]),
        sorted(CROWDSEC_KEYS)
    );
    assert_eq!(
        keys(&sections["port_scan"]["properties"]),
        sorted(PORT_SCAN_KEYS)
    );
    let policy_keys: Vec<&str> = POLICY_KEYS.iter().chain(NESTED_GROUPS).copied().collect();
    assert_eq!(
        keys(&schema["definitions"]["policy"]["properties"]),
        sorted(&policy_keys)
    );
    for group in NESTED_GROUPS {
        let nested: Vec<String> =
            keys(&schema["definitions"][format!("{group}_group")]["properties"])
                .into_iter()
                .map(|key| format!("{group}.{key}"))
                .collect();
        let dotted: Vec<String> = sorted(POLICY_KEYS)
            .into_iter()
            .filter(|key| key.starts_with(&format!("{group}.")))
            .collect();
        assert_eq!(nested, dotted);
    }
}

#[test]
fn port_scan_is_read_bounded_and_needs_an_enforcing_guard() {
    assert_eq!(
        Config::parse("c.yaml", "metrics:\n").unwrap().port_scan,
        None
    );
    let config = Config::parse("c.yaml", "port_scan:\n").unwrap();
    assert_eq!(config.port_scan, Some(PortScanConfig::default()));
    let config = Config::parse(
        "c.yaml",
        "port_scan:\n  mode: observe\n  ports: 5\n  window: 1m\n",
    )
    .unwrap();
    let port_scan = config.port_scan.unwrap();
    assert_eq!(port_scan.mode(), GuardMode::Observe);
    assert_eq!(
        (port_scan.ports, port_scan.window),
        (5, Duration::from_secs(60))
    );
    for (text, problem) in [
        (
            "port_scan:\n  ports: 1\n",
            "c.yaml:2:10: ports: must be at least 2, found 1",
        ),
        (
            "port_scan:\n  ports: 1001\n",
            "c.yaml:2:10: ports: must be at most 1000, found 1001",
        ),
        (
            "port_scan:\n  ports: many\n",
            "c.yaml:2:10: ports: expected a whole number from 2 to 1000, found \"many\"",
        ),
        (
            "port_scan:\n  window: 500ms\n",
            "c.yaml:2:11: window: must be at least 1s, found \"500ms\"",
        ),
        (
            "port_scan:\n  window: 2h\n",
            "c.yaml:2:11: window: must be at most 1h, found \"2h\"",
        ),
        (
            "port_scan:\n  mode: block\n",
            "c.yaml:2:9: mode: expected enforce or observe, found \"block\"",
        ),
        (
            "port_scan:\n  port: 20\n",
            "c.yaml:2:3: unknown port_scan setting \"port\"; did you mean \"ports\"?",
        ),
        (
            "ssh_guard:\n  enabled: false\nport_scan:\n",
            "c.yaml:3:1: port_scan needs the SSH guard (ssh_guard.enabled: true): it owns the \
             firewall, the allow list and the ban settings port-scan bans use",
        ),
        (
            "ssh_guard:\n  mode: observe\nport_scan:\n  mode: enforce\n",
            "c.yaml:3:1: port_scan.mode: enforce needs ssh_guard.mode: enforce: port-scan bans \
             go into the SSH guard's firewall, which an observing guard does not touch; set \
             port_scan.mode: observe, or ssh_guard.mode: enforce",
        ),
    ] {
        assert_eq!(problems(text), [problem], "{text}");
    }
    // An observing detector beside an observing guard is fine.
    assert!(
        Config::parse(
            "c.yaml",
            "ssh_guard:\n  mode: observe\nport_scan:\n  mode: observe\n"
        )
        .is_ok()
    );
}
