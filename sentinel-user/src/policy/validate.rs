//! From the located YAML tree to the typed model, collecting every problem on the way.

use std::{collections::HashMap, time::Duration};

use serde_saphyr::{Location, Spanned};

use super::{
    diagnostics::{Problem, did_you_mean},
    glob::CgroupGlob,
    model::{DEFAULT_GRACE, GracefulStop, Limit, Limits, Mode, Policy, ServicePolicy, Target},
    node::Node,
    units::{self, Invalid},
};

/// The configuration file's sections; the others belong to other parts of the daemon.
pub(super) const TOP_LEVEL_KEYS: &[&str] = &["metrics", "services", "policies", "ssh_guard"];

/// A policy's settings, dotted as the cgroup interface files are named.
pub(super) const POLICY_KEYS: &[&str] = &[
    "name",
    "cgroup",
    "unit",
    "mode",
    "memory.max",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
    "terminate_above",
    "for",
    "grace",
];

/// Prefixes that may also be written nested: `memory: {max: 1G}` is `memory.max: 1G`.
pub(super) const NESTED_GROUPS: &[&str] = &["memory", "cpu", "pids"];

/// Settings of which a policy needs at least one to do anything.
const EFFECTS: &[&str] = &[
    "memory.max",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
    "terminate_above",
];

/// The kernel's `PID_MAX_LIMIT`; `pids.max` refuses more.
const MAX_PIDS: u32 = 4_194_304;

/// systemd unit types that own a cgroup.
const CGROUP_UNIT_SUFFIXES: &[&str] = &[".service", ".scope", ".slice"];

const EXPECTED_NAME: &str = "a name such as web";
const EXPECTED_CGROUP: &str = "a cgroup path such as system.slice/nginx.service or workers/*";
const EXPECTED_UNIT: &str = "a systemd unit such as nginx.service";
const EXPECTED_MODE: &str = "enforce or observe";
const EXPECTED_SIZE: &str = "a size such as 512M or 2G, or a number of bytes";
const EXPECTED_SIZE_OR_MAX: &str = "a size such as 512M or 2G, a number of bytes, or max";
const EXPECTED_CPU: &str = "a CPU share such as 50% or 1.5 (CPUs), or max";
const EXPECTED_WEIGHT: &str = "a whole number from 1 to 10000";
const EXPECTED_PIDS: &str = "a whole number of processes, or max";
const EXPECTED_DURATION: &str = "a duration such as 10s, 500ms or 2m, or a number of seconds";

/// Runs `check` and returns its result only if it found no problem.
pub(super) fn collect<T>(check: impl FnOnce(&mut Checker) -> Option<T>) -> Result<T, Vec<Problem>> {
    let mut checker = Checker {
        problems: Vec::new(),
    };
    match check(&mut checker) {
        Some(value) if checker.problems.is_empty() => Ok(value),
        _ => Err(checker.problems),
    }
}

pub(super) struct Checker {
    problems: Vec<Problem>,
}

/// A mapping entry whose key is text.
struct Entry<'n> {
    key: String,
    key_at: Location,
    value: &'n Spanned<Node>,
}

/// The known settings of a mapping, by key.
type Fields<'n> = HashMap<&'static str, Field<'n>>;

/// A known setting, found in a mapping.
struct Field<'n> {
    key: &'static str,
    key_at: Location,
    value: &'n Spanned<Node>,
}

impl Checker {
    fn report(&mut self, at: Location, reason: String) {
        self.problems.push(Problem { at, reason });
    }

    /// The whole configuration file; only `policies` is read, the other sections are checked
    /// by their owners.
    pub(super) fn file(&mut self, root: &Spanned<Node>) -> Option<Policy> {
        if root.value == Node::Null {
            return Some(Policy::default());
        }
        let expected = "expected a mapping with the sections metrics, services, policies and \
                        ssh_guard";
        let entries = self.entries(root, expected)?;
        let mut fields = self.fields(entries, TOP_LEVEL_KEYS, "top-level key");
        match fields.remove("policies") {
            Some(policies) => self.policies(policies.value),
            None => Some(Policy::default()),
        }
    }

    /// The `policies` list; empty (`policies:`) means none.
    pub(super) fn policies(&mut self, node: &Spanned<Node>) -> Option<Policy> {
        let items = match &node.value {
            Node::Null => return Some(Policy::default()),
            Node::List(items) => items,
            other => {
                let found = other.describe();
                self.report(
                    node.referenced,
                    format!("policies: expected a list of policies, found {found}"),
                );
                return None;
            }
        };
        let mut names = HashMap::new();
        // Every policy is checked, even after one has failed.
        let services: Vec<_> = items
            .iter()
            .map(|item| self.service(item, &mut names))
            .collect();
        let services = services.into_iter().collect::<Option<Vec<_>>>()?;
        Some(Policy { services })
    }

    /// One policy. `names` holds the names seen so far and where, to refuse duplicates.
    pub(super) fn service(
        &mut self,
        node: &Spanned<Node>,
        names: &mut HashMap<String, Location>,
    ) -> Option<ServicePolicy> {
        let expected = "expected a policy: a mapping such as {name: web, unit: web.service, \
                        memory.max: 1G}";
        let entries = self.entries(node, expected)?;
        let entries = self.flatten_groups(entries);
        let mut fields = self.fields(entries, POLICY_KEYS, "policy key");
        let at = node.referenced;
        if !EFFECTS.iter().any(|key| fields.contains_key(key)) {
            let effects = EFFECTS.join(", ");
            self.report(at, format!("policy sets nothing; add one of {effects}"));
        }
        // A setting that is present but invalid has been reported, which discards the policy
        // built here; reading it as absent keeps the checks that follow from piling on.
        let name = match fields.remove("name") {
            Some(field) => self.name(&field, names),
            None => {
                self.report(at, "policy needs a name".into());
                None
            }
        };
        let target = self.target(&mut fields, at);
        let mode = fields
            .remove("mode")
            .and_then(|field| self.value(&field, EXPECTED_MODE, parse_mode))
            .unwrap_or_default();
        let limits = self.limits(&mut fields);
        let graceful_stop = self.graceful_stop(&mut fields, limits.memory_max);
        Some(ServicePolicy {
            name: name?,
            target: target?,
            mode,
            limits,
            graceful_stop,
        })
    }

    fn target(&mut self, fields: &mut Fields<'_>, policy_at: Location) -> Option<Target> {
        let cgroup = fields.remove("cgroup").map(|field| {
            self.value(&field, EXPECTED_CGROUP, |text| {
                CgroupGlob::new(text).map_err(Invalid::Because)
            })
        });
        let unit = fields
            .remove("unit")
            .map(|field| self.value(&field, EXPECTED_UNIT, parse_unit));
        match (cgroup, unit) {
            (Some(cgroup), None) => cgroup.map(Target::Cgroup),
            (None, Some(unit)) => unit.map(Target::Unit),
            (Some(cgroup), Some(unit)) => Some(Target::CgroupAndUnit {
                cgroup: cgroup?,
                unit: unit?,
            }),
            (None, None) => {
                self.report(policy_at, "policy needs a cgroup or a unit to match".into());
                None
            }
        }
    }

    fn limits(&mut self, fields: &mut Fields<'_>) -> Limits {
        let memory_max = fields
            .remove("memory.max")
            .and_then(|field| self.size_limit(&field));
        let memory_high = fields.remove("memory.high").and_then(|field| {
            let high = self.size_limit(&field)?;
            if let (Limit::Limited(high), Some(Limit::Limited(max))) = (high, memory_max)
                && high > max
            {
                let (high, max) = (units::format_size(high), units::format_size(max));
                self.report(
                    field.value.referenced,
                    format!("memory.high ({high}) must not be above memory.max ({max})"),
                );
            }
            Some(high)
        });
        let cpu_max = fields.remove("cpu.max").and_then(|field| {
            self.value(&field, EXPECTED_CPU, |text| {
                unlimited_or(text, units::parse_cpu_quota)
            })
        });
        let cpu_weight = fields.remove("cpu.weight").and_then(|field| {
            self.value(&field, EXPECTED_WEIGHT, |text| {
                match u16::try_from(units::parse_whole(text)?) {
                    Ok(weight @ 1..=10_000) => Ok(weight),
                    _ => Err(Invalid::Because("must be between 1 and 10000")),
                }
            })
        });
        let pids_max = fields.remove("pids.max").and_then(|field| {
            self.value(&field, EXPECTED_PIDS, |text| {
                unlimited_or(text, |text| {
                    match u32::try_from(units::parse_whole(text)?) {
                        Ok(pids @ 1..=MAX_PIDS) => Ok(pids),
                        _ => Err(Invalid::Because(
                            "must be between 1 and 4194304, the kernel's limit",
                        )),
                    }
                })
            })
        });
        Limits {
            memory_max,
            memory_high,
            cpu_max,
            cpu_weight,
            pids_max,
        }
    }

    fn graceful_stop(
        &mut self,
        fields: &mut Fields<'_>,
        memory_max: Option<Limit<u64>>,
    ) -> Option<GracefulStop> {
        let sustained_for = fields.remove("for");
        let grace = fields.remove("grace");
        let Some(threshold) = fields.remove("terminate_above") else {
            for field in sustained_for.iter().chain(&grace) {
                let key = field.key;
                let reason = format!("{key}: only applies with terminate_above");
                self.report(field.key_at, reason);
            }
            return None;
        };
        let sustained_for = sustained_for.and_then(|field| self.duration(&field));
        let grace = grace.and_then(|field| self.duration(&field));
        let terminate_above = self.value(&threshold, EXPECTED_SIZE, units::parse_size)?;
        if let Some(Limit::Limited(max)) = memory_max
            && terminate_above >= max
        {
            let (above, max) = (units::format_size(terminate_above), units::format_size(max));
            self.report(
                threshold.value.referenced,
                format!(
                    "terminate_above ({above}) must be below memory.max ({max}), or the \
                     kernel's OOM killer acts first"
                ),
            );
        }
        Some(GracefulStop {
            terminate_above,
            sustained_for: sustained_for.unwrap_or_default(),
            grace: grace.unwrap_or(DEFAULT_GRACE),
        })
    }

    /// The entries of a mapping with text keys; anything else is reported against `expected`.
    fn entries<'n>(&mut self, node: &'n Spanned<Node>, expected: &str) -> Option<Vec<Entry<'n>>> {
        let Node::Mapping(pairs) = &node.value else {
            let found = node.value.describe();
            self.report(node.referenced, format!("{expected}, found {found}"));
            return None;
        };
        let mut entries = Vec::new();
        for (key, value) in pairs {
            match &key.value {
                Node::Text(text) => entries.push(Entry {
                    key: text.clone(),
                    key_at: key.referenced,
                    value,
                }),
                other => {
                    let found = other.describe();
                    self.report(key.referenced, format!("keys must be text, found {found}"));
                }
            }
        }
        Some(entries)
    }

    /// Spells nested groups the dotted way: `memory: {max: 1G}` becomes `memory.max: 1G`.
    fn flatten_groups<'n>(&mut self, entries: Vec<Entry<'n>>) -> Vec<Entry<'n>> {
        let mut flat = Vec::new();
        for entry in entries {
            if !NESTED_GROUPS.contains(&entry.key.as_str()) {
                flat.push(entry);
                continue;
            }
            let group = &entry.key;
            let expected = format!("{group}: expected a mapping such as {{max: …}}");
            for inner in self.entries(entry.value, &expected).unwrap_or_default() {
                flat.push(Entry {
                    key: format!("{group}.{}", inner.key),
                    ..inner
                });
            }
        }
        flat
    }

    /// Picks the `known` settings out of `entries`, reporting unknown and repeated keys.
    fn fields<'n>(
        &mut self,
        entries: Vec<Entry<'n>>,
        known: &[&'static str],
        what: &str,
    ) -> Fields<'n> {
        let mut fields = Fields::new();
        for entry in entries {
            let Some(&key) = known.iter().find(|&&known| known == entry.key) else {
                let hint = match did_you_mean(&entry.key, known) {
                    Some(suggestion) => format!("did you mean {suggestion:?}?"),
                    None => format!("expected one of {}", known.join(", ")),
                };
                let unknown = &entry.key;
                self.report(entry.key_at, format!("unknown {what} {unknown:?}; {hint}"));
                continue;
            };
            if let Some(first) = fields.get(key) {
                let (line, column) = (first.key_at.line(), first.key_at.column());
                self.report(
                    entry.key_at,
                    format!("duplicate key {key:?} (first at line {line}, column {column})"),
                );
                continue;
            }
            let field = Field {
                key,
                key_at: entry.key_at,
                value: entry.value,
            };
            fields.insert(key, field);
        }
        fields
    }

    /// Reads a scalar setting with `parse`, reporting what was expected when it fails.
    fn value<T>(
        &mut self,
        field: &Field<'_>,
        expected: &str,
        parse: impl FnOnce(&str) -> Result<T, Invalid>,
    ) -> Option<T> {
        let node = &field.value.value;
        let reason = match node.scalar_text().map(|text| parse(&text)) {
            Some(Ok(value)) => return Some(value),
            Some(Err(Invalid::Because(reason))) => reason.to_owned(),
            Some(Err(Invalid::Unrecognized)) | None => format!("expected {expected}"),
        };
        let (key, found) = (field.key, node.describe());
        self.report(
            field.value.referenced,
            format!("{key}: {reason}, found {found}"),
        );
        None
    }

    fn size_limit(&mut self, field: &Field<'_>) -> Option<Limit<u64>> {
        self.value(field, EXPECTED_SIZE_OR_MAX, |text| {
            unlimited_or(text, units::parse_size)
        })
    }

    fn duration(&mut self, field: &Field<'_>) -> Option<Duration> {
        self.value(field, EXPECTED_DURATION, units::parse_duration)
    }

    fn name(&mut self, field: &Field<'_>, names: &mut HashMap<String, Location>) -> Option<String> {
        let name = self.value(field, EXPECTED_NAME, |text| match text.trim() {
            "" => Err(Invalid::Because("must not be empty")),
            _ => Ok(text.to_owned()),
        })?;
        let at = field.value.referenced;
        if let Some(first) = names.get(&name) {
            let (line, column) = (first.line(), first.column());
            self.report(
                at,
                format!("duplicate policy name {name:?} (first at line {line}, column {column})"),
            );
            return None;
        }
        names.insert(name.clone(), at);
        Some(name)
    }
}

/// `max`, or what `parse` makes of `text`.
fn unlimited_or<T>(
    text: &str,
    parse: impl FnOnce(&str) -> Result<T, Invalid>,
) -> Result<Limit<T>, Invalid> {
    match text {
        "max" => Ok(Limit::Unlimited),
        _ => parse(text).map(Limit::Limited),
    }
}

fn parse_mode(text: &str) -> Result<Mode, Invalid> {
    match text {
        "enforce" => Ok(Mode::Enforce),
        "observe" => Ok(Mode::Observe),
        _ => Err(Invalid::Unrecognized),
    }
}

fn parse_unit(text: &str) -> Result<String, Invalid> {
    let has_cgroup = CGROUP_UNIT_SUFFIXES
        .iter()
        .any(|suffix| text.len() > suffix.len() && text.ends_with(suffix));
    if text.contains('/') || text.contains(char::is_whitespace) {
        Err(Invalid::Unrecognized)
    } else if !has_cgroup {
        Err(Invalid::Because(
            "must be a unit with a cgroup: a name ending in .service, .scope or .slice",
        ))
    } else {
        Ok(text.to_owned())
    }
}
