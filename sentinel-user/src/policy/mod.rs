//! Per-service cgroup v2 limits: the `policies` section of the configuration file, its typed
//! model and the checks behind `sentinel check`.
//!
//! ```yaml
//! policies:
//!   - name: web
//!     unit: nginx.service             # and/or cgroup: system.slice/nginx.service
//!     memory.max: 1G                  # or nested: memory: {max: 1G, high: 800M}
//!     memory.high: 800M
//!     cpu.max: 150%                   # 1.5 CPUs; cpu.max: 1.5 is the same
//!     terminate_above: 900M           # SIGTERM the largest process after 10 s above 900M,
//!     for: 10s                        # SIGKILL it 3 s (grace) later
//! ```
//!
//! `deploy/sentinel.yaml` documents every setting; `deploy/sentinel.schema.json` lets editors
//! complete them.

mod diagnostics;
pub mod enforcer;
mod glob;
pub mod metrics;
mod model;
mod node;
mod units;

pub(crate) use units::parse_duration_setting;
mod validate;

#[cfg(test)]
mod tests;

use std::{fs, path::Path};

pub use diagnostics::Diagnostic;
pub use glob::CgroupGlob;
pub use model::{
    CpuQuota, DEFAULT_GRACE, GracefulStop, Limit, Limits, Mode, Policy, ServicePolicy, Target,
};

/// Larger files are refused before parsing, as the configuration loader does.
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// Checks the configuration file at `path` without touching anything: its top-level keys
/// and its `policies` section. Returns every problem found, in file order.
pub fn check_file(path: &Path) -> Result<Policy, Vec<Diagnostic>> {
    let name = path.display().to_string();
    let whole_file = |reason| Err(vec![Diagnostic::whole_file(&name, reason)]);
    match fs::metadata(path) {
        Err(error) => return whole_file(format!("cannot read the file: {error}")),
        Ok(meta) if meta.len() > MAX_FILE_BYTES => return whole_file(too_large(meta.len())),
        Ok(_) => {}
    }
    match fs::read_to_string(path) {
        Ok(text) => check_str(&name, &text),
        Err(error) => whole_file(format!("cannot read the file: {error}")),
    }
}

/// [`check_file`] for text already in memory; `name` labels the diagnostics.
pub fn check_str(name: &str, text: &str) -> Result<Policy, Vec<Diagnostic>> {
    let size = text.len() as u64;
    if size > MAX_FILE_BYTES {
        return Err(vec![Diagnostic::whole_file(name, too_large(size))]);
    }
    let root =
        node::parse(text).map_err(|error| vec![Diagnostic::from_yaml_error(name, &error)])?;
    validate::collect(|checker| checker.file(&root)).map_err(|problems| {
        let mut diagnostics: Vec<_> = problems
            .into_iter()
            .map(|problem| Diagnostic::from_problem(name, problem))
            .collect();
        diagnostics.sort_by_key(|diagnostic| (diagnostic.line, diagnostic.column));
        diagnostics
    })
}

fn too_large(bytes: u64) -> String {
    format!("the file is {bytes} bytes; the limit is 1 MiB")
}
