//! Walks the located YAML tree, collecting every problem with its position. Each section of
//! the configuration is read by its owner's methods on [`Checker`]; the readers here are the
//! ones every section shares.

use std::{collections::HashMap, path::PathBuf, time::Duration};

use serde_saphyr::{Location, Spanned};

use super::{
    diagnostics::{Problem, did_you_mean, quoted},
    node::Node,
};

const EXPECTED_DURATION: &str = "a duration such as 10s, 500ms or 2m, or a number of seconds";

/// Why a value was refused. `Unrecognized` leaves it to the caller to say what it expected,
/// since the same spelling rules serve several settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Invalid {
    Unrecognized,
    Because(&'static str),
}

/// Runs `check` and returns its result only if it found no problem.
pub(crate) fn collect<T>(check: impl FnOnce(&mut Checker) -> Option<T>) -> Result<T, Vec<Problem>> {
    let mut checker = Checker {
        problems: Vec::new(),
    };
    match check(&mut checker) {
        Some(value) if checker.problems.is_empty() => Ok(value),
        _ => Err(checker.problems),
    }
}

pub(crate) struct Checker {
    problems: Vec<Problem>,
}

/// A mapping entry whose key is text.
pub(crate) struct Entry<'n> {
    pub(crate) key: String,
    pub(crate) key_at: Location,
    pub(crate) value: &'n Spanned<Node>,
}

/// The known settings of a mapping, by key.
pub(crate) type Fields<'n> = HashMap<&'static str, Field<'n>>;

/// A known setting, found in a mapping.
pub(crate) struct Field<'n> {
    pub(crate) key: &'static str,
    pub(crate) key_at: Location,
    pub(crate) value: &'n Spanned<Node>,
}

impl Checker {
    pub(crate) fn report(&mut self, at: Location, reason: String) {
        self.problems.push(Problem { at, reason });
    }

    /// A section of settings: a mapping of `known` keys, or nothing (`ssh_guard:`), which
    /// leaves every setting at its default.
    pub(crate) fn section<'n>(
        &mut self,
        node: &'n Spanned<Node>,
        name: &str,
        known: &[&'static str],
    ) -> Option<Fields<'n>> {
        if node.value == Node::Null {
            return Some(Fields::new());
        }
        let expected = format!("{name}: expected a mapping of settings");
        let entries = self.entries(node, &expected)?;
        Some(self.fields(entries, known, &format!("{name} setting")))
    }

    /// The entries of a mapping with text keys; anything else is reported against `expected`.
    pub(crate) fn entries<'n>(
        &mut self,
        node: &'n Spanned<Node>,
        expected: &str,
    ) -> Option<Vec<Entry<'n>>> {
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

    /// Picks the `known` settings out of `entries`, reporting unknown and repeated keys.
    pub(crate) fn fields<'n>(
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
                let unknown = quoted(&entry.key);
                self.report(entry.key_at, format!("unknown {what} {unknown}; {hint}"));
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

    /// The setting `key` read with `read`: its default when absent, `None` when present but
    /// invalid (the problem is reported).
    pub(crate) fn setting<T>(
        &mut self,
        fields: &mut Fields<'_>,
        key: &str,
        default: T,
        read: impl FnOnce(&mut Self, &Field<'_>) -> Option<T>,
    ) -> Option<T> {
        match fields.remove(key) {
            Some(field) => read(self, &field),
            None => Some(default),
        }
    }

    /// Reads a scalar setting with `parse`, reporting what was expected when it fails.
    pub(crate) fn value<T>(
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

    /// `true` or `false`.
    pub(crate) fn flag(&mut self, field: &Field<'_>) -> Option<bool> {
        if let Node::Bool(value) = field.value.value {
            return Some(value);
        }
        let (key, found) = (field.key, field.value.value.describe());
        self.report(
            field.value.referenced,
            format!("{key}: expected true or false, found {found}"),
        );
        None
    }

    pub(crate) fn duration(&mut self, field: &Field<'_>) -> Option<Duration> {
        self.value(field, EXPECTED_DURATION, parse_duration)
    }

    /// A list setting, each item checked where it is written; nothing (`key:`) is empty.
    pub(crate) fn list<T>(
        &mut self,
        field: &Field<'_>,
        expected_list: &'static str,
        expected_item: &'static str,
        parse: impl Fn(&str) -> Result<T, Invalid>,
    ) -> Option<Vec<T>> {
        let items = match &field.value.value {
            Node::Null => return Some(Vec::new()),
            Node::List(items) => items,
            other => {
                let found = other.describe();
                self.report(
                    field.value.referenced,
                    format!("{}: expected {expected_list}, found {found}", field.key),
                );
                return None;
            }
        };
        let parsed: Vec<_> = items
            .iter()
            .map(|item| {
                let item = Field {
                    value: item,
                    ..*field
                };
                self.value(&item, expected_item, &parse)
            })
            .collect();
        parsed.into_iter().collect()
    }
}

pub(crate) fn absolute_path(text: &str) -> Result<PathBuf, Invalid> {
    match PathBuf::from(text) {
        path if path.is_absolute() => Ok(path),
        _ => Err(Invalid::Unrecognized),
    }
}

/// Duration suffixes in milliseconds; `ms` precedes `s` and `m`, which it ends with.
const DURATION_UNITS: [(&str, u64); 6] = [
    ("ms", 1),
    ("s", 1_000),
    ("m", 60_000),
    ("h", 3_600_000),
    ("d", 86_400_000),
    ("w", 604_800_000),
];

const NEGATIVE: Invalid = Invalid::Because("must not be negative");
pub(crate) const TOO_LARGE: Invalid = Invalid::Because("does not fit in 64 bits");

/// Decimal digits only.
pub(crate) fn parse_whole(text: &str) -> Result<u64, Invalid> {
    let digits = text.strip_prefix('-').unwrap_or(text);
    if digits.is_empty() || !digits.bytes().all(|byte| byte.is_ascii_digit()) {
        return Err(Invalid::Unrecognized);
    }
    if digits.len() != text.len() {
        return Err(NEGATIVE);
    }
    text.parse().map_err(|_| TOO_LARGE)
}

/// `10s`, `500ms`, `2m`, `1h`, `7d`, `1w`; a bare number is seconds.
pub(crate) fn parse_duration(text: &str) -> Result<Duration, Invalid> {
    let (number, millis_per_unit) = DURATION_UNITS
        .iter()
        .find_map(|&(suffix, millis)| Some((text.strip_suffix(suffix)?, millis)))
        .unwrap_or((text, 1_000));
    parse_whole(number)?
        .checked_mul(millis_per_unit)
        .map(Duration::from_millis)
        .ok_or(TOO_LARGE)
}

/// `2h` for 7200 s: the largest unit that divides the duration exactly.
pub(crate) fn format_duration(duration: Duration) -> String {
    let millis = duration.as_millis();
    DURATION_UNITS
        .iter()
        .rev()
        .find(|&&(_, unit)| millis >= u128::from(unit) && millis.is_multiple_of(u128::from(unit)))
        .map_or_else(
            || format!("{millis}ms"),
            |&(suffix, unit)| format!("{}{suffix}", millis / u128::from(unit)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("10"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("10d"), Ok(Duration::from_secs(864_000)));
        assert_eq!(parse_duration("1w"), Ok(Duration::from_secs(604_800)));
        assert_eq!(parse_duration("0s"), Ok(Duration::ZERO));
        assert_eq!(parse_duration("-3s"), Err(NEGATIVE));
        assert_eq!(parse_duration("99999999999999999h"), Err(TOO_LARGE));
        for bad in ["", "s", "1.5s", "10 s", "10y", "ten"] {
            assert_eq!(parse_duration(bad), Err(Invalid::Unrecognized), "{bad}");
        }
    }

    #[test]
    fn durations_format_with_the_largest_exact_unit() {
        assert_eq!(format_duration(Duration::from_secs(7200)), "2h");
        assert_eq!(format_duration(Duration::from_secs(90)), "90s");
        assert_eq!(format_duration(Duration::from_secs(14 * 86_400)), "2w");
        assert_eq!(format_duration(Duration::from_millis(1500)), "1500ms");
        assert_eq!(format_duration(Duration::ZERO), "0ms");
    }
}
