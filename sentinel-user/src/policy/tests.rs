//! The `policies` section through the whole configuration's checks: each refusal with its
//! exact position and reason.

use std::{sync::Arc, time::Duration};

use super::*;
use crate::config::Config;

const SAMPLE: &str = include_str!("../../../deploy/sentinel.yaml");

fn accepted(yaml: &str) -> Policy {
    match Config::parse("p.yaml", yaml) {
        Ok(config) => config.policies,
        Err(problems) => {
            let problems: Vec<_> = problems.iter().map(ToString::to_string).collect();
            panic!("refused:\n{}", problems.join("\n"))
        }
    }
}

fn problems(yaml: &str) -> Vec<String> {
    match Config::parse("p.yaml", yaml) {
        Ok(config) => panic!("accepted: {:?}", config.policies),
        Err(problems) => problems.iter().map(ToString::to_string).collect(),
    }
}

fn glob(pattern: &str) -> CgroupGlob {
    CgroupGlob::new(pattern).unwrap()
}

#[test]
fn dotted_and_nested_keys_read_the_same() {
    let dotted = accepted(
        "policies:
  - name: web
    unit: nginx.service
    memory.max: 1G
    memory.high: 800M
    cpu.max: 150%
    cpu.weight: 200
    pids.max: 512
    terminate_above: 900M
    for: 10s
",
    );
    let nested = accepted(
        "policies:
  - name: web
    unit: nginx.service
    memory: {max: 1G, high: 800M}
    cpu:
      max: 1.5
      weight: 200
    pids: {max: 512}
    terminate_above: 900M
    for: 10
",
    );
    assert_eq!(dotted, nested);
    let expected = ServicePolicy {
        name: "web".into(),
        target: Target::Unit("nginx.service".into()),
        mode: Mode::Enforce,
        limits: Limits {
            memory_max: Some(Limit::Limited(1 << 30)),
            memory_high: Some(Limit::Limited(800 << 20)),
            cpu_max: Some(Limit::Limited(CpuQuota { micros: 150_000 })),
            cpu_weight: Some(200),
            pids_max: Some(Limit::Limited(512)),
        },
        graceful_stop: Some(GracefulStop {
            terminate_above: 900 << 20,
            sustained_for: Duration::from_secs(10),
            grace: DEFAULT_GRACE,
        }),
        containment: None,
    };
    assert_eq!(dotted.services, [Arc::new(expected)]);
}

#[test]
fn limits_become_cgroup_files() {
    let policy = accepted(
        "policies:
  - name: workers
    cgroup: workers/*
    mode: observe
    memory.max: max
    memory.high: 1536M
    cpu.max: 50%
    pids.max: max
",
    );
    let service = &policy.services[0];
    assert_eq!(service.mode, Mode::Observe);
    assert_eq!(service.target, Target::Cgroup(glob("workers/*")));
    assert!(service.target.matches("/workers/batch-1"));
    assert!(!service.target.matches("/workers"));
    assert_eq!(
        service.limits.to_cgroup_files(),
        [
            ("memory.max", "max".to_string()),
            ("memory.high", "1610612736".into()),
            ("cpu.max", "50000 100000".into()),
            ("pids.max", "max".into()),
        ]
    );
    assert_eq!(service.graceful_stop, None);
}

#[test]
fn graceful_stop_defaults() {
    let policy = accepted(
        "policies:
  - name: web
    cgroup: system.slice/nginx.service
    unit: nginx.service
    terminate_above: 2G
    grace: 500ms
",
    );
    let service = &policy.services[0];
    assert_eq!(
        service.target,
        Target::CgroupAndUnit {
            cgroup: glob("system.slice/nginx.service"),
            unit: "nginx.service".into(),
        }
    );
    assert_eq!(
        service.graceful_stop,
        Some(GracefulStop {
            terminate_above: 2 << 30,
            sustained_for: Duration::ZERO,
            grace: Duration::from_millis(500),
        })
    );
}

#[test]
fn anchors_and_merge_keys_share_settings() {
    let policy = accepted(
        "policies:
  - &web
    name: web
    unit: web.service
    memory.max: 1G
  - <<: *web
    name: api
    unit: api.service
",
    );
    let [web, api] = &policy.services[..] else {
        panic!("{policy:?}");
    };
    assert_eq!(api.name, "api");
    assert_eq!(api.target, Target::Unit("api.service".into()));
    assert_eq!(api.limits, web.limits);
}

#[test]
fn files_without_policies_are_valid() {
    assert_eq!(accepted(""), Policy::default());
    assert_eq!(accepted("# nothing yet\n"), Policy::default());
    assert_eq!(accepted("policies:\n"), Policy::default());
    assert_eq!(
        accepted("metrics:\n  listen: 127.0.0.1:9848\nservices: {max_labels: 8}\nssh_guard: {}\n"),
        Policy::default()
    );
}

#[test]
fn unknown_keys_come_with_a_suggestion() {
    assert_eq!(
        problems(
            "metrics:
  listen: 127.0.0.1:9848
polices: []
policies:
  - name: web
    unit: web.service
    memroy.max: 1G
    memory: {maxx: 1G}
    colour: blue
    cpu.weight: 100
"
        ),
        [
            "p.yaml:3:1: unknown top-level key \"polices\"; did you mean \"policies\"?",
            "p.yaml:7:5: unknown policy key \"memroy.max\"; did you mean \"memory.max\"?",
            "p.yaml:8:14: unknown policy key \"memory.maxx\"; did you mean \"memory.max\"?",
            "p.yaml:9:5: unknown policy key \"colour\"; expected one of name, cgroup, unit, \
             mode, memory.max, memory.high, cpu.max, cpu.weight, pids.max, terminate_above, \
             for, grace, exec.allow, on_violation",
        ]
    );
}

#[test]
fn duplicate_keys_and_names() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    memory.max: 1G
    memory.max: 2G
    memory: {max: 3G}
  - name: web
    unit: other.service
    cpu.weight: 10
policies: []
"
        ),
        [
            "p.yaml:5:5: duplicate key \"memory.max\" (first at line 4, column 5)",
            "p.yaml:6:14: duplicate key \"memory.max\" (first at line 4, column 5)",
            "p.yaml:7:11: duplicate policy name \"web\" (first at line 2, column 11)",
            "p.yaml:10:1: duplicate key \"policies\" (first at line 1, column 1)",
        ]
    );
}

#[test]
fn wrong_types() {
    assert_eq!(
        problems(
            "policies:
  - name: [web]
    unit: yes
    memory.max: {a: 1}
    cpu.weight: \"x\"
    mode: true
    cpu: 50%
  - just text
  - name: web
    1: one
    unit: web.service
    grace: 1.5
    terminate_above: 1G
"
        ),
        [
            "p.yaml:2:11: name: expected a name such as web, found a list",
            "p.yaml:3:11: unit: expected a systemd unit such as nginx.service, found true",
            "p.yaml:4:17: memory.max: expected a size such as 512M or 2G, a number of bytes, \
             or max, found a mapping",
            "p.yaml:5:17: cpu.weight: expected a whole number from 1 to 10000, found \"x\"",
            "p.yaml:6:11: mode: expected enforce or observe, found true",
            "p.yaml:7:10: cpu: expected a mapping such as {max: …}, found \"50%\"",
            "p.yaml:8:5: expected a policy: a mapping such as {name: web, unit: web.service, \
             memory.max: 1G}, found \"just text\"",
            "p.yaml:10:5: keys must be text, found 1",
            "p.yaml:12:12: grace: expected a duration such as 10s, 500ms or 2m, or a number of \
             seconds, found 1.5",
        ]
    );
    assert_eq!(
        problems("policies: {web: {}}\n"),
        ["p.yaml:1:11: policies: expected a list of policies, found a mapping"]
    );
    assert_eq!(
        problems("- metrics\n"),
        [
            "p.yaml:1:1: expected a mapping with the sections metrics, services, policies, \
             ssh_guard, crowdsec and port_scan, found a list"
        ]
    );
}

#[test]
fn zero_negative_and_overflowing_sizes() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    memory.max: 0
    memory.high: -5M
  - name: api
    unit: api.service
    memory.max: 16E
    memory.high: 99999999999999999999
    terminate_above: 0K
  - name: db
    unit: db.service
    memory.max: 1.5G
"
        ),
        [
            "p.yaml:4:17: memory.max: must be greater than zero, found 0",
            "p.yaml:5:18: memory.high: must not be negative, found \"-5M\"",
            "p.yaml:8:17: memory.max: does not fit in 64 bits, found \"16E\"",
            "p.yaml:9:18: memory.high: does not fit in 64 bits, found 100000000000000000000",
            "p.yaml:10:22: terminate_above: must be greater than zero, found \"0K\"",
            "p.yaml:13:17: memory.max: expected a size such as 512M or 2G, a number of bytes, \
             or max, found \"1.5G\"",
        ]
    );
}

#[test]
fn memory_high_above_memory_max() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    memory.max: 512M
    memory.high: 600M
"
        ),
        ["p.yaml:5:18: memory.high (600M) must not be above memory.max (512M)"]
    );
    accepted(
        "policies:
  - name: web
    unit: web.service
    memory.max: 512M
    memory.high: 512M
",
    );
}

#[test]
fn terminate_above_must_stay_below_memory_max() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    memory: {max: 512M}
    terminate_above: 512M
  - name: api
    unit: api.service
    memory.max: 1G
    terminate_above: 2G
    memory.high: max
"
        ),
        [
            "p.yaml:5:22: terminate_above (512M) must be below memory.max (512M), or the \
             kernel's OOM killer acts first",
            "p.yaml:9:22: terminate_above (2G) must be below memory.max (1G), or the kernel's \
             OOM killer acts first",
        ]
    );
}

#[test]
fn bad_globs_and_units() {
    assert_eq!(
        problems(
            "policies:
  - {name: a, cgroup: a//b, cpu.weight: 1}
  - {name: b, cgroup: /, cpu.weight: 1}
  - {name: c, cgroup: 'x/**y', cpu.weight: 1}
  - {name: d, cgroup: 'w/[ab]', cpu.weight: 1}
  - {name: e, cgroup: a/../b, cpu.weight: 1}
  - {name: f, unit: nginx, cpu.weight: 1}
  - {name: g, unit: system.slice/nginx.service, cpu.weight: 1}
"
        ),
        [
            "p.yaml:2:23: cgroup: has an empty path segment, found \"a//b\"",
            "p.yaml:3:23: cgroup: must name a cgroup below the root, found \"/\"",
            "p.yaml:4:23: cgroup: uses ** inside a segment; ** must be a whole segment, as in \
             a/**/b, found \"x/**y\"",
            "p.yaml:5:23: cgroup: may only use the wildcards *, ? and **, found \"w/[ab]\"",
            "p.yaml:6:23: cgroup: must not contain . or .. segments, found \"a/../b\"",
            "p.yaml:7:21: unit: must be a unit with a cgroup: a name ending in .service, .scope \
             or .slice, found \"nginx\"",
            "p.yaml:8:21: unit: expected a systemd unit such as nginx.service, found \
             \"system.slice/nginx.service\"",
        ]
    );
}

#[test]
fn incomplete_policies() {
    assert_eq!(
        problems(
            "policies:
  - cgroup: workers/*
    for: 10s
    grace: 1s
  - name: idle
    mode: enforcing
"
        ),
        [
            "p.yaml:2:5: policy sets nothing; add one of memory.max, memory.high, cpu.max, \
             cpu.weight, pids.max, terminate_above, exec.allow",
            "p.yaml:2:5: policy needs a name",
            "p.yaml:3:5: for: only applies with terminate_above",
            "p.yaml:4:5: grace: only applies with terminate_above",
            "p.yaml:5:5: policy sets nothing; add one of memory.max, memory.high, cpu.max, \
             cpu.weight, pids.max, terminate_above, exec.allow",
            "p.yaml:5:5: policy needs a cgroup or a unit to match",
            "p.yaml:6:11: mode: expected enforce or observe, found \"enforcing\"",
        ]
    );
}

#[test]
fn cpu_weight_and_pids_ranges() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    cpu.max: 0.5%
    cpu.weight: 0
    pids.max: 5000000
  - name: api
    unit: api.service
    cpu.max: -1
    cpu.weight: 10001
    pids.max: 0
"
        ),
        [
            "p.yaml:4:14: cpu.max: must be at least 1% of a CPU, the kernel's minimum, found \
             \"0.5%\"",
            "p.yaml:5:17: cpu.weight: must be between 1 and 10000, found 0",
            "p.yaml:6:15: pids.max: must be between 1 and 4194304, the kernel's limit, found \
             5000000",
            "p.yaml:9:14: cpu.max: must not be negative, found -1",
            "p.yaml:10:17: cpu.weight: must be between 1 and 10000, found 10001",
            "p.yaml:11:15: pids.max: must be between 1 and 4194304, the kernel's limit, found 0",
        ]
    );
}

#[test]
fn yaml_syntax_errors_point_at_the_spot() {
    assert_eq!(
        problems("policies:\n  - name: web\n    unit: [web.service\n"),
        ["p.yaml:3:11: unclosed bracket '['"]
    );
    assert_eq!(
        problems("policies:\n  - name: web\n   unit: web.service\n"),
        ["p.yaml:3:4: while parsing a block collection, did not find expected '-' indicator"]
    );
    assert_eq!(
        problems("policies:\n  - name: web\n    memory.max: *nothing\n"),
        ["p.yaml:3:17: reference to unknown value"]
    );
    assert_eq!(
        problems("policies: []\n---\npolicies: []\n"),
        ["p.yaml:3:1: only single YAML document expected but multiple found"]
    );
}

#[test]
fn alias_bombs_are_cut_short() {
    let mut bomb =
        String::from("policies:\n  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n");
    for (previous, next) in ('a'..'i').zip('b'..'j') {
        let aliases = vec![format!("*{previous}"); 9].join(", ");
        bomb.push_str(&format!("  - &{next} [{aliases}]\n"));
    }
    // Refused where the replay limit was hit (how fast is the bench's business, not a test's).
    let problems = problems(&bomb);
    assert_eq!(
        problems,
        [format!(
            "p.yaml:6:9: YAML document too large or too complex: total_replayed_events={} > {}",
            crate::yaml::MAX_ALIAS_EVENTS + 1,
            crate::yaml::MAX_ALIAS_EVENTS
        )]
    );
}

#[test]
fn the_sample_configuration_is_valid() {
    let policy = accepted(SAMPLE);
    assert!(policy.services.len() >= 3, "{policy:?}");
    assert!(
        policy
            .services
            .iter()
            .any(|service| service.target.matches("/system.slice/nginx.service"))
    );
}

#[test]
fn memory_below_one_mebibyte_is_refused() {
    let floor = "must be at least 1M; a number without a suffix is bytes";
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    memory.max: 512
    memory.high: 1023K
    terminate_above: 4096
"
        ),
        [
            format!("p.yaml:4:17: memory.max: {floor}, found 512"),
            format!("p.yaml:5:18: memory.high: {floor}, found \"1023K\""),
            format!("p.yaml:6:22: terminate_above: {floor}, found 4096"),
        ]
    );
    let policy = accepted("policies:\n  - {name: web, unit: web.service, memory.max: 1M}\n");
    assert_eq!(
        policy.services[0].limits.memory_max,
        Some(Limit::Limited(1 << 20))
    );
}

#[test]
fn exec_allow_lists_and_violation_actions_read_both_ways() {
    let dotted = accepted(
        "policies:
  - name: web
    unit: nginx.service
    exec.allow: [/usr/sbin/nginx, /usr/bin/php-fpm8.2]
    on_violation: freeze
  - name: api
    cgroup: api/*
    exec: {allow: [/usr/bin/api]}
",
    );
    let containment: Vec<_> = dotted
        .services
        .iter()
        .map(|policy| policy.containment.clone().unwrap())
        .collect();
    assert_eq!(
        containment,
        [
            ExecContainment {
                allow: vec!["/usr/sbin/nginx".into(), "/usr/bin/php-fpm8.2".into()],
                on_violation: OnViolation::Freeze,
            },
            ExecContainment {
                allow: vec!["/usr/bin/api".into()],
                on_violation: OnViolation::Alert,
            },
        ]
    );
}

#[test]
fn containment_mistakes_are_refused_where_written() {
    assert_eq!(
        problems(
            "policies:
  - name: web
    unit: web.service
    exec.allow: [usr/sbin/nginx, /usr/bin/ok]
    on_violation: shoot
  - name: api
    unit: api.service
    memory.max: 1G
    on_violation: kill
  - name: none
    unit: none.service
    exec.allow: []
  - name: text
    unit: text.service
    exec.allow: /usr/bin/one
"
        ),
        [
            "p.yaml:4:18: exec.allow: must be an absolute path: a relative one would depend on \
             the directory the service runs in, found \"usr/sbin/nginx\"",
            "p.yaml:5:19: on_violation: expected alert, kill, freeze or isolate, found \"shoot\"",
            "p.yaml:9:5: on_violation: only applies with exec.allow",
            "p.yaml:12:17: exec.allow: must list at least one executable; an empty list makes \
             every exec a violation, the service's own start included",
            "p.yaml:15:17: exec.allow: expected a list of absolute paths of executables, found \
             \"/usr/bin/one\"",
        ]
    );
}
