//! `sentinel`: the daemon and its command line.

use std::{
    io::Write,
    net::SocketAddr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use clap::{CommandFactory, Parser, Subcommand, ValueEnum, error::ErrorKind};
use clap_complete::Shell;
use sentinel_user::{
    Error,
    config::{Config, DEFAULT_PATH},
    control,
    daemon::{self, RunOptions},
    policy,
    ssh_guard::audit::AuditLog,
    top,
};
use serde_json::json;
use tracing_subscriber::EnvFilter;

/// The exit statuses, as in sysexits.h; also in `--help` and the man page.
mod exit {
    /// Something asked for does not work (`status`), or the daemon refused the request.
    pub const FAILURE: u8 = 1;
    /// The command line is wrong.
    pub const USAGE: u8 = 64;
    /// The daemon's control socket cannot be reached.
    pub const UNREACHABLE: u8 = 69;
    /// The configuration file is invalid (`check`, `reload`, and the daemon at start).
    pub const CONFIG: u8 = 78;
}

const EXIT_STATUS_HELP: &str = "\
Exit status:
  0   success; for `status`, everything Sentinel is asked to do works
  1   something asked for does not work (`status`), or the daemon refused the request
  64  the command line is wrong
  69  the daemon cannot be reached (not running, or another control socket)
  78  the configuration file is invalid (`check`, `reload`, `run` at start)";

const DEFAULT_STATE_DIR: &str = "/var/lib/sentinel";

#[derive(Parser)]
#[command(
    name = "sentinel",
    version,
    about = "Kernel-level guardian for Linux servers",
    after_help = EXIT_STATUS_HELP
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the daemon in the foreground.
    Run(RunArgs),
    /// Check a configuration file without touching anything: exit 0 when it is valid,
    /// otherwise print every problem as file:line:column: reason and exit 78.
    Check {
        #[arg(value_name = "FILE", default_value = DEFAULT_PATH)]
        file: PathBuf,
        #[command(flatten)]
        output: OutputArg,
    },
    /// What the running daemon does: probes, policies and their services, the SSH guard, the
    /// last reload. Exits 1 when something asked for does not work.
    Status {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// A live table of the services (memory, CPU, pids, pressure, execs, connections, OOM kills)
    /// and the daemon's recent events. Exec/s and conn/s change every second; memory, pids and
    /// CPU%, THR% and PSI% come from the daemon's resource read every metrics.resource_refresh
    /// (10 s by default) and change that often.
    Top(TopArgs),
    /// List the bans in force (address, reason, failures, expiry).
    Bans {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Ban an address (IPv6: its whole prefix) or a network now; a network holding an
    /// allow-listed address is refused.
    Ban {
        /// 203.0.113.7, 203.0.113.0/24, 2001:db8::7 or 2001:db8::/64
        address: String,
        /// How long, e.g. 30m, 1h, 7d
        #[arg(long = "for", value_name = "DURATION")]
        duration: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Lift the ban of an address or network at once; a ban from the CrowdSec fleet is lifted
    /// on this host only, until it would end.
    Unban {
        address: String,
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Release a service its containment policy froze or isolated: thaw it, or lift its
    /// isolation. A service that is not held is refused (exit 1), naming those that are.
    Release {
        /// The service as `sentinel status` lists it (its cgroup path, e.g.
        /// system.slice/web.service)
        service: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Reload the daemon's configuration file now and report the outcome; a refused file
    /// changes nothing and exits 78.
    Reload {
        #[command(flatten)]
        output: OutputArg,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Give every unit and cgroup the limits it had before Sentinel changed them, from the
    /// record in the state directory, as removing their policies would; run by the package's
    /// removal. Refused while the daemon runs (stopping it leaves limits in place).
    RestoreLimits {
        /// The daemon's --state-dir
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Print a shell completion script (e.g. `sentinel completions bash > /etc/bash_completion.d/sentinel`).
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
    /// Print the manual page (roff).
    #[command(hide = true)]
    Man,
}

#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(clap::Args)]
struct OutputArg {
    /// text for people, json for scripts (one document, fields documented in the README)
    #[arg(long, value_enum, default_value_t = Output::Text)]
    output: Output,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args)]
struct TopArgs {
    /// Print one frame and exit (waits for the daemon's next resource read, at most 11 s:
    /// rates need two samples)
    #[arg(long)]
    once: bool,
    /// Print one JSON document of the figures and exit
    #[arg(long, conflicts_with = "once")]
    json: bool,
    #[command(flatten)]
    socket: SocketArg,
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
    /// Root-only Unix socket for `sentinel status`, `top`, `bans`, `ban`, `unban`, `release`, `reload`
    #[arg(long, value_name = "PATH", default_value = control::DEFAULT_SOCKET)]
    control_socket: PathBuf,
    /// Where state that must survive restarts and reboots is kept (the bans in force)
    #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
    state_dir: PathBuf,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => ExitCode::SUCCESS,
                _ => ExitCode::from(exit::USAGE),
            };
        }
    };
    let result = match cli.command {
        Command::Run(args) => run(args).map(|()| ExitCode::SUCCESS),
        Command::Check { file, output } => return check(&file, output.output),
        Command::Status { output, socket } => status(&socket.socket, output.output),
        Command::Top(args) => top_command(args),
        Command::Bans { output, socket } => bans(&socket.socket, output.output),
        Command::Ban {
            address,
            duration,
            socket,
        } => print(control::ban(&socket.socket, &address, &duration)),
        Command::Unban {
            address,
            output,
            socket,
        } => unban(&socket.socket, &address, output.output),
        Command::Release { service, socket } => print(control::release(&socket.socket, &service)),
        Command::Reload { output, socket } => reload(&socket.socket, output.output),
        Command::RestoreLimits { state_dir, socket } => restore_limits(&state_dir, &socket.socket),
        Command::Completions { shell } => {
            let shell = match shell {
                CompletionShell::Bash => Shell::Bash,
                CompletionShell::Zsh => Shell::Zsh,
                CompletionShell::Fish => Shell::Fish,
            };
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "sentinel",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
    };
    result.unwrap_or_else(|error| {
        eprintln!("sentinel: error: {error:#}");
        ExitCode::from(exit_status(&error))
    })
}

/// The exit status that tells a script what kind of failure `error` is.
fn exit_status(error: &anyhow::Error) -> u8 {
    match error.downcast_ref::<Error>() {
        Some(Error::ConfigInvalid(_)) => exit::CONFIG,
        Some(Error::DaemonUnreachable { .. }) => exit::UNREACHABLE,
        Some(Error::InvalidArgument(_)) => exit::USAGE,
        _ => exit::FAILURE,
    }
}

fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = Config::load(args.config.as_deref())?;
    daemon::bound_allocator();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        // The resource refresh (every 10 s by default) and the housekeeping (every minute) run
        // on blocking threads: kept between runs rather than made again for each.
        .thread_keep_alive(Duration::from_secs(600))
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

fn print(text: Result<String, Error>) -> anyhow::Result<ExitCode> {
    println!("{}", text?);
    Ok(ExitCode::SUCCESS)
}

fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

fn status(socket: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let status = control::status(socket)?;
    let problems = status.problems();
    match output {
        Output::Text => println!("{}", control::status_text(&status)),
        Output::Json => {
            let mut document = serde_json::to_value(&status)?;
            document["problems"] = json!(problems);
            print_json(&document);
        }
    }
    Ok(if problems.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILURE)
    })
}

fn bans(socket: &Path, output: Output) -> anyhow::Result<ExitCode> {
    match output {
        Output::Text => println!("{}", control::bans(socket)?),
        Output::Json => print_json(&json!(control::ban_list(socket)?)),
    }
    Ok(ExitCode::SUCCESS)
}

fn unban(socket: &Path, address: &str, output: Output) -> anyhow::Result<ExitCode> {
    let unbanned = control::unban(socket, address)?;
    match output {
        Output::Text => println!("{}", control::unbanned_text(&unbanned)),
        Output::Json => print_json(&json!({
            "address": unbanned.net.to_string(),
            "fleet_override_seconds": unbanned.fleet_override.map(|left| left.as_secs()),
        })),
    }
    Ok(ExitCode::SUCCESS)
}

fn reload(socket: &Path, output: Output) -> anyhow::Result<ExitCode> {
    let report = control::reload(socket)?;
    match output {
        Output::Text if report.ok => println!("reloaded: {}", control::reload_text(&report)),
        Output::Text => eprintln!("sentinel: reload {}", control::reload_text(&report)),
        Output::Json => print_json(&serde_json::to_value(&report)?),
    }
    Ok(match (report.ok, report.problems.is_empty()) {
        (true, _) => ExitCode::SUCCESS,
        (false, false) => ExitCode::from(exit::CONFIG),
        (false, true) => ExitCode::from(exit::FAILURE),
    })
}

fn restore_limits(state_dir: &Path, socket: &Path) -> anyhow::Result<ExitCode> {
    match control::status(socket) {
        Ok(_) => {
            return Err(Error::DaemonRunning {
                path: socket.to_path_buf(),
            }
            .into());
        }
        Err(Error::DaemonUnreachable { .. }) => {}
        Err(other) => return Err(other.into()),
    }
    // The systemd calls wait for their answers on this runtime.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let report = policy::enforcer::give_back_everything(state_dir, runtime.handle().clone())?;
    for line in &report.given_back {
        println!("{line}");
    }
    for line in &report.failed {
        eprintln!("sentinel: not given back: {line}");
    }
    Ok(if report.failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(exit::FAILURE)
    })
}

fn top_command(args: TopArgs) -> anyhow::Result<ExitCode> {
    let socket = &args.socket.socket;
    if args.json {
        print_json(&serde_json::to_value(control::stats(socket)?)?);
    } else if args.once {
        println!("{}", top::once(socket)?);
    } else {
        top::run(socket)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn check(file: &Path, output: Output) -> ExitCode {
    let result = Config::load(Some(file));
    if let Ok(config) = &result
        && let Some(problem) = audit_log_problem(file, config)
    {
        match output {
            Output::Json => print_json(&json!({
                "file": file.display().to_string(),
                "valid": false,
                "error": problem,
            })),
            Output::Text => eprintln!("{problem}"),
        }
        return ExitCode::from(exit::FAILURE);
    }
    let document = match &result {
        Ok(config) => json!({
            "file": file.display().to_string(),
            "valid": true,
            "policies": config.policies.services.len(),
            "ssh_guard": config.ssh_guard.enabled,
            "problems": [],
        }),
        Err(Error::ConfigInvalid(problems)) => json!({
            "file": file.display().to_string(),
            "valid": false,
            "problems": problems.0,
        }),
        Err(other) => json!({
            "file": file.display().to_string(),
            "valid": false,
            "error": other.to_string(),
        }),
    };
    match (output, &result) {
        (Output::Json, _) => print_json(&document),
        (Output::Text, Ok(config)) => println!(
            "{}: valid ({} {}, SSH guard {})",
            file.display(),
            config.policies.services.len(),
            if config.policies.services.len() == 1 {
                "policy"
            } else {
                "policies"
            },
            if config.ssh_guard.enabled {
                "on"
            } else {
                "off"
            },
        ),
        (Output::Text, Err(error)) => eprintln!("{error}"),
    }
    match result {
        Ok(_) => ExitCode::SUCCESS,
        Err(_) => ExitCode::from(exit::CONFIG),
    }
}

/// The daemon refuses to start without its audit log: say so now, not at the next start. Only
/// a check run as root, like the daemon, can tell.
fn audit_log_problem(file: &Path, config: &Config) -> Option<String> {
    if !config.ssh_guard.enabled {
        return None;
    }
    if !nix::unistd::geteuid().is_root() {
        eprintln!(
            "note: ssh_guard.audit_log ({}) was not checked: only a check run as root, like the \
             daemon, can tell whether the daemon can write it",
            config.ssh_guard.audit_log.display()
        );
        return None;
    }
    AuditLog::check_writable(&config.ssh_guard.audit_log)
        .err()
        .map(|error| {
            format!(
                "{}: ssh_guard.audit_log: {error}; the daemon would refuse to start",
                file.display()
            )
        })
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
