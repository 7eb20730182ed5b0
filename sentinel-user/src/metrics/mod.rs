//! The Prometheus registry behind `/metrics`. Kernel-side counters are read from the eBPF maps
//! at scrape time by a collector, so a scrape always sees the current counts.

mod connections;
mod kernel_counters;

pub use connections::ConnectionMetrics;
pub(crate) use connections::{Endpoint, Rejection, Stage};
pub use kernel_counters::KernelCounters;

use std::sync::Arc;

use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
}

impl Metrics {
    pub fn new(kernel: Arc<KernelCounters>) -> Self {
        let mut registry = Registry::default();

        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        registry.register(
            "sentinel_build_info",
            "Sentinel's version; the value is always 1",
            build_info,
        );

        registry.register_collector(Box::new(kernel));
        Self { registry }
    }

    /// For the other concerns to register their metrics before serving starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every metric in `format`.
    pub fn encode(&self, format: Format) -> Result<String, std::fmt::Error> {
        let mut body = String::new();
        encode(&mut body, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => body,
            Format::PrometheusText => openmetrics_to_prometheus_text(&body),
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The classic text format (0.0.4) that curl users, promtool and older scrapers read.
    PrometheusText,
}

/// Rewrites OpenMetrics text as classic Prometheus text: counters' HELP and TYPE name the
/// `_total` series (OpenMetrics names the family without it), and `# EOF` is dropped.
fn openmetrics_to_prometheus_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classic_text_names_counters_with_total() {
        let openmetrics = "\
# HELP sentinel_exec Processes executed.
# TYPE sentinel_exec counter
sentinel_exec_total{service=\"/\"} 3
# HELP sentinel_build_info Version.
# TYPE sentinel_build_info gauge
sentinel_build_info{version=\"1\"} 1
# EOF
";
        assert_eq!(
            openmetrics_to_prometheus_text(openmetrics),
            "\
# HELP sentinel_exec_total Processes executed.
# TYPE sentinel_exec_total counter
sentinel_exec_total{service=\"/\"} 3
# HELP sentinel_build_info Version.
# TYPE sentinel_build_info gauge
sentinel_build_info{version=\"1\"} 1
"
        );
    }
}
