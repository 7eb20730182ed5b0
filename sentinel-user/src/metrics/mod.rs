//! The Prometheus registry behind `/metrics`. Kernel-side counters are read from the eBPF maps
//! at scrape time by a collector, so a scrape always sees the current counts.

mod connections;
mod kernel_counters;

pub use connections::ConnectionMetrics;
pub(crate) use connections::{Endpoint, Rejection, Stage};
pub use kernel_counters::KernelCounters;

use std::sync::{Arc, Mutex};

use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// Buffers of earlier bodies, written again by the next scrapes.
    buffers: Arc<Buffers>,
}

/// Bodies' buffers kept between scrapes: a body of megabytes written into fresh memory takes a
/// page fault for every page at every scrape, grows by copying itself, and once freed stays
/// with the allocator anyway.
#[derive(Default)]
struct Buffers(Mutex<Vec<String>>);

/// Buffers kept: one per scrape encoding at once.
const BUFFERS_KEPT: usize = 2;

impl Buffers {
    fn take(&self) -> String {
        self.0
            .lock()
            .expect("buffers lock")
            .pop()
            .unwrap_or_default()
    }
}

/// An encoded body; its buffer goes back for the next scrape once it is sent.
pub struct Body {
    text: String,
    buffers: Arc<Buffers>,
}

impl AsRef<[u8]> for Body {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl Drop for Body {
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let mut kept = self.buffers.0.lock().expect("buffers lock");
        if kept.len() < BUFFERS_KEPT {
            kept.push(text);
        }
    }
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
        Self {
            registry,
            buffers: Arc::default(),
        }
    }

    /// For the other concerns to register their metrics before serving starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Every metric in `format`.
    pub fn encode(&self, format: Format) -> Result<Body, std::fmt::Error> {
        let body = |text| Body {
            text,
            buffers: Arc::clone(&self.buffers),
        };
        let mut openmetrics = body(self.buffers.take());
        encode(&mut openmetrics.text, &self.registry)?;
        Ok(match format {
            Format::OpenMetrics => openmetrics,
            Format::PrometheusText => {
                let mut text = body(self.buffers.take());
                openmetrics_to_prometheus_text(&openmetrics.text, &mut text.text);
                text
            }
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
fn openmetrics_to_prometheus_text(openmetrics: &str, out: &mut String) {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    out.reserve(openmetrics.len());
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
        let mut text = String::new();
        openmetrics_to_prometheus_text(openmetrics, &mut text);
        assert_eq!(
            text,
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

    #[test]
    fn a_sent_body_leaves_its_buffer_to_the_next_scrape() {
        let buffers = Arc::new(Buffers::default());
        let body = |text: String| Body {
            text,
            buffers: Arc::clone(&buffers),
        };
        let mut first = body(buffers.take());
        first.text.push_str(&"x".repeat(1 << 20));
        let address = first.text.as_ptr();
        drop(first);
        let reused = buffers.take();
        assert!(reused.is_empty());
        assert_eq!(reused.as_ptr(), address);
        assert!(reused.capacity() >= 1 << 20);
        // No more are kept than scrapes encode at once.
        let bodies: Vec<Body> = (0..BUFFERS_KEPT + 1)
            .map(|_| body("y".repeat(16)))
            .collect();
        drop(bodies);
        assert_eq!(buffers.0.lock().unwrap().len(), BUFFERS_KEPT);
    }
}
