//! Developer tasks: `cargo xtask run | test | vm-test | bench | setup`.

mod vm;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run, test and benchmark Sentinel")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a Debian kernel under QEMU and run the privileged suites inside it.
    VmTest(vm::VmTestArgs),
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::VmTest(args) => vm::vm_test(&args),
    }
}
