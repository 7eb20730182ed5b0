//! The floor of a `/metrics` scrape: the same OpenMetrics body encoded from memory with the same
//! library, no file, map or socket touched. The bench compares scrapes with it.

use std::time::{Duration, Instant};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric, text::encode},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};

/// One family of a scraped body: its samples' labels and values, kept as text.
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    metric_type: MetricType,
    samples: Vec<(Vec<(String, String)>, f64)>,
}

/// Every family of a body, encoded as they are.
#[derive(Debug)]
struct Families(Vec<Family>);

impl Collector for Families {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        for family in &self.0 {
            let mut samples =
                encoder.encode_descriptor(&family.name, &family.help, None, family.metric_type)?;
            for (labels, value) in &family.samples {
                let sample = samples.encode_family(labels)?;
                match family.metric_type {
                    MetricType::Counter => ConstCounter::new(*value).encode(sample)?,
                    _ => ConstGauge::new(*value).encode(sample)?,
                }
            }
        }
        Ok(())
    }
}

/// Encodes the counter and gauge families of `openmetrics` (a scraped body) `times` times from
/// memory; returns each encoding's duration and the size of the body it made.
pub fn encode_from_memory(openmetrics: &str, times: usize) -> (Vec<Duration>, usize) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(parse(openmetrics)));
    let mut durations = Vec::with_capacity(times);
    let mut size = 0;
    for _ in 0..times {
        let started = Instant::now();
        let mut body = String::new();
        encode(&mut body, &registry).expect("encoding into a String cannot fail");
        durations.push(started.elapsed());
        size = body.len();
    }
    (durations, size)
}

/// The counter and gauge families of an OpenMetrics body; histograms and others are left out
/// (Sentinel's one histogram is a few dozen lines whatever the number of services).
fn parse(openmetrics: &str) -> Families {
    let mut families: Vec<Family> = Vec::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            families.push(Family {
                name: name.to_owned(),
                help: help.to_owned(),
                metric_type: MetricType::Unknown,
                samples: Vec::new(),
            });
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            if let Some(family) = families.last_mut() {
                family.metric_type = match rest.rsplit(' ').next() {
                    Some("counter") => MetricType::Counter,
                    Some("gauge") => MetricType::Gauge,
                    _ => MetricType::Unknown,
                };
            }
        } else if !line.starts_with('#')
            && let (Some(family), Some(sample)) = (families.last_mut(), sample(line))
        {
            family.samples.push(sample);
        }
    }
    families.retain(|family| matches!(family.metric_type, MetricType::Counter | MetricType::Gauge));
    Families(families)
}

/// `name{a="x",b="y"} value` as labels and value; label values hold no quotes or commas here.
fn sample(line: &str) -> Option<(Vec<(String, String)>, f64)> {
    let (series, value) = line.rsplit_once(' ')?;
    let labels = match series.split_once('{') {
        Some((_, labels)) => labels
            .trim_end_matches('}')
            .split(',')
            .filter(|pair| !pair.is_empty())
            .filter_map(|pair| {
                let (key, value) = pair.split_once('=')?;
                Some((key.to_owned(), value.trim_matches('"').to_owned()))
            })
            .collect(),
        None => Vec::new(),
    };
    Some((labels, value.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_the_same_series_again() {
        let body = "# HELP sentinel_exec Processes executed.\n\
                    # TYPE sentinel_exec counter\n\
                    sentinel_exec_total{service=\"a\"} 3\n\
                    # HELP sentinel_pids_current Tasks.\n\
                    # TYPE sentinel_pids_current gauge\n\
                    sentinel_pids_current{service=\"a\",x=\"b\"} 2.0\n\
                    # EOF\n";
        let (durations, size) = encode_from_memory(body, 2);
        assert_eq!(durations.len(), 2);
        let mut again = String::new();
        let mut registry = Registry::default();
        registry.register_collector(Box::new(parse(body)));
        encode(&mut again, &registry).unwrap();
        assert_eq!(
            again,
            "# HELP sentinel_exec Processes executed.\n\
             # TYPE sentinel_exec counter\n\
             sentinel_exec_total{service=\"a\"} 3.0\n\
             # HELP sentinel_pids_current Tasks.\n\
             # TYPE sentinel_pids_current gauge\n\
             sentinel_pids_current{service=\"a\",x=\"b\"} 2.0\n\
             # EOF\n"
        );
        assert_eq!(size, again.len());
    }
}
