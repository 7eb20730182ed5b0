//! The Prometheus registry behind `/metrics`. Kernel-side counters are read from the eBPF maps
//! at scrape time by a collector, so a scrape always sees the current counts.

mod connections;
mod kernel_counters;

pub use connections::ConnectionMetrics;
pub(crate) use connections::{Endpoint, Rejection, Stage};
pub use kernel_counters::KernelCounters;

use std::{
    fmt,
    sync::{Arc, Mutex},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};

type Labels = Vec<(&'static str, String)>;

/// A body is handed over in pieces of at least this size (a whole family may make one larger):
/// a scrape never holds the whole body, which is megabytes with thousands of services.
const CHUNK_BYTES: usize = 64 * 1024;

pub struct Metrics {
    registry: Registry,
    /// Buffers of chunks already sent, written again by the next scrapes.
    buffers: Arc<Buffers>,
}

/// Chunks' buffers kept between scrapes: text written into fresh memory takes a page fault
/// for every page at every scrape, and a family larger than a chunk grows it by copying.
#[derive(Default)]
struct Buffers(Mutex<Vec<String>>);

/// Buffers kept: as many as one scrape has at once (being written, queued, being sent).
const BUFFERS_KEPT: usize = 4;

impl Buffers {
    fn take(&self) -> String {
        let kept = self.0.lock().expect("buffers lock").pop();
        kept.unwrap_or_else(|| String::with_capacity(CHUNK_BYTES))
    }
}

/// A piece of a body; its buffer goes back for the next scrapes once it is sent.
pub struct Chunk {
    text: String,
    buffers: Arc<Buffers>,
}

impl AsRef<[u8]> for Chunk {
    fn as_ref(&self) -> &[u8] {
        self.text.as_bytes()
    }
}

impl Drop for Chunk {
    fn drop(&mut self) {
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let mut kept = self.buffers.0.lock().expect("buffers lock");
        if kept.len() < BUFFERS_KEPT {
            kept.push(text);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
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
        Self {
            registry,
            buffers: Arc::default(),
        }
    }
}

impl Metrics {
    /// For the other concerns to register their metrics before serving starts.
    pub fn registry_mut(&mut self) -> &mut Registry {
        &mut self.registry
    }

    /// Encodes every metric in `format`, handing the text to `send` in chunks. A chunk ends
    /// where a family ends: `send` may wait for the client there, since the encoder then holds
    /// no lock of any metric. An error from `send` stops the encoding.
    pub fn encode(&self, format: Format, send: impl FnMut(Chunk) -> fmt::Result) -> fmt::Result {
        let mut chunks = Chunks {
            format,
            send,
            chunk: self.buffers.take(),
            buffers: Arc::clone(&self.buffers),
            comment: String::new(),
            pending_help: String::new(),
            at_line_start: true,
        };
        encode(&mut chunks, &self.registry)?;
        chunks.finish()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    OpenMetrics,
    /// The classic text format (0.0.4) that curl users, promtool and older scrapers read.
    PrometheusText,
}

/// The encoder's output, cut into chunks between families. For the classic text format,
/// counters' HELP and TYPE name the `_total` series (OpenMetrics names the family without it),
/// and `# UNIT` and `# EOF` are dropped.
struct Chunks<F> {
    format: Format,
    send: F,
    buffers: Arc<Buffers>,
    chunk: String,
    /// The comment line being written (`# HELP`, `# TYPE`, ...), until its end.
    comment: String,
    /// A classic text HELP line, held until the TYPE line says whether it names a counter.
    pending_help: String,
    at_line_start: bool,
}

impl<F: FnMut(Chunk) -> fmt::Result> Chunks<F> {
    /// A piece of a comment line: the line is complete at its newline, and what follows it is
    /// written as any other text.
    fn write_comment(&mut self, text: &str) -> fmt::Result {
        let Some(end) = text.find('\n') else {
            self.comment.push_str(text);
            self.at_line_start &= text.is_empty();
            return Ok(());
        };
        let (line_end, rest) = text.split_at(end + 1);
        self.comment.push_str(line_end);
        self.at_line_start = true;
        self.comment_done()?;
        if rest.is_empty() {
            return Ok(());
        }
        fmt::Write::write_str(self, rest)
    }

    /// A whole comment line (with its newline).
    fn comment_done(&mut self) -> fmt::Result {
        let line = std::mem::take(&mut self.comment);
        if line.starts_with("# HELP ") && self.chunk.len() >= CHUNK_BYTES {
            // A family begins: the previous ones are complete.
            let next = self.buffers.take();
            self.send_chunk(next)?;
        }
        match self.format {
            Format::OpenMetrics => self.chunk.push_str(&line),
            Format::PrometheusText => self.classic_comment(&line),
        }
        self.comment = line;
        self.comment.clear();
        Ok(())
    }

    fn classic_comment(&mut self, line: &str) {
        if line.starts_with("# HELP ") {
            self.flush_help();
            self.pending_help.push_str(line);
            return;
        }
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter\n"))
        {
            if let Some(text) = self
                .pending_help
                .strip_prefix("# HELP ")
                .and_then(|help| help.strip_prefix(name))
                .filter(|text| text.starts_with(' '))
            {
                self.chunk.push_str("# HELP ");
                self.chunk.push_str(name);
                self.chunk.push_str("_total");
                self.chunk.push_str(text);
                self.pending_help.clear();
            }
            self.flush_help();
            self.chunk.push_str("# TYPE ");
            self.chunk.push_str(name);
            self.chunk.push_str("_total counter\n");
            return;
        }
        self.flush_help();
        if !(line.starts_with("# UNIT ") || line == "# EOF\n") {
            self.chunk.push_str(line);
        }
    }

    fn flush_help(&mut self) {
        self.chunk.push_str(&self.pending_help);
        self.pending_help.clear();
    }

    /// Sends what is left.
    fn finish(&mut self) -> fmt::Result {
        if !self.comment.is_empty() {
            return Err(fmt::Error);
        }
        self.flush_help();
        self.send_chunk(String::new())
    }

    /// Sends the chunk written so far, and goes on in `next`.
    fn send_chunk(&mut self, next: String) -> fmt::Result {
        let text = std::mem::replace(&mut self.chunk, next);
        (self.send)(Chunk {
            text,
            buffers: Arc::clone(&self.buffers),
        })
    }
}

impl<F: FnMut(Chunk) -> fmt::Result> fmt::Write for Chunks<F> {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        // The encoder writes a line in pieces, the newline last: a piece of a sample line goes
        // straight into the chunk, and only comment lines take the slower way.
        if self.comment.is_empty() && !(self.at_line_start && text.starts_with('#')) {
            self.chunk.push_str(text);
            self.at_line_start = text.ends_with('\n');
            return Ok(());
        }
        self.write_comment(text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The chunks `metrics` is sent in, encoded in `format`.
    fn encoded(metrics: &Metrics, format: Format) -> Vec<String> {
        let mut chunks = Vec::new();
        metrics
            .encode(format, |chunk| {
                chunks.push(chunk.text.clone());
                Ok(())
            })
            .unwrap();
        chunks
    }

    #[test]
    fn classic_text_names_counters_with_total() {
        let mut metrics = Metrics::default();
        let registry = metrics.registry_mut();
        let exec = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
        exec.get_or_create(&vec![("service", "/".into())]).inc_by(3);
        registry.register("sentinel_exec", "Processes executed", exec);
        let bytes = prometheus_client::metrics::gauge::Gauge::<i64>::default();
        bytes.set(7);
        registry.register_with_unit(
            "sentinel_memory",
            "Memory",
            prometheus_client::registry::Unit::Bytes,
            bytes,
        );
        let text = encoded(&metrics, Format::PrometheusText).concat();
        assert!(
            text.contains(
                "\
# HELP sentinel_exec_total Processes executed.
# TYPE sentinel_exec_total counter
sentinel_exec_total{service=\"/\"} 3
"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "\
# HELP sentinel_memory_bytes Memory.
# TYPE sentinel_memory_bytes gauge
sentinel_memory_bytes 7
"
            ),
            "{text}"
        );
        assert!(
            text.starts_with("# HELP sentinel_build_info Sentinel's version"),
            "{text}"
        );
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
    }

    #[test]
    fn a_body_is_sent_in_chunks_cut_between_families_and_nothing_is_lost() {
        let mut metrics = Metrics::default();
        for family in 0..50 {
            let series = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
            for service in 0..2000 {
                series
                    .get_or_create(&vec![("service", format!("service-{service}.service"))])
                    .inc_by(family);
            }
            metrics.registry_mut().register(
                format!("family_{family}"),
                "A family of two thousand series",
                series,
            );
        }
        let mut whole = String::new();
        encode(&mut whole, &metrics.registry).unwrap();

        let chunks = encoded(&metrics, Format::OpenMetrics);
        assert!(chunks.len() > 2, "{} chunks", chunks.len());
        for chunk in &chunks[1..] {
            assert!(chunk.starts_with("# HELP family_"), "{}", &chunk[..40]);
        }
        for chunk in &chunks[..chunks.len() - 1] {
            assert!(chunk.len() >= CHUNK_BYTES);
        }
        assert_eq!(chunks.concat(), whole);
        assert!(whole.ends_with("# EOF\n"));

        let classic = encoded(&metrics, Format::PrometheusText).concat();
        assert_eq!(classic.lines().count(), whole.lines().count() - 1);
        assert_eq!(classic.matches("_total counter\n").count(), 50);
    }

    #[test]
    fn an_error_from_the_client_side_stops_the_encoding() {
        let mut metrics = Metrics::default();
        let series = Family::<Labels, prometheus_client::metrics::counter::Counter>::default();
        for service in 0..2000 {
            let _ = series.get_or_create(&vec![("service", format!("s{service}"))]);
        }
        metrics
            .registry_mut()
            .register("big", "Big", series.clone());
        metrics.registry_mut().register("after", "After", series);
        let mut sent = 0;
        let result = metrics.encode(Format::OpenMetrics, |_| {
            sent += 1;
            Err(fmt::Error)
        });
        assert_eq!(result, Err(fmt::Error));
        assert_eq!(sent, 1);
    }

    #[test]
    fn a_sent_chunk_leaves_its_buffer_to_the_next_one() {
        let metrics = Metrics::default();
        let mut sent = Vec::new();
        metrics
            .encode(Format::OpenMetrics, |chunk| {
                sent.push(chunk);
                Ok(())
            })
            .unwrap();
        let address = sent[0].text.as_ptr();
        let capacity = sent[0].text.capacity();
        drop(sent);
        let reused = metrics.buffers.take();
        assert!(reused.is_empty());
        assert_eq!((reused.as_ptr(), reused.capacity()), (address, capacity));
        // No more are kept than one scrape has at once.
        let chunks: Vec<Chunk> = (0..BUFFERS_KEPT + 1)
            .map(|_| Chunk {
                text: "y".repeat(16),
                buffers: Arc::clone(&metrics.buffers),
            })
            .collect();
        drop(chunks);
        assert_eq!(metrics.buffers.0.lock().unwrap().len(), BUFFERS_KEPT);
    }
}
