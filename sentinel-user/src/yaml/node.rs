//! A YAML document as a tree whose nodes remember where they were written, so that the
//! validator can report every problem at its position instead of stopping at the first.

use std::fmt;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{DuplicateKeyPolicy, NonFiniteFloatPolicy, Spanned};

use super::diagnostics::quoted;

/// Aliases may replay at most this many YAML events in total. Configuration files reuse a
/// few anchors; an alias bomb needs millions, and is refused here within milliseconds. The
/// parser's other limits (250,000 nodes, 1,000,000 events) stay at their defaults.
pub(crate) const MAX_ALIAS_EVENTS: usize = 10_000;

/// Mappings and lists nest at most this deep. The deepest setting is four levels down
/// (`policies`, a policy, `memory`, `max`); reading the tree recurses once per level, and a
/// reload runs on a worker thread with a small stack, which the parser's default (64) could
/// exhaust in a debug build.
pub(crate) const MAX_DEPTH: usize = 16;

#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Node {
    Null,
    Bool(bool),
    Integer(i128),
    Float(f64),
    Text(String),
    List(Vec<Spanned<Node>>),
    Mapping(Vec<(Spanned<Node>, Spanned<Node>)>),
}

impl Node {
    /// The node as the operator would recognise it, for "found …" in messages.
    pub(crate) fn describe(&self) -> String {
        match self {
            Self::Null => "nothing".into(),
            Self::Bool(value) => value.to_string(),
            Self::Integer(value) => value.to_string(),
            Self::Float(value) => value.to_string(),
            Self::Text(text) => quoted(text),
            Self::List(_) => "a list".into(),
            Self::Mapping(_) => "a mapping".into(),
        }
    }

    /// Scalars that can be read as text; YAML turns `512` into a number and `512M` into text,
    /// and both are sizes. Booleans are excluded: `yes` would come back as `true`.
    pub(crate) fn scalar_text(&self) -> Option<String> {
        match self {
            Self::Integer(value) => Some(value.to_string()),
            Self::Float(value) => Some(value.to_string()),
            Self::Text(text) => Some(text.clone()),
            Self::Null | Self::Bool(_) | Self::List(_) | Self::Mapping(_) => None,
        }
    }
}

/// Parses one YAML document with the limits a configuration file needs.
pub(crate) fn parse(text: &str) -> Result<Spanned<Node>, serde_saphyr::Error> {
    let options = serde_saphyr::options! {
        // The validator reports every duplicate together with its first occurrence.
        duplicate_keys: DuplicateKeyPolicy::PassThrough,
        budget: serde_saphyr::budget! {
            max_depth: MAX_DEPTH,
        },
        alias_limits: serde_saphyr::alias_limits! {
            max_total_replayed_events: MAX_ALIAS_EVENTS,
        },
        // `.inf` becomes text, which the value checks then refuse with a position.
        non_finite_float_policy: NonFiniteFloatPolicy::AsString,
        // Diagnostics carry file:line:column; the source snippet would only be discarded.
        with_snippet: false,
    };
    serde_saphyr::from_str_with_options(text, options)
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any YAML value")
    }

    fn visit_unit<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_none<E>(self) -> Result<Node, E> {
        Ok(Node::Null)
    }

    fn visit_bool<E>(self, value: bool) -> Result<Node, E> {
        Ok(Node::Bool(value))
    }

    fn visit_i64<E>(self, value: i64) -> Result<Node, E> {
        Ok(Node::Integer(value.into()))
    }

    fn visit_u64<E>(self, value: u64) -> Result<Node, E> {
        Ok(Node::Integer(value.into()))
    }

    fn visit_f64<E>(self, value: f64) -> Result<Node, E> {
        Ok(Node::Float(value))
    }

    fn visit_str<E>(self, value: &str) -> Result<Node, E> {
        Ok(Node::Text(value.to_owned()))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<Node, A::Error> {
        let mut list = Vec::new();
        while let Some(item) = items.next_element()? {
            list.push(item);
        }
        Ok(Node::List(list))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<Node, A::Error> {
        let mut mapping = Vec::new();
        while let Some(entry) = entries.next_entry()? {
            mapping.push(entry);
        }
        Ok(Node::Mapping(mapping))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn position(node: &Spanned<Node>) -> (u64, u64) {
        (node.referenced.line(), node.referenced.column())
    }

    #[test]
    fn keeps_duplicates_and_positions() {
        let root = parse("a: 1\na: text\n").unwrap();
        let Node::Mapping(entries) = &root.value else {
            panic!("not a mapping: {root:?}");
        };
        assert_eq!(entries.len(), 2);
        assert_eq!(position(&entries[1].0), (2, 1));
        assert_eq!(entries[1].1.value, Node::Text("text".into()));
        assert_eq!(position(&entries[1].1), (2, 4));
    }

    #[test]
    fn scalars_keep_their_kind() {
        let root = parse("[~, yes, -5, 1.5, .inf, 512M]").unwrap();
        let Node::List(items) = root.value else {
            panic!("not a list");
        };
        let kinds: Vec<_> = items.into_iter().map(|item| item.value).collect();
        assert_eq!(
            kinds,
            [
                Node::Null,
                Node::Bool(true),
                Node::Integer(-5),
                Node::Float(1.5),
                Node::Text(".inf".into()),
                Node::Text("512M".into()),
            ]
        );
    }

    #[test]
    fn an_empty_document_is_null() {
        assert_eq!(parse("# only a comment\n").unwrap().value, Node::Null);
    }
}
