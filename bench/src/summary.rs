//! The one table every bench run ends with: each of Sentinel's figures over its floor (the same
//! work done by the least program that can do it, or nothing attached) and over each peer, all
//! from the same run; and every raw figure, written to `target/bench/results.json` so that later
//! changes can be compared.

use std::{
    fmt::{self, Display, Formatter},
    fs,
    path::Path,
};

use anyhow::{Context, Result};
use serde_json::{Map, Value, json};

use crate::system::Machine;

/// One comparison: Sentinel's figure and the one it is compared with, in the same unit.
struct Row {
    section: String,
    measure: String,
    unit: &'static str,
    sentinel: f64,
    against: String,
    reference: f64,
}

#[derive(Default)]
pub struct Summary {
    rows: Vec<Row>,
    /// By section: its raw figures.
    raw: Map<String, Value>,
}

impl Summary {
    /// Sentinel's `sentinel` against `reference` of `against` (the floor or a peer).
    pub fn compare(
        &mut self,
        section: impl Into<String>,
        measure: impl Into<String>,
        unit: &'static str,
        sentinel: f64,
        against: impl Into<String>,
        reference: f64,
    ) {
        self.rows.push(Row {
            section: section.into(),
            measure: measure.into(),
            unit,
            sentinel,
            against: against.into(),
            reference,
        });
    }

    /// The raw figures of `section`, kept as they are in the results file.
    pub fn record(&mut self, section: &str, figures: Value) {
        self.raw.insert(section.to_owned(), figures);
    }

    /// Writes the results file: the machine, every comparison and every raw figure.
    pub fn write(&self, path: &Path, machine: &Machine) -> Result<()> {
        let comparisons: Vec<Value> = self
            .rows
            .iter()
            .map(|row| {
                json!({
                    "section": row.section,
                    "measure": row.measure,
                    "unit": row.unit,
                    "sentinel": row.sentinel,
                    "against": row.against,
                    "reference": row.reference,
                    "ratio": row.ratio(),
                })
            })
            .collect();
        let results = json!({
            "machine": machine.to_string(),
            "comparisons": comparisons,
            "sections": self.raw,
        });
        let text = serde_json::to_string_pretty(&results).context("cannot encode the results")?;
        fs::write(path, text + "\n").with_context(|| format!("cannot write {}", path.display()))
    }
}

impl Row {
    fn ratio(&self) -> f64 {
        self.sentinel / self.reference
    }
}

impl Display for Summary {
    fn fmt(&self, f: &mut Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "| section | measure | Sentinel | compared with | its figure | Sentinel / it |"
        )?;
        writeln!(f, "|---|---|--:|---|--:|--:|")?;
        for row in &self.rows {
            writeln!(
                f,
                "| {} | {} | {} {} | {} | {} {} | {} |",
                row.section,
                row.measure,
                figure(row.sentinel),
                row.unit,
                row.against,
                figure(row.reference),
                row.unit,
                ratio(row.ratio()),
            )?;
        }
        Ok(())
    }
}

/// "0.46x"; "—" when either figure is missing (none) or the reference is 0.
fn ratio(ratio: f64) -> String {
    if ratio.is_finite() {
        format!("{ratio:.2}x")
    } else {
        "—".to_owned()
    }
}

/// Three significant digits, without exponents; "none" for a missing figure (NaN).
fn figure(value: f64) -> String {
    if value.is_nan() {
        return "none".to_owned();
    }
    let decimals = match value.abs() {
        v if v >= 100.0 => 0,
        v if v >= 10.0 => 1,
        v if v >= 1.0 => 2,
        _ => 3,
    };
    format!("{value:.decimals$}")
}
