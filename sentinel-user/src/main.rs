//! `sentinel`: the daemon and its command line.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand, ValueEnum};
use sentinel_user::{
    config::Config,
    control,
    daemon::{self, RunOptions},
    ssh_guard::audit::AuditLog,
};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(version, about = "Kernel-level guardian for Linux servers")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run(RunArgs),
    /// Check a configuration file without touching anything: exit 0 when it is valid,
    /// otherwise print every problem as file:line:column: reason and exit 1.
    Check {
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// List the bans in force (address, reason, failures, expiry).
    Bans(SocketArg),
    /// Ban an address (IPv6: its whole prefix) now.
    Ban {
        address: String,
        /// How long, e.g. 30m, 1h, 7d
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Lift the ban of an address at once.
    Unban {
        address: String,
        #[command(flatten)]
        socket: SocketArg,
    },
}

#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Configuration file (YAML) [default: /etc/sentinel/sentinel.yaml, if present]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address of the Prometheus endpoint [default: 127.0.0.1:9848]
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<SocketAddr>,
    /// Log format
    #[arg(long, value_enum, default_value_t = LogFormat::Human)]
    log_format: LogFormat,
    /// Root-only Unix socket for `sentinel bans`, `ban` and `unban`
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Where state that must survive restarts and reboots is kept (the bans in force)
    #[arg(long, value_name = "DIR", default_value = "/var/lib/sentinel")]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run(args) => run(args),
        Command::Check { file } => return check(&file),
        Command::Bans(SocketArg { socket }) => print(control::bans(&socket)),
        Command::Ban {
            address,
            duration,
            socket,
        } => print(control::ban(&socket.socket, &address, &duration)),
        Command::Unban { address, socket } => print(control::unban(&socket.socket, &address)),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sentinel: error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = Config::load(args.config.as_deref())?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    runtime.block_on(daemon::run(RunOptions {
        config,
        config_path: args.config,
        metrics_addr: args.metrics_addr,
        control_socket: args.control_socket,
        state_dir: args.state_dir,
    }))?;
    Ok(())
}

fn print(text: Result<String, sentinel_user::Error>) -> anyhow::Result<()> {
    println!("{}", text?);
    Ok(())
}

fn check(file: &std::path::Path) -> ExitCode {
    let config = match Config::load(Some(file)) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{error}");
            return ExitCode::FAILURE;
        }
    };
    // The daemon refuses to start without its audit log; say so now, not at the next start.
    if config.ssh_guard.enabled {
        if !nix::unistd::geteuid().is_root() {
            eprintln!(
                "note: ssh_guard.audit_log ({}) was not checked: only a check run as root, like \
                 the daemon, can tell whether the daemon can write it",
                config.ssh_guard.audit_log.display()
            );
        } else if let Err(error) = AuditLog::check_writable(&config.ssh_guard.audit_log) {
            eprintln!(
                "{}: ssh_guard.audit_log: {error}; the daemon would refuse to start",
                file.display()
            );
            return ExitCode::FAILURE;
        }
    }
    let policies = config.policies.services.len();
    println!(
        "{}: valid ({policies} {}, SSH guard {})",
        file.display(),
        if policies == 1 { "policy" } else { "policies" },
        if config.ssh_guard.enabled {
            "on"
        } else {
            "off"
        },
    );
    ExitCode::SUCCESS
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_env("SENTINEL_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
