//! Patterns over cgroup paths: `*` and `?` stay within one path segment, `**` spans segments.

/// A validated cgroup path pattern, relative to the cgroup2 root.
///
/// - `*` matches any part of one segment, `?` one character of it;
/// - `**` as a whole segment matches any number of segments, none included, except at the
///   end: `workers/**` matches everything below `workers` but not `workers` itself, so that a
///   limit meant for the children never lands on the slice that contains them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupGlob {
    pattern: String,
    /// What every matching path starts with: the pattern up to its first wildcard. Most
    /// cgroups fail a policy on it, without the segment by segment match.
    literal_prefix: String,
    segments: Vec<Segment>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// `**`
    AnyDepth,
    /// One path segment, possibly with `*` and `?`.
    Name(Vec<char>),
}

impl CgroupGlob {
    /// `Err` holds the reason `pattern` is refused. A leading `/`, as `systemctl status`
    /// prints cgroups, is accepted: both spellings name the same cgroup.
    pub fn new(pattern: &str) -> Result<Self, &'static str> {
        let relative = pattern.strip_prefix('/').unwrap_or(pattern);
        if relative.is_empty() {
            return Err("must name a cgroup below the root");
        }
        if relative.contains(['[', ']', '{', '}', '\\']) {
            return Err("may only use the wildcards *, ? and **");
        }
        let mut segments = relative
            .split('/')
            .map(|segment| match segment {
                "" => Err("has an empty path segment"),
                "." | ".." => Err("must not contain . or .. segments"),
                "**" => Ok(Segment::AnyDepth),
                _ if segment.contains("**") => {
                    Err("uses ** inside a segment; ** must be a whole segment, as in a/**/b")
                }
                _ => Ok(Segment::Name(segment.chars().collect())),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if segments.last() == Some(&Segment::AnyDepth) {
            segments.insert(segments.len() - 1, Segment::Name(vec!['*']));
        }
        let literal_prefix = relative
            .split(['*', '?'])
            .next()
            .unwrap_or_default()
            .to_owned();
        Ok(Self {
            pattern: pattern.to_owned(),
            literal_prefix,
            segments,
        })
    }

    /// The pattern as written.
    pub fn as_str(&self) -> &str {
        &self.pattern
    }

    /// Whether `cgroup_path` (relative to the cgroup2 root; a leading `/` is ignored) matches.
    pub fn matches(&self, cgroup_path: &str) -> bool {
        // By bytes: thousands of cgroups are tried against each policy at every pass.
        let bytes = cgroup_path.as_bytes();
        let start = bytes.iter().position(|b| *b != b'/').unwrap_or(bytes.len());
        let end = bytes
            .iter()
            .rposition(|b| *b != b'/')
            .map_or(start, |last| last + 1);
        let relative = &cgroup_path[start..end];
        if !relative.starts_with(&self.literal_prefix) {
            return false;
        }
        let path: Vec<&str> = if relative.is_empty() {
            Vec::new()
        } else {
            relative.split('/').collect()
        };
        wildcard_match(
            &self.segments,
            &path,
            |segment| *segment == Segment::AnyDepth,
            |segment, name| match segment {
                Segment::Name(pattern) => segment_matches(pattern, name),
                Segment::AnyDepth => false,
            },
        )
    }
}

/// Whether one name (a unit's, a path segment) matches `pattern`, where `*` is any run of
/// characters and `?` one character.
pub fn name_matches(pattern: &str, name: &str) -> bool {
    segment_matches(&pattern.chars().collect::<Vec<_>>(), name)
}

fn segment_matches(pattern: &[char], name: &str) -> bool {
    let is_star = |c: &char| *c == '*';
    // Names are nearly always ASCII: matched by bytes, without a copy.
    if name.is_ascii() {
        return wildcard_match(pattern, name.as_bytes(), is_star, |p, b| {
            *p == '?' || *p == char::from(*b)
        });
    }
    let name: Vec<char> = name.chars().collect();
    wildcard_match(pattern, &name, is_star, |p, c| *p == '?' || p == c)
}

/// Matches `text` against `pattern`, where `is_star` elements match any run of text elements
/// and every other element matches exactly one. Backtracking only to the most recent star
/// suffices, so this stays linear in practice and never goes exponential.
fn wildcard_match<P, T>(
    pattern: &[P],
    text: &[T],
    is_star: impl Fn(&P) -> bool,
    matches_one: impl Fn(&P, &T) -> bool,
) -> bool {
    let (mut p, mut t) = (0, 0);
    // The last star seen and the text position it currently extends to.
    let mut last_star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && is_star(&pattern[p]) {
            last_star = Some((p, t));
            p += 1;
        } else if p < pattern.len() && matches_one(&pattern[p], &text[t]) {
            p += 1;
            t += 1;
        } else if let Some((star, extent)) = last_star {
            last_star = Some((star, extent + 1));
            p = star + 1;
            t = extent + 1;
        } else {
            return false;
        }
    }
    pattern[p..].iter().all(is_star)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, path: &str) -> bool {
        CgroupGlob::new(pattern).unwrap().matches(path)
    }

    #[test]
    fn literal_paths() {
        assert!(matches(
            "system.slice/nginx.service",
            "system.slice/nginx.service"
        ));
        assert!(matches(
            "system.slice/nginx.service",
            "/system.slice/nginx.service"
        ));
        assert!(matches(
            "/system.slice/nginx.service",
            "system.slice/nginx.service"
        ));
        assert!(!matches("system.slice/nginx.service", "system.slice"));
        assert!(!matches("system.slice", "system.slice/nginx.service"));
    }

    #[test]
    fn question_mark_is_one_character_in_any_name_and_slashes_around_are_ignored() {
        assert!(matches("app/caf?.service", "app/café.service"));
        assert!(!matches("app/caf?.service", "app/cafée.service"));
        assert!(matches("app/*é", "app/thé"));
        assert!(matches("app/web-?", "//app/web-1//"));
        assert!(!matches("app/web-?", "app/web-10"));
        assert!(!matches("app", "/"));
    }

    #[test]
    fn star_and_question_mark_stay_in_one_segment() {
        assert!(matches("workers/*", "workers/a"));
        assert!(!matches("workers/*", "workers/a/b"));
        assert!(!matches("workers/*", "workers"));
        assert!(matches(
            "system.slice/*.service",
            "system.slice/nginx.service"
        ));
        assert!(!matches(
            "system.slice/*.service",
            "system.slice/nginx.scope"
        ));
        assert!(matches("worker-?", "worker-1"));
        assert!(!matches("worker-?", "worker-10"));
        assert!(matches("a*b*c", "abxbc"));
        assert!(!matches("a*b*c", "abxbd"));
    }

    #[test]
    fn double_star_spans_segments() {
        assert!(matches("user.slice/**/app.scope", "user.slice/app.scope"));
        assert!(matches(
            "user.slice/**/app.scope",
            "user.slice/u-1.slice/s/app.scope"
        ));
        assert!(!matches(
            "user.slice/**/app.scope",
            "user.slice/u-1.slice/other.scope"
        ));
        assert!(matches("**/nginx.service", "system.slice/nginx.service"));
        assert!(matches("**/nginx.service", "nginx.service"));
    }

    #[test]
    fn trailing_double_star_excludes_the_parent() {
        assert!(matches("workers/**", "workers/a"));
        assert!(matches("workers/**", "workers/a/b/c"));
        assert!(!matches("workers/**", "workers"));
        assert!(!matches("workers/**", "other/a"));
        assert!(matches("**", "anything/at/all"));
        assert!(!matches("**", "/"));
    }

    #[test]
    fn the_literal_start_is_the_pattern_up_to_its_first_wildcard() {
        for (pattern, prefix) in [
            ("system.slice/*.service", "system.slice/"),
            ("/app-??/x", "app-"),
            ("**/nginx.service", ""),
            ("/system.slice/nginx.service", "system.slice/nginx.service"),
        ] {
            assert_eq!(CgroupGlob::new(pattern).unwrap().literal_prefix, prefix);
        }
        assert!(matches("bench-007-*", "/bench-007-00712"));
        assert!(!matches("bench-007-*", "/bench-008-00800"));
    }

    #[test]
    fn many_stars_do_not_blow_up() {
        let pattern = "*a*a*a*a*a*a*a*a*a*a*a*a*a*a*a*b";
        let path = "a".repeat(200);
        assert!(!matches(pattern, &path));
        let deep = "**/**/**/**/**/**/**/**/**/**/x";
        assert!(!matches(deep, &"a/".repeat(200)));
    }

    #[test]
    fn refused_patterns() {
        for (pattern, reason) in [
            ("", "must name a cgroup below the root"),
            ("/", "must name a cgroup below the root"),
            ("a//b", "has an empty path segment"),
            ("a/", "has an empty path segment"),
            ("a/../b", "must not contain . or .. segments"),
            (
                "a/**b",
                "uses ** inside a segment; ** must be a whole segment, as in a/**/b",
            ),
            ("a/[bc]", "may only use the wildcards *, ? and **"),
            ("a/{b,c}", "may only use the wildcards *, ? and **"),
        ] {
            assert_eq!(CgroupGlob::new(pattern), Err(reason), "{pattern:?}");
        }
    }
}
