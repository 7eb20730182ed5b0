//! The configuration file as YAML whose every value remembers where it was written, and the
//! checker that walks it: one parse, and every problem of every section reported at once as
//! `file:line:column: reason`.

mod checker;
mod diagnostics;
mod node;

pub(crate) use checker::{
    Checker, Entry, Field, Fields, Invalid, TOO_LARGE, absolute_path, collect, format_duration,
    parse_duration, parse_whole,
};
pub use diagnostics::{Diagnostic, Diagnostics};
#[cfg(test)]
pub(crate) use node::MAX_ALIAS_EVENTS;
pub(crate) use node::{Node, parse};
