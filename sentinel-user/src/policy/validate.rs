//! From the located YAML tree to the typed model, collecting every problem on the way.

use std::{collections::HashMap, sync::Arc};

use serde_saphyr::{Location, Spanned};

use super::{
    glob::CgroupGlob,
    model::{
        DEFAULT_GRACE, ExecContainment, GracefulStop, Limit, Limits, Mode, OnViolation, Policy,
        ServicePolicy, Target,
    },
    units,
};
use crate::yaml::{Checker, Entry, Field, Fields, Invalid, Node, absolute_path, parse_whole};

/// A policy's settings, dotted as the cgroup interface files are named.
pub(crate) const POLICY_KEYS: &[&str] = &[
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
    "exec.allow",
    "on_violation",
];

/// Prefixes that may also be written nested: `memory: {max: 1G}` is `memory.max: 1G`.
pub(crate) const NESTED_GROUPS: &[&str] = &["memory", "cpu", "pids", "exec"];

/// Settings of which a policy needs at least one to do anything.
const EFFECTS: &[&str] = &[
    "memory.max",
    "memory.high",
    "cpu.max",
    "cpu.weight",
    "pids.max",
    "terminate_above",
    "exec.allow",
];

/// Memory settings below this are refused: no service runs in less, and a bare number is
/// bytes, so `memory.max: 512` (meant as 512M) would otherwise stall or kill the service.
const MIN_MEMORY_BYTES: u64 = 1 << 20;

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
const EXPECTED_EXECUTABLES: &str = "a list of absolute paths of executables";
const EXPECTED_EXECUTABLE: &str = "an absolute path of an executable, such as /usr/sbin/nginx";
const EXPECTED_ON_VIOLATION: &str = "alert, kill, freeze or isolate";

impl Checker {
    /// The `policies` list; empty (`policies:`) means none.
    pub(crate) fn policies(&mut self, node: &Spanned<Node>) -> Option<Policy> {
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
        Some(Policy {
            services: services.into_iter().map(Arc::new).collect(),
        })
    }

    /// One policy. `names` holds the names seen so far and where, to refuse duplicates.
    fn service(
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
        let containment = self.containment(&mut fields);
        Some(ServicePolicy {
            name: name?,
            target: target?,
            mode,
            limits,
            graceful_stop,
            containment: containment?,
        })
    }

    /// `exec.allow` and `on_violation`; `Some(None)` when the policy contains nothing.
    fn containment(&mut self, fields: &mut Fields<'_>) -> Option<Option<ExecContainment>> {
        let on_violation = fields.remove("on_violation");
        let Some(allow) = fields.remove("exec.allow") else {
            if let Some(field) = on_violation {
                let reason = "on_violation: only applies with exec.allow".to_owned();
                self.report(field.key_at, reason);
                return None;
            }
            return Some(None);
        };
        let on_violation = match on_violation {
            Some(field) => self.value(&field, EXPECTED_ON_VIOLATION, parse_on_violation),
            None => Some(OnViolation::default()),
        };
        let paths = self.list(&allow, EXPECTED_EXECUTABLES, EXPECTED_EXECUTABLE, |text| {
            absolute_path(text).map_err(|_| {
                Invalid::Because(
                    "must be an absolute path: a relative one would depend on the directory \
                     the service runs in",
                )
            })
        })?;
        if paths.is_empty() {
            self.report(
                allow.value.referenced,
                "exec.allow: must list at least one executable; an empty list makes every \
                 exec a violation, the service's own start included"
                    .into(),
            );
            return None;
        }
        Some(Some(ExecContainment {
            allow: paths,
            on_violation: on_violation?,
        }))
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
                match u16::try_from(parse_whole(text)?) {
                    Ok(weight @ 1..=10_000) => Ok(weight),
                    _ => Err(Invalid::Because("must be between 1 and 10000")),
                }
            })
        });
        let pids_max = fields.remove("pids.max").and_then(|field| {
            self.value(&field, EXPECTED_PIDS, |text| {
                unlimited_or(text, |text| match u32::try_from(parse_whole(text)?) {
                    Ok(pids @ 1..=MAX_PIDS) => Ok(pids),
                    _ => Err(Invalid::Because(
                        "must be between 1 and 4194304, the kernel's limit",
                    )),
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
        let terminate_above = self.value(&threshold, EXPECTED_SIZE, parse_memory)?;
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

    fn size_limit(&mut self, field: &Field<'_>) -> Option<Limit<u64>> {
        self.value(field, EXPECTED_SIZE_OR_MAX, |text| {
            unlimited_or(text, parse_memory)
        })
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

fn parse_memory(text: &str) -> Result<u64, Invalid> {
    match units::parse_size(text)? {
        bytes if bytes < MIN_MEMORY_BYTES => Err(Invalid::Because(
            "must be at least 1M; a number without a suffix is bytes",
        )),
        bytes => Ok(bytes),
    }
}

fn parse_mode(text: &str) -> Result<Mode, Invalid> {
    match text {
        "enforce" => Ok(Mode::Enforce),
        "observe" => Ok(Mode::Observe),
        _ => Err(Invalid::Unrecognized),
    }
}

fn parse_on_violation(text: &str) -> Result<OnViolation, Invalid> {
    match text {
        "alert" => Ok(OnViolation::Alert),
        "kill" => Ok(OnViolation::Kill),
        "freeze" => Ok(OnViolation::Freeze),
        "isolate" => Ok(OnViolation::Isolate),
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
