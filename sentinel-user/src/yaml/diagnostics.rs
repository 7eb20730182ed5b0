//! Problems found in a configuration file, reported as `file:line:column: reason`.

use std::fmt;

use serde_saphyr::{Location, MessageFormatter, UserMessageFormatter};

/// One problem in a checked file. Lines and columns count from 1; problems with the file as a
/// whole (unreadable, too large, not a regular file) point at 1:1 so that every line has the
/// same shape.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Diagnostic {
    pub file: String,
    pub line: u64,
    pub column: u64,
    pub reason: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file, self.line, self.column, self.reason
        )
    }
}

/// Every problem of one file, one per line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (index, diagnostic) in self.0.iter().enumerate() {
            if index > 0 {
                writeln!(f)?;
            }
            write!(f, "{diagnostic}")?;
        }
        Ok(())
    }
}

/// A problem before the file name is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Problem {
    pub(crate) at: Location,
    pub(crate) reason: String,
}

/// How far the parser looks ahead for a key's colon (its default `simple_key_max_lookahead`).
const MAX_KEY_CHARS: u64 = 1024;
const MISPLACED_COLON: &str = "mapping values are not allowed in this context";

/// Quoted text is cut to this many characters in messages: a 1 MiB key must not become a
/// 1 MiB error line.
const QUOTED_CHARS: usize = 40;

/// `text` quoted for a message, cut short (with its full length) when it is long.
pub(crate) fn quoted(text: &str) -> String {
    match text.char_indices().nth(QUOTED_CHARS) {
        None => format!("{text:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &text[..cut], text.len()),
    }
}

impl Diagnostic {
    pub(crate) fn whole_file(file: &str, reason: String) -> Self {
        Self {
            file: file.to_owned(),
            line: 1,
            column: 1,
            reason,
        }
    }

    pub(crate) fn from_problem(file: &str, problem: Problem) -> Self {
        Self {
            file: file.to_owned(),
            line: problem.at.line(),
            column: problem.at.column(),
            reason: problem.reason,
        }
    }

    /// A YAML error stops parsing, so it comes alone.
    pub(crate) fn from_yaml_error(file: &str, error: &serde_saphyr::Error) -> Self {
        // Alias errors wrap the error that happened while replaying the alias.
        let mut original = error.without_snippet();
        while let serde_saphyr::Error::AliasError { error, .. } = original {
            original = error;
        }
        // The message may quote the file's text; keep terminal control characters out.
        let mut reason = String::new();
        for c in UserMessageFormatter.format_message(original).chars() {
            if c.is_control() {
                reason.extend(c.escape_default());
            } else {
                reason.push(c);
            }
        }
        match error.location().filter(|at| at.line() > 0) {
            Some(at) => {
                // The parser looks for a key's colon at most this far ahead and calls a longer
                // key a misplaced colon.
                if at.column() > MAX_KEY_CHARS && reason == MISPLACED_COLON {
                    reason.push_str("; a key may be at most 1024 characters long");
                }
                Self::from_problem(file, Problem { at, reason })
            }
            None => Self::whole_file(file, reason),
        }
    }
}

/// The candidate `word` was most likely meant to be, if any is close enough to be a typo:
/// at most a third of the longer word differs (case aside), counting a swap of neighbouring
/// letters as one edit.
pub(crate) fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word: Vec<char> = word.to_lowercase().chars().collect();
    let close_enough = |distance: usize, longer: usize| distance <= (longer / 3).max(1);
    candidates
        .iter()
        .filter_map(|&candidate| {
            let chars: Vec<char> = candidate.chars().collect();
            let longer = word.len().max(chars.len());
            // The lengths alone bound the distance from below; checking them first keeps a
            // huge key from costing a huge distance table.
            if !close_enough(word.len().abs_diff(chars.len()), longer) {
                return None;
            }
            Some((edit_distance(&word, &chars), candidate, longer))
        })
        .filter(|&(distance, _, longer)| close_enough(distance, longer))
        .min_by_key(|&(distance, _, _)| distance)
        .map(|(_, candidate, _)| candidate)
}

/// Optimal string alignment distance: insertions, deletions, substitutions and swaps of two
/// adjacent characters.
fn edit_distance(a: &[char], b: &[char]) -> usize {
    // rows[i][j]: distance between a[..i] and b[..j].
    let mut rows = vec![vec![0; b.len() + 1]; a.len() + 1];
    rows[0] = (0..=b.len()).collect();
    for (i, row) in rows.iter_mut().enumerate() {
        row[0] = i;
    }
    for i in 1..=a.len() {
        for j in 1..=b.len() {
            let substitution = usize::from(a[i - 1] != b[j - 1]);
            let mut best = (rows[i - 1][j] + 1)
                .min(rows[i][j - 1] + 1)
                .min(rows[i - 1][j - 1] + substitution);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                best = best.min(rows[i - 2][j - 2] + 1);
            }
            rows[i][j] = best;
        }
    }
    rows[a.len()][b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn displays_as_file_line_column_reason() {
        let diagnostic = Diagnostic {
            file: "/etc/sentinel/sentinel.yaml".into(),
            line: 12,
            column: 5,
            reason: "duplicate key \"name\"".into(),
        };
        assert_eq!(
            diagnostic.to_string(),
            "/etc/sentinel/sentinel.yaml:12:5: duplicate key \"name\""
        );
    }

    #[test]
    fn edit_distance_counts_swaps_once() {
        let distance = |a: &str, b: &str| {
            let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
            edit_distance(&a, &b)
        };
        assert_eq!(distance("memroy", "memory"), 1);
        assert_eq!(distance("kitten", "sitting"), 3);
        assert_eq!(distance("", "abc"), 3);
        assert_eq!(distance("same", "same"), 0);
    }

    #[test]
    fn suggests_only_close_candidates() {
        let keys = ["memory.max", "memory.high", "for", "grace", "unit"];
        assert_eq!(did_you_mean("memroy.max", &keys), Some("memory.max"));
        assert_eq!(did_you_mean("Memory_High", &keys), Some("memory.high"));
        assert_eq!(did_you_mean("fro", &keys), Some("for"));
        assert_eq!(did_you_mean("units", &keys), Some("unit"));
        assert_eq!(did_you_mean("limit", &keys), None);
        assert_eq!(did_you_mean("xyz", &keys), None);
        assert_eq!(did_you_mean(&"m".repeat(1 << 20), &keys), None);
    }

    #[test]
    fn long_text_is_quoted_short() {
        assert_eq!(quoted("web"), "\"web\"");
        let long = "k".repeat(1 << 20);
        assert_eq!(
            quoted(&long),
            format!("{:?}… (1048576 bytes)", "k".repeat(40))
        );
    }
}
