//! Wiring: start-up checks, probes, tasks, and the one shutdown path.

use std::{
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    Error,
    cgroup::{Attribution, CgroupTree, cgroupfs::CgroupFs, find_cgroup2_mount},
    config::{CgroupBackend, Config, DEFAULT_PATH, RestartRequired},
    control::ControlSocket,
    events::{EventHandler, read_ring, readable},
    http,
    kernel::{self, Btf},
    metrics::{KernelCounters, Metrics},
    policy::{
        enforcer::{AppliedView, Backend, Enforcer, Input as EnforcerInput},
        metrics::PolicyMetrics,
    },
    probes,
    ssh_guard::{Input as SshInput, SshGuard, SshGuardMetrics},
};

/// How long tasks get to finish after SIGINT/SIGTERM before the programs are detached anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// How often batched (no-wakeup) events are drained.
const EVENTS_POLL: Duration = Duration::from_millis(100);
/// Alerts wake the daemon per record; the timer is only a safety net.
const ALERTS_POLL: Duration = Duration::from_secs(1);
/// How often removed cgroups' counters are folded even without scrapes.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
/// How often the configuration file is checked for changes; a change is read once two polls
/// in a row agree, so a file an editor is still writing is left alone.
const CONFIG_POLL: Duration = Duration::from_millis(250);

/// What `sentinel run` was asked to do.
pub struct RunOptions {
    pub config: Config,
    /// Re-read on SIGHUP and when the file changes; `None` means the default path.
    pub config_path: Option<PathBuf>,
    /// Overrides `metrics.listen` of the first configuration and of every reloaded one.
    pub metrics_addr: Option<SocketAddr>,
    pub control_socket: PathBuf,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), Error> {
    let RunOptions {
        config,
        config_path,
        metrics_addr,
        control_socket,
    } = options;
    let config = config.with_metrics_addr(metrics_addr);
    // Installed first, so that a stop request at any point takes the clean path.
    let mut signals = Signals::install()?;
    kernel::check_privileges()?;
    // Parsed BTF is tens of MB and only needed for the offsets: drop it right after.
    let resolved = kernel::resolve_offsets(&Btf::from_sys_fs()?);
    kernel::release_freed_memory();
    let cgroup_root = find_cgroup2_mount()?;
    // Bind before loading anything, so a taken port fails fast and changes nothing.
    let listen = config.metrics.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::MetricsListen {
            addr: listen,
            source,
        })?;
    let control = ControlSocket::bind(&control_socket)?;
    kernel::raise_memlock_limit();

    if !resolved.missing.is_empty() {
        warn!(missing = ?resolved.missing, "this kernel's BTF lacks some fields; probes that need them stay off");
    }
    let mut probes = probes::load(&resolved)?;

    let mut tree = CgroupTree::new(cgroup_root.clone());
    tree.rescan();
    let attribution = Arc::new(Mutex::new(Attribution::new(
        tree,
        config.services.max_labels,
    )));
    let counters = take_map(&mut probes.ebpf, "COUNTERS")?.try_into()?;
    let lost = take_map(&mut probes.ebpf, "LOST")?.try_into()?;
    let kernel_counters = Arc::new(KernelCounters::new(counters, lost, attribution.clone()));
    let mut metrics = Metrics::new(kernel_counters.clone(), &probes.statuses);

    let cgroupfs = CgroupFs::new(cgroup_root.clone());
    let applied = Arc::new(Mutex::new(AppliedView::default()));
    let policy_metrics =
        PolicyMetrics::new(metrics.registry_mut(), cgroupfs.clone(), applied.clone());
    let backend = match config.services.cgroup_backend {
        CgroupBackend::Auto => Backend::Auto,
        CgroupBackend::Cgroupfs => Backend::Cgroupfs,
    };
    let enforcer = Enforcer::new(
        cgroupfs,
        config.policies.clone(),
        backend,
        applied.clone(),
        policy_metrics.clone(),
    );
    let (enforcer_tx, enforcer_rx) = mpsc::channel();
    let enforcer_thread = std::thread::Builder::new()
        .name("enforcer".into())
        .spawn(move || enforcer.run(enforcer_rx))?;

    let ssh_metrics = SshGuardMetrics::new(metrics.registry_mut());
    let restart_required = RestartRequired::register(metrics.registry_mut());
    let ssh_guard = start_ssh_guard(&config, ssh_metrics);
    let metrics = Arc::new(metrics);
    let handler = Arc::new(EventHandler::new(
        attribution.clone(),
        applied,
        enforcer_tx.clone(),
        ssh_guard.as_ref().map(|(tx, _)| tx.clone()),
    ));

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let events: RingBuf<MapData> = take_map(&mut probes.ebpf, "EVENTS")?.try_into()?;
    let alerts: RingBuf<MapData> = take_map(&mut probes.ebpf, "ALERTS")?.try_into()?;
    tasks.spawn(log_failure(
        "events reader",
        read_ring(events, handler.clone(), EVENTS_POLL, cancel.clone()),
    ));
    tasks.spawn(log_failure(
        "alerts reader",
        read_ring(alerts, handler, ALERTS_POLL, cancel.clone()),
    ));
    tasks.spawn(log_failure(
        "metrics server",
        http::serve(listener, metrics, cancel.clone()),
    ));
    tasks.spawn(housekeeping(kernel_counters, cancel.clone()));
    // Without a guard, requests get "the SSH guard is not running" from a closed channel.
    let guard_for_control = match &ssh_guard {
        Some((tx, _)) => tx.clone(),
        None => mpsc::channel().0,
    };
    tasks.spawn(log_failure(
        "control socket",
        control.serve(guard_for_control, cancel.clone()),
    ));
    forward_ebpf_logs(&mut probes.ebpf, &tasks, cancel.clone());
    let reloader = Reloader::new(
        config_path,
        metrics_addr,
        &config,
        enforcer_tx.clone(),
        policy_metrics,
        restart_required,
    );
    tasks.spawn(reloader.clone().watch_file(cancel.clone()));
    tasks.close();

    let attached = probes.statuses.iter().filter(|p| p.attached).count();
    info!(
        metrics = %format!("http://{listen}/metrics"),
        cgroup2 = %cgroup_root.display(),
        probes_attached = attached,
        probes_total = probes.statuses.len(),
        policies = config.policies.services.len(),
        ssh_guard = ssh_guard.is_some(),
        "sentinel is running"
    );

    signals.wait_for_shutdown(&attribution, &reloader).await;
    info!("shutting down");
    cancel.cancel();
    let _ = enforcer_tx.send(EnforcerInput::Stop);
    if let Some((guard_tx, guard_thread)) = ssh_guard {
        let _ = guard_tx.send(SshInput::Stop);
        join(guard_thread, "ssh guard");
    }
    join(enforcer_thread, "enforcer");
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}; detaching anyway");
    }
    // Dropping the object detaches every program.
    drop(probes);
    info!("stopped; all probes detached");
    Ok(())
}

/// Starts the SSH guard on its own thread. A guard that cannot start (no nftables, say) is
/// reported, and the rest of the daemon runs on without it.
fn start_ssh_guard(
    config: &Config,
    metrics: SshGuardMetrics,
) -> Option<(mpsc::Sender<SshInput>, std::thread::JoinHandle<()>)> {
    if !config.ssh_guard.enabled {
        info!("SSH guard disabled by configuration");
        return None;
    }
    let guard = match SshGuard::open(config.ssh_guard.settings(), metrics) {
        Ok(guard) => guard,
        Err(error) => {
            error!("SSH guard not started: {error}");
            return None;
        }
    };
    let (tx, rx) = mpsc::channel();
    match std::thread::Builder::new()
        .name("ssh-guard".into())
        .spawn(move || guard.run(rx))
    {
        Ok(thread) => Some((tx, thread)),
        Err(error) => {
            error!("SSH guard not started: {error}");
            None
        }
    }
}

fn join(thread: std::thread::JoinHandle<()>, name: &str) {
    if thread.join().is_err() {
        error!("the {name} thread panicked");
    }
}

/// Re-reads the configuration and hands a valid policy to the enforcer; an invalid or empty
/// file is reported in full and changes nothing. The other settings are read only at start:
/// a change to them is named in the log and in `sentinel_config_restart_required`.
#[derive(Clone)]
struct Reloader {
    path: PathBuf,
    metrics_addr: Option<SocketAddr>,
    /// The configuration the daemon started with; its start-only settings stay in force.
    started_with: Arc<Config>,
    enforcer: mpsc::Sender<EnforcerInput>,
    metrics: PolicyMetrics,
    restart_required: RestartRequired,
}

impl Reloader {
    fn new(
        path: Option<PathBuf>,
        metrics_addr: Option<SocketAddr>,
        started_with: &Config,
        enforcer: mpsc::Sender<EnforcerInput>,
        metrics: PolicyMetrics,
        restart_required: RestartRequired,
    ) -> Self {
        // Every start-only setting is exposed from the start, at 0.
        restart_required.set(&started_with.restart_only_changes(started_with));
        Self {
            path: path.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
            metrics_addr,
            started_with: Arc::new(started_with.clone()),
            enforcer,
            metrics,
            restart_required,
        }
    }

    fn reload(&self, why: &str) {
        let config = match Config::reload(&self.path) {
            Ok(config) => config.with_metrics_addr(self.metrics_addr),
            Err(problem) => {
                self.metrics.reload_errors.inc();
                error!(
                    why,
                    "configuration rejected; the running configuration stays in force:\n{problem}"
                );
                return;
            }
        };
        let changes = self.started_with.restart_only_changes(&config);
        self.restart_required.set(&changes);
        let restart_required: Vec<&str> = changes
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(setting, _)| *setting)
            .collect();
        let policies = config.policies.services.len();
        self.metrics.reloads.inc();
        let _ = self.enforcer.send(EnforcerInput::Reload(config.policies));
        if restart_required.is_empty() {
            info!(why, policies, "configuration reloaded");
        } else {
            warn!(
                why,
                policies,
                restart_required = restart_required.join(", "),
                "policies reloaded; the other changed settings apply only after a restart"
            );
        }
    }

    /// Reloads when the file's size, modification time or inode changes and then stays put
    /// for one poll.
    async fn watch_file(self, cancel: CancellationToken) {
        let stamp = |path: &PathBuf| {
            std::fs::metadata(path)
                .ok()
                .map(|meta| (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()))
        };
        let mut handled = stamp(&self.path);
        let mut previous = handled;
        let mut tick = tokio::time::interval(CONFIG_POLL);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {
                    let now = stamp(&self.path);
                    if now != handled && now == previous {
                        handled = now;
                        self.reload("the configuration file changed");
                    }
                    previous = now;
                }
            }
        }
    }
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

async fn log_failure<E: std::fmt::Display>(
    task: &'static str,
    work: impl Future<Output = Result<(), E>>,
) {
    if let Err(error) = work.await {
        tracing::error!("{task} failed: {error}");
    }
}

async fn housekeeping(counters: Arc<KernelCounters>, cancel: CancellationToken) {
    let mut tick = tokio::time::interval(HOUSEKEEPING);
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = tick.tick() => {
                let counters = counters.clone();
                let _ = tokio::task::spawn_blocking(move || counters.service_totals()).await;
            }
        }
    }
}

/// Routes the eBPF programs' aya-log records into tracing (through the `log` bridge).
fn forward_ebpf_logs(ebpf: &mut aya::Ebpf, tasks: &TaskTracker, cancel: CancellationToken) {
    let logger = match aya_log::EbpfLogger::init(ebpf) {
        Ok(logger) => logger,
        Err(error) => {
            warn!("eBPF log forwarding unavailable: {error}");
            return;
        }
    };
    let mut logger = match readable(logger) {
        Ok(logger) => logger,
        Err(error) => {
            warn!("eBPF log forwarding unavailable: {error}");
            return;
        }
    };
    tasks.spawn(async move {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                guard = logger.readable_mut() => match guard {
                    Ok(mut guard) => {
                        guard.get_inner_mut().flush();
                        guard.clear_ready();
                    }
                    Err(_) => return,
                },
            }
        }
    });
}

struct Signals {
    interrupt: Signal,
    terminate: Signal,
    hangup: Signal,
}

impl Signals {
    fn install() -> Result<Self, Error> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
            hangup: signal(SignalKind::hangup())?,
        })
    }

    /// Returns on SIGINT or SIGTERM. SIGHUP reloads the configuration and re-reads the
    /// cgroup hierarchy.
    async fn wait_for_shutdown(&mut self, attribution: &Mutex<Attribution>, reloader: &Reloader) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => {
                    attribution.lock().expect("attribution lock").tree_mut().rescan();
                    reloader.reload("SIGHUP");
                }
            }
        }
    }
}
