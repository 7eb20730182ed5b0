//! `cargo xtask fuzz`: the libFuzzer targets in fuzz/, each run for a fixed time from its seeds
//! in fuzz/seeds/<target>/ plus the corpus earlier runs grew in fuzz/corpus/<target>/.
//! Sanitizers need a nightly; the pinned eBPF nightly is the one the project already has.

use std::{
    fs::{self, File},
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, Result, bail};
use sentinel_toolchain::ebpf_pin;

use crate::{
    host::{command_output, describe, run, status},
    step,
};

#[derive(clap::Args)]
pub struct FuzzArgs {
    /// How long each target runs.
    #[arg(long, default_value_t = 60)]
    pub seconds: u64,
    /// Run only this target (default: every target, one after the other).
    #[arg(long, value_name = "NAME")]
    pub target: Option<String>,
}

/// libFuzzer's options besides the run time: an input that takes longer than `-timeout` seconds
/// counts as a hang, and more than `-rss_limit_mb` of memory (or one allocation as large) as
/// unbounded allocation; both fail the run like a crash.
const LIBFUZZER_OPTIONS: [&str; 3] = ["-timeout=10", "-rss_limit_mb=2048", "-print_final_stats=1"];

/// What one run reports.
struct Outcome {
    target: String,
    executions: u64,
    executions_per_second: u64,
    corpus: usize,
    crashes: usize,
    log: PathBuf,
}

pub fn fuzz(workspace: &Path, cargo_fuzz: &Path, args: &FuzzArgs) -> Result<()> {
    let channel = ebpf_pin().channel;
    let cargo_fuzz = |task: &str| {
        let mut command = Command::new("rustup");
        command
            .current_dir(workspace)
            .args(["run", channel])
            .arg(cargo_fuzz)
            .args(["fuzz", task]);
        command
    };
    let listed = command_output(&mut cargo_fuzz("list"))?;
    let all: Vec<&str> = listed.lines().map(str::trim).collect();
    let targets = match &args.target {
        Some(name) if all.contains(&name.as_str()) => vec![name.as_str()],
        Some(name) => bail!(
            "no fuzz target `{name}`; the targets are {}",
            all.join(", ")
        ),
        None => all,
    };
    // Builds go to the workspace's target directory, which `cargo clean` empties.
    let target_dir = workspace.join("target/fuzz");
    step(&format!("building the fuzz targets with {channel}"));
    let mut build = cargo_fuzz("build");
    build.arg("--target-dir").arg(&target_dir);
    if let [target] = targets[..] {
        build.arg(target);
    }
    run(&mut build)?;

    let logs = target_dir.join("logs");
    fs::create_dir_all(&logs)?;
    let mut outcomes = Vec::new();
    for target in targets {
        step(&format!("fuzzing {target} for {} s", args.seconds));
        let corpus = workspace.join("fuzz/corpus").join(target);
        let seeds = workspace.join("fuzz/seeds").join(target);
        fs::create_dir_all(&corpus)?;
        let log = logs.join(format!("{target}.log"));
        let mut command = cargo_fuzz("run");
        command
            .arg("--target-dir")
            .arg(&target_dir)
            .arg(target)
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={}", args.seconds))
            .args(LIBFUZZER_OPTIONS);
        let output = File::create(&log)?;
        command.stdout(output.try_clone()?).stderr(output);
        let exit = status(&mut command)?;
        let text =
            fs::read_to_string(&log).with_context(|| format!("cannot read {}", log.display()))?;
        let outcome = Outcome {
            target: target.to_owned(),
            executions: final_stat(&text, "number_of_executed_units"),
            executions_per_second: final_stat(&text, "average_exec_per_sec"),
            corpus: fs::read_dir(&corpus)?.count(),
            // libFuzzer stops at the first crash.
            crashes: usize::from(!exit.success()),
            log,
        };
        println!(
            "[xtask] {target}: {} executions, {} exec/s, corpus {} inputs, {} crashes",
            outcome.executions, outcome.executions_per_second, outcome.corpus, outcome.crashes
        );
        if !exit.success() {
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                println!("    {line}");
            }
            // cargo-fuzz names the saved input and how to reproduce the crash in the output.
            bail!(
                "fuzz target {target} failed ({exit}); the whole output is in {}\ncommand: {}",
                outcome.log.display(),
                describe(&command)
            );
        }
        outcomes.push(outcome);
    }
    step("fuzzing: summary");
    for outcome in &outcomes {
        println!(
            "[xtask] {:<18} {:>12} executions {:>8} exec/s {:>6} corpus {:>3} crashes  ({})",
            outcome.target,
            outcome.executions,
            outcome.executions_per_second,
            outcome.corpus,
            outcome.crashes,
            outcome.log.display()
        );
    }
    Ok(())
}

/// A `stat::NAME: VALUE` line of `-print_final_stats=1`; 0 when the run ended without them.
fn final_stat(log: &str, name: &str) -> u64 {
    log.lines()
        .find_map(|line| line.strip_prefix(&format!("stat::{name}:")))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}
