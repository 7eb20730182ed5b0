//! Problems found in a policy file, reported as `file:line:column: reason`.

use std::fmt;

use serde_saphyr::{Location, MessageFormatter, UserMessageFormatter};

/// One problem in a checked file. Lines and columns count from 1; problems with the file as a
/// whole (unreadable, too large) point at 1:1 so that every line has the same shape.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// A problem before the file name is attached; the validator also serves `Deserialize`,
/// which has no file name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Problem {
    pub(super) at: Location,
    pub(super) reason: String,
}

impl Diagnostic {
    pub(super) fn whole_file(file: &str, reason: String) -> Self {
        Self {
            file: file.to_owned(),
            line: 1,
            column: 1,
            reason,
        }
    }

    pub(super) fn from_problem(file: &str, problem: Problem) -> Self {
        Self {
            file: file.to_owned(),
            line: problem.at.line(),
            column: problem.at.column(),
            reason: problem.reason,
        }
    }

    /// A YAML error stops parsing, so it comes alone.
    pub(super) fn from_yaml_error(file: &str, error: &serde_saphyr::Error) -> Self {
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
            Some(at) => Self::from_problem(file, Problem { at, reason }),
            None => Self::whole_file(file, reason),
        }
    }
}

/// For `Deserialize`: every problem in one message, each with its position.
pub(super) fn serde_error<E: serde::de::Error>(problems: Vec<Problem>) -> E {
    let described: Vec<String> = problems
        .iter()
        .map(|problem| {
            let (line, column) = (problem.at.line(), problem.at.column());
            format!("{} (line {line}, column {column})", problem.reason)
        })
        .collect();
    E::custom(described.join("; "))
}

/// The candidate `word` was most likely meant to be, if any is close enough to be a typo:
/// at most a third of the longer word differs (case aside), counting a swap of neighbouring
/// letters as one edit.
pub(super) fn did_you_mean<'a>(word: &str, candidates: &[&'a str]) -> Option<&'a str> {
    let word: Vec<char> = word.to_lowercase().chars().collect();
    candidates
        .iter()
        .map(|&candidate| {
            let chars: Vec<char> = candidate.chars().collect();
            let distance = edit_distance(&word, &chars);
            (distance, candidate, word.len().max(chars.len()))
        })
        .filter(|&(distance, _, longer)| distance <= (longer / 3).max(1))
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
    }
}
