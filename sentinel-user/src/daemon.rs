//! Wiring: start-up checks, probes, tasks, and the one shutdown path.

use std::{
    convert::Infallible,
    net::SocketAddr,
    os::unix::fs::MetadataExt,
    path::PathBuf,
    sync::{Arc, Mutex, mpsc},
    time::{Duration, Instant, SystemTime},
};

use aya::maps::{MapData, RingBuf};
use sentinel_common::{EventRecords, ScanTarget};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
    sync::{mpsc as async_mpsc, watch},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{error, info, warn};

use crate::{
    Error,
    cgroup::{Attribution, CgroupTree, cgroupfs::CgroupFs, find_cgroup2_mount, stats::StatsReader},
    components::{Components, Stopped, supervised},
    config::{Config, DEFAULT_PATH, RestartRequired},
    containment::{
        ContainedService, Containment, ContainmentMetrics, Input as ContainmentInput, KernelMaps,
    },
    control::{ControlSocket, DaemonView, ReloadRequest, report::ReloadReport, stats},
    crowdsec::{Fleet, FleetMetrics},
    events::{self, EventHandler, read_ring, readable},
    files::{self, DirectoryWatch},
    http,
    kernel::{self, Btf},
    metrics::{ConnectionMetrics, KernelCounters, Metrics},
    policy::{
        enforcer::{AppliedView, Enforcer, Input as EnforcerInput},
        metrics::PolicyMetrics,
        resources::{self, ResourceCollector},
    },
    port_scan::{Input as PortScanInput, PORT_SCAN_REASON, PortScan, PortScanMetrics},
    probes::{self, SshFiles},
    queue::{self, Queue, QueueDrops},
    recent::{self, Recorder},
    ssh_guard::{Input as SshInput, SshGuard, SshGuardMetrics, audit::AuditLog},
    systemd::{self, SystemdBus},
};

/// Messages waiting for the enforcer (cgroups created, reloads) before new ones are dropped.
const ENFORCER_QUEUE: usize = 4096;
/// Violations, cgroups created and operator requests waiting for containment.
const CONTAINMENT_QUEUE: usize = 4096;
/// Authentications and operator requests waiting for the SSH guard before new ones are
/// dropped: a flood's worth, at about a hundred bytes each.
const SSH_GUARD_QUEUE: usize = 65_536;
/// Closed-port hits waiting for the port-scan detector: a few seconds of a fast scan.
const PORT_SCAN_QUEUE: usize = 65_536;

/// How long tasks get to finish after SIGINT/SIGTERM before the programs are detached anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// How often batched (no-wakeup) events are drained, when anything reads them.
const EVENTS_POLL: Duration = Duration::from_millis(100);
/// Alerts and SSH events wake the daemon per record, and without a reader of exec and TCP
/// records nothing is written to their ring: for these rings the timer is only a safety net,
/// kept slow so that an idle host does not wake the daemon for it.
const SAFETY_POLL: Duration = Duration::from_secs(10);
/// How often removed cgroups' counters are folded even without scrapes.
const HOUSEKEEPING: Duration = Duration::from_secs(60);
/// `sentinel reload` requests waiting for the main loop; more are told to try again.
const RELOAD_REQUESTS: usize = 4;
/// How often the configuration file is looked at while a change settles; a change is read
/// once two looks in a row agree, so a file an editor is still writing is left alone.
const CONFIG_POLL: Duration = Duration::from_secs(1);
/// How often it is looked at without a change in its directory: a safety net.
const CONFIG_SAFETY_POLL: Duration = Duration::from_secs(10);

/// What `sentinel run` was asked to do.
pub struct RunOptions {
    pub config: Config,
    /// Re-read on SIGHUP and when the file changes; `None` means the default path.
    pub config_path: Option<PathBuf>,
    /// Overrides `metrics.listen` of the first configuration and of every reloaded one.
    pub metrics_addr: Option<SocketAddr>,
    pub control_socket: PathBuf,
    /// Where state that must survive a restart is kept (the SSH guard's bans).
    pub state_dir: PathBuf,
}

/// Runs the daemon until SIGINT or SIGTERM.
pub async fn run(options: RunOptions) -> Result<(), Error> {
    let RunOptions {
        config,
        config_path,
        metrics_addr,
        control_socket,
        state_dir,
    } = options;
    let started = Instant::now();
    let config = config.with_metrics_addr(metrics_addr);
    // Installed first, so that a stop request at any point takes the clean path.
    let mut signals = Signals::install()?;
    kernel::check_privileges()?;
    kernel::raise_open_files_limit();
    let loader = probes::Loader::without_kernel_btf();
    // The BTF is only needed for the offsets: dropped right after.
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

    // What only a port scan probe would need is no news without `port_scan`.
    let missing: Vec<&String> = resolved
        .missing
        .iter()
        .filter(|what| config.port_scan.is_some() || *what != kernel::TCP_SEND_RESET_REASON)
        .collect();
    if !missing.is_empty() {
        warn!(
            ?missing,
            "this kernel's BTF lacks some fields; probes that need them stay off"
        );
    }
    let records = events::records_wanted();
    let scan_target = match &config.port_scan {
        Some(_) => Some(scan_target(config.ssh_guard.netns.as_deref())?),
        None => None,
    };
    let mut probes = probes::load(loader, resolved, records, scan_target)?;

    let mut tree = CgroupTree::new(cgroup_root.clone());
    tree.rescan();
    let attribution = Arc::new(Mutex::new(Attribution::new(
        tree,
        config.services.max_labels,
        config.services.forget_removed_after,
    )));
    let counters = take_map(&mut probes.ebpf, "COUNTERS")?.try_into()?;
    let lost = take_map(&mut probes.ebpf, "LOST")?.try_into()?;
    let kernel_counters = Arc::new(KernelCounters::new(counters, lost, attribution.clone())?);
    let mut metrics = Metrics::default();
    metrics
        .registry_mut()
        .register_collector(Box::new(kernel_counters.clone()));
    probes.register_metrics(metrics.registry_mut());
    let (components, mut stopped) = Components::new(metrics.registry_mut());
    let queue_drops = QueueDrops::new(metrics.registry_mut());
    let ssh_files = SshFiles::new(
        take_map(&mut probes.ebpf, "SSHD_EXECUTABLES")?.try_into()?,
        config.ssh_guard.sshd_paths.clone(),
    );

    let cgroupfs = CgroupFs::new(cgroup_root.clone());
    let applied = Arc::new(Mutex::new(AppliedView::default()));
    let (recent, recent_keeper, recent_events) = recent::channel(&queue_drops);
    let policy_metrics =
        PolicyMetrics::new(metrics.registry_mut(), attribution.clone(), recent.clone());
    let (resources_tx, resources_rx) = resources::snapshot_channel();
    metrics
        .registry_mut()
        .register_collector(Box::new(ResourceCollector::new(
            applied.clone(),
            resources_rx.clone(),
            config.metrics.resource_detail,
        )));
    let stats_reader = StatsReader::new(
        cgroupfs.clone(),
        config.metrics.resource_detail,
        probes.cgroup_iterator(&cgroup_root),
    );
    let enforcer = Enforcer::new(
        cgroupfs.clone(),
        config.policies.clone(),
        config.services.cgroup_backend,
        applied.clone(),
        policy_metrics.clone(),
        &state_dir,
        tokio::runtime::Handle::current(),
    )?;
    let policy_states = enforcer.subscribe();
    let (enforcer_tx, enforcer_rx) = queue::bounded("enforcer", ENFORCER_QUEUE, &queue_drops);
    let notices = enforcer_tx.clone();
    let enforcer_thread = spawn_component(&components, "enforcer", move || {
        enforcer.run(enforcer_rx, notices)
    })?;

    let containment = start_containment(
        &config,
        Containment::new(
            cgroupfs.clone(),
            KernelMaps {
                cgroups: take_map(&mut probes.ebpf, "CONTAINED_CGROUPS")?.try_into()?,
                allowed: take_map(&mut probes.ebpf, "EXEC_ALLOWED")?.try_into()?,
            },
            config.policies.clone(),
            config.ssh_guard.netns.clone(),
            systemd::booted().then(|| SystemdBus::new(tokio::runtime::Handle::current())),
            containment_audit_log(&config)?,
            ContainmentMetrics::new(metrics.registry_mut(), attribution.clone(), recent.clone()),
        )?,
        &components,
        &queue_drops,
    )?;

    let ssh_metrics = SshGuardMetrics::new(metrics.registry_mut());
    if config.port_scan.is_some() {
        // Exported from the start: absent is not 0.
        ssh_metrics.bans(PORT_SCAN_REASON);
    }
    let restart_required = RestartRequired::register(metrics.registry_mut());
    // Credentials are read before anything starts: a file others can read stops the daemon.
    let fleet = match &config.crowdsec {
        Some(crowdsec) => Some(Fleet::prepare(
            crowdsec,
            FleetMetrics::new(metrics.registry_mut()),
        )?),
        None => None,
    };
    let ssh_guard = start_ssh_guard(
        &config,
        &state_dir,
        ssh_metrics,
        recent.clone(),
        fleet.as_ref(),
        &components,
        &queue_drops,
    )?;
    let port_scan = start_port_scan(
        &config,
        PortScanMetrics::new(metrics.registry_mut()),
        ssh_guard.as_ref().map(|(tx, _)| tx.clone()),
        &components,
        &queue_drops,
    )?;
    let connections = ConnectionMetrics::new(metrics.registry_mut());
    let metrics = Arc::new(metrics);
    let handler = Arc::new(EventHandler::new(
        attribution.clone(),
        applied.clone(),
        enforcer_tx.clone(),
        ssh_guard.as_ref().map(|(tx, _)| tx.clone()),
        containment.inputs.clone(),
        port_scan.as_ref().map(|(tx, _)| tx.clone()),
        recent.clone(),
    ));

    let cancel = CancellationToken::new();
    let tasks = TaskTracker::new();
    let events: RingBuf<MapData> = take_map(&mut probes.ebpf, "EVENTS")?.try_into()?;
    let alerts: RingBuf<MapData> = take_map(&mut probes.ebpf, "ALERTS")?.try_into()?;
    let ssh_events: RingBuf<MapData> = take_map(&mut probes.ebpf, "SSH_EVENTS")?.try_into()?;
    if port_scan.is_some() {
        let scan_events: RingBuf<MapData> =
            take_map(&mut probes.ebpf, "SCAN_EVENTS")?.try_into()?;
        tasks.spawn(supervised(
            components.start("scan events reader"),
            read_ring(scan_events, handler.clone(), EVENTS_POLL, cancel.clone()),
        ));
    }
    let events_poll = if records == EventRecords::default() {
        SAFETY_POLL
    } else {
        EVENTS_POLL
    };
    tasks.spawn(supervised(
        components.start("events reader"),
        read_ring(events, handler.clone(), events_poll, cancel.clone()),
    ));
    tasks.spawn(supervised(
        components.start("alerts reader"),
        read_ring(alerts, handler.clone(), SAFETY_POLL, cancel.clone()),
    ));
    tasks.spawn(supervised(
        components.start("ssh events reader"),
        read_ring(ssh_events, handler, SAFETY_POLL, cancel.clone()),
    ));
    tasks.spawn(housekeeping(kernel_counters.clone(), cancel.clone()));
    tasks.spawn(supervised(components.start("recent events"), {
        let cancel = cancel.clone();
        async move {
            recent_keeper.run(cancel).await;
            Ok::<(), Infallible>(())
        }
    }));
    let refresh_resources = resources::refresh(
        stats_reader,
        applied.clone(),
        config.metrics.resource_refresh,
        resources_tx,
        cancel.clone(),
    );
    tasks.spawn(supervised(
        components.start("resource refresh"),
        async move {
            refresh_resources.await;
            Ok::<(), Infallible>(())
        },
    ));
    // Without a guard, requests get "the SSH guard is not running" from a closed queue.
    let guard_for_control = match &ssh_guard {
        Some((tx, _)) => tx.clone(),
        None => queue::bounded("ssh_guard", 1, &queue_drops).0,
    };
    let (reload_requests, mut reloads_asked) = async_mpsc::channel(RELOAD_REQUESTS);
    let reloader = Reloader::new(
        config_path,
        metrics_addr,
        &config,
        ReloadTargets {
            enforcer: enforcer_tx.clone(),
            ssh_guard: ssh_guard.as_ref().map(|(tx, _)| tx.clone()),
            containment: containment.inputs.clone(),
            port_scan: port_scan.as_ref().map(|(tx, _)| tx.clone()),
        },
        policy_metrics,
        restart_required,
    );
    let view = DaemonView {
        guard: guard_for_control,
        ssh_guard_enabled: ssh_guard.is_some(),
        started,
        probes: probes.subscribe(),
        policies: policy_states,
        last_reload: reloader.subscribe(),
        reload: reload_requests,
        contained: containment.held.clone(),
        containment: containment.inputs.clone(),
        stats: Arc::new(move |snapshot| stats::collect(&kernel_counters, &applied, snapshot)),
        resources: resources_rx,
        events: recent_events,
    };
    tasks.spawn(supervised(
        components.start("control socket"),
        control.serve(view, connections.clone(), cancel.clone()),
    ));
    if let Some(fleet) = fleet {
        let guard = ssh_guard.as_ref().map(|(tx, _)| tx.clone());
        fleet.start(guard, &components, &tasks, &cancel);
    }
    forward_ebpf_logs(&mut probes.ebpf, &tasks, cancel.clone());
    let watch_config = reloader.clone().watch_file(cancel.clone());
    tasks.spawn(supervised(components.start("config watcher"), async move {
        watch_config.await;
        Ok::<(), Infallible>(())
    }));

    let (attached, probes_total) = {
        let statuses = probes.subscribe();
        let statuses = statuses.borrow();
        (
            statuses.iter().filter(|p| p.attached).count(),
            statuses.len(),
        )
    };
    let (keeper_tx, keeper_rx) = mpsc::channel();
    let changes = keeper_tx.clone();
    let keeper_thread = spawn_component(&components, "probe keeper", move || {
        keep_probes(probes, ssh_files, keeper_rx, changes)
    })?;
    // Served last, so that the first scrape already sees every part running.
    let serve_metrics = http::serve(listener, metrics, connections, cancel.clone());
    tasks.spawn(supervised(components.start("metrics server"), async move {
        serve_metrics.await;
        Ok::<(), Infallible>(())
    }));
    tasks.close();
    info!(
        metrics = %format!("http://{listen}/metrics"),
        cgroup2 = %cgroup_root.display(),
        probes_attached = attached,
        probes_total,
        policies = config.policies.services.len(),
        exec_tcp_records = records.exec != 0,
        ssh_guard = ssh_guard.is_some(),
        "sentinel is running"
    );
    crate::service::notify_ready();

    let failure = signals
        .wait_for_shutdown(&attribution, &reloader, &mut stopped, &mut reloads_asked)
        .await;
    match &failure {
        None => info!("shutting down"),
        Some(Stopped { component, reason }) => error!(
            component,
            reason, "a part of Sentinel stopped; exiting so that the service manager restarts it"
        ),
    }
    cancel.cancel();
    let _ = enforcer_tx.send(EnforcerInput::Stop);
    if let Some((scan_tx, scan_thread)) = port_scan {
        let _ = scan_tx.send(PortScanInput::Stop);
        join(scan_thread, "port scan");
    }
    if let Some((guard_tx, guard_thread)) = ssh_guard {
        let _ = guard_tx.send(SshInput::Stop);
        join(guard_thread, "ssh guard");
    }
    join(enforcer_thread, "enforcer");
    let _ = containment.inputs.send(ContainmentInput::Stop);
    join(containment.thread, "containment");
    let _ = keeper_tx.send(Keeper::Stop);
    let probes = keeper_thread.join();
    if tokio::time::timeout(SHUTDOWN_GRACE, tasks.wait())
        .await
        .is_err()
    {
        warn!("some tasks did not stop within {SHUTDOWN_GRACE:?}; detaching anyway");
    }
    // Dropping the object detaches every program (a panicked keeper dropped it while unwinding).
    drop(probes);
    info!("stopped; all probes detached");
    match failure {
        None => Ok(()),
        Some(Stopped { component, reason }) => Err(Error::ComponentStopped { component, reason }),
    }
}

/// Runs `work` on a thread named after `component`; its end, however it comes, is reported.
fn spawn_component<T: Send + 'static>(
    components: &Components,
    component: &'static str,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    let running = components.start(component);
    std::thread::Builder::new()
        .name(component.replace(' ', "-"))
        .spawn(move || {
            running.begin();
            let result = work();
            drop(running);
            result
        })
}

/// Containment's inputs, what it holds now, and its thread.
struct RunningContainment {
    inputs: Queue<ContainmentInput>,
    held: tokio::sync::watch::Receiver<Vec<ContainedService>>,
    thread: std::thread::JoinHandle<()>,
}

/// Starts containment on its own thread, and the thread that tells it when a directory
/// holding an allowed executable changes.
fn start_containment(
    config: &Config,
    containment: Containment,
    components: &Components,
    queue_drops: &QueueDrops,
) -> Result<RunningContainment, Error> {
    let (inputs, rx) = queue::bounded("containment", CONTAINMENT_QUEUE, queue_drops);
    let contained = config
        .policies
        .services
        .iter()
        .filter(|policy| policy.containment.is_some())
        .count();
    info!(policies = contained, "exec containment ready");
    // Blocks in read for the daemon's whole life; the process exit ends it.
    spawn_component(
        components,
        "allowed executables watch",
        containment.watch_files(inputs.clone()),
    )?;
    let held = containment.subscribe();
    let thread = spawn_component(components, "containment", move || containment.run(rx))?;
    Ok(RunningContainment {
        inputs,
        held,
        thread,
    })
}

/// The audit log containment appends to (`ssh_guard.audit_log`, shared with the SSH guard,
/// one whole line per write). A containment policy with a log that cannot be written stops the
/// daemon from starting: its actions must never go unaudited.
fn containment_audit_log(config: &Config) -> Result<Option<AuditLog>, Error> {
    let path = &config.ssh_guard.audit_log;
    let wanted = config
        .policies
        .services
        .iter()
        .any(|policy| policy.containment.is_some());
    match AuditLog::open(path) {
        Ok(log) => Ok(Some(log)),
        Err(error) if wanted => Err(error),
        Err(error) => {
            warn!("containment will not audit until restarted with a writable log: {error}");
            Ok(None)
        }
    }
}

/// The SSH guard's inputs and its thread.
type RunningGuard = (Queue<SshInput>, std::thread::JoinHandle<()>);

/// Starts the SSH guard on its own thread, and the thread that tells it of bans removed behind
/// its back. A guard the configuration asks for but that cannot start (no nftables, an audit log
/// that cannot be written) stops the daemon from starting: it must not run on unguarded.
fn start_ssh_guard(
    config: &Config,
    state_dir: &std::path::Path,
    metrics: SshGuardMetrics,
    recent: Recorder,
    fleet: Option<&Fleet>,
    components: &Components,
    queue_drops: &QueueDrops,
) -> Result<Option<RunningGuard>, Error> {
    if !config.ssh_guard.enabled {
        info!("SSH guard disabled by configuration");
        return Ok(None);
    }
    let mut guard = SshGuard::open(config.ssh_guard.settings(state_dir), metrics, recent)
        .map_err(|error| Error::SshGuardStart(Box::new(error)))?;
    if let Some(fleet) = fleet {
        guard.join_fleet(fleet.metrics.clone(), fleet.handoff.clone());
    }
    let (tx, rx) = queue::bounded("ssh_guard", SSH_GUARD_QUEUE, queue_drops);
    if let Some(watch) = guard.take_table_watch() {
        let changed = tx.clone();
        // Blocks in recv for the daemon's whole life; the process exit ends it.
        spawn_component(components, "table watch", move || {
            loop {
                watch.wait()?;
                // Waits for room: a missed change would leave removed bans unrestored.
                if changed.send(SshInput::TableChanged).is_err() {
                    return Ok::<(), Error>(());
                }
            }
        })?;
    }
    let thread = spawn_component(components, "ssh guard", move || guard.run(rx))?;
    Ok(Some((tx, thread)))
}

/// The port-scan detector's inputs and its thread.
type RunningPortScan = (Queue<PortScanInput>, std::thread::JoinHandle<()>);

/// Starts the port-scan detector on its own thread when `port_scan` is configured; its
/// scanners go to the SSH guard (which the configuration requires with it).
fn start_port_scan(
    config: &Config,
    metrics: PortScanMetrics,
    guard: Option<Queue<SshInput>>,
    components: &Components,
    queue_drops: &QueueDrops,
) -> Result<Option<RunningPortScan>, Error> {
    let (Some(settings), Some(guard)) = (&config.port_scan, guard) else {
        return Ok(None);
    };
    let detector = PortScan::new(settings, metrics, guard);
    let (tx, rx) = queue::bounded("port_scan", PORT_SCAN_QUEUE, queue_drops);
    let thread = spawn_component(components, "port scan", move || detector.run(rx))?;
    info!(
        mode = ?settings.mode(),
        ports = settings.ports,
        window_seconds = settings.window.as_secs(),
        "port-scan detection ready"
    );
    Ok(Some((tx, thread)))
}

/// The network namespace whose closed ports count: the one the bans go into
/// (`ssh_guard.netns`, or the daemon's own), by its inode number.
fn scan_target(netns: Option<&std::path::Path>) -> Result<ScanTarget, Error> {
    let path = netns.unwrap_or(std::path::Path::new("/proc/self/ns/net"));
    let inode = std::fs::metadata(path)
        .map_err(|source| Error::Netns {
            path: path.to_path_buf(),
            source,
        })?
        .ino();
    Ok(ScanTarget {
        netns_inode: u32::try_from(inode).unwrap_or(0),
        _pad: 0,
    })
}

/// How often the files the SSH probes follow (libpam, the sshd executables) are looked at
/// without a change in their directories: a safety net.
const FOLLOW_FILES: Duration = Duration::from_secs(10);

/// What wakes the probe keeper.
enum Keeper {
    /// A directory of a followed file changed.
    FilesChanged,
    Stop,
}

/// Owns the loaded programs: follows libpam and the sshd executables through package upgrades
/// (a change in their directories wakes it) until told to stop, then hands the programs back
/// for detaching.
fn keep_probes(
    mut probes: probes::Probes,
    mut ssh_files: SshFiles,
    inputs: mpsc::Receiver<Keeper>,
    changes: mpsc::Sender<Keeper>,
) -> probes::Probes {
    let followed = |probes: &probes::Probes, ssh_files: &SshFiles| {
        files::directories(&followed_paths(probes, ssh_files))
    };
    let mut watch = DirectoryWatch::new()
        .inspect_err(|errno| {
            warn!("cannot watch libpam's and sshd's directories ({errno}); they are looked at every 10 s")
        })
        .ok();
    if let Some(watch) = &mut watch {
        watch.watch(&followed(&probes, &ssh_files));
        watch.notify_from_thread("probe-files", move || {
            changes.send(Keeper::FilesChanged).is_ok()
        });
    }
    loop {
        match inputs.recv_timeout(FOLLOW_FILES) {
            Ok(Keeper::FilesChanged) | Err(mpsc::RecvTimeoutError::Timeout) => {
                probes.follow_libpam();
                ssh_files.refresh();
                if let Some(watch) = &mut watch {
                    watch.watch(&followed(&probes, &ssh_files));
                }
            }
            Ok(Keeper::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => return probes,
        }
    }
}

/// libpam's path and the sshd executables' paths.
fn followed_paths(probes: &probes::Probes, ssh_files: &SshFiles) -> Vec<PathBuf> {
    probes
        .libpam_path()
        .into_iter()
        .chain(ssh_files.paths())
        .cloned()
        .collect()
}

fn join(thread: std::thread::JoinHandle<()>, name: &str) {
    if thread.join().is_err() {
        error!("the {name} thread panicked");
    }
}

/// Keeps memory the daemon freed from staying with it. glibc gives each thread that allocates
/// an arena of its own (up to eight per core), and raises its threshold for `mmap` to the size
/// of the largest block freed: after one scrape of thousands of services, every later body of
/// megabytes would come from an arena and stay there. Two arenas and a fixed threshold keep
/// large blocks (response bodies, a stats pass) mapped only while they are used. Call before
/// any thread starts.
pub fn bound_allocator() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; no allocation is in flight on another
    // thread, as none has started.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
    }
}

/// Re-reads the configuration and hands a valid one to the enforcer (policies) and the SSH
/// guard (its thresholds, ban times and allow list); an invalid or empty file is reported in
/// full and changes nothing. The other settings are read only at start: a change to them is
/// named in the log and in `sentinel_config_restart_required`.
#[derive(Clone)]
struct Reloader {
    path: PathBuf,
    metrics_addr: Option<SocketAddr>,
    /// The configuration the daemon started with; its start-only settings stay in force.
    started_with: Arc<Config>,
    targets: ReloadTargets,
    metrics: PolicyMetrics,
    restart_required: RestartRequired,
    last: Arc<watch::Sender<Option<ReloadReport>>>,
}

/// The parts a reloaded configuration goes to.
#[derive(Clone)]
struct ReloadTargets {
    enforcer: Queue<EnforcerInput>,
    /// `None` when the guard is disabled.
    ssh_guard: Option<Queue<SshInput>>,
    containment: Queue<ContainmentInput>,
    /// `None` when `port_scan` was not configured at start.
    port_scan: Option<Queue<PortScanInput>>,
}

impl Reloader {
    fn new(
        path: Option<PathBuf>,
        metrics_addr: Option<SocketAddr>,
        started_with: &Config,
        targets: ReloadTargets,
        metrics: PolicyMetrics,
        restart_required: RestartRequired,
    ) -> Self {
        // Every start-only setting is exposed from the start, at 0.
        restart_required.set(&started_with.restart_only_changes(started_with));
        Self {
            path: path.unwrap_or_else(|| PathBuf::from(DEFAULT_PATH)),
            metrics_addr,
            started_with: Arc::new(started_with.clone()),
            targets,
            metrics,
            restart_required,
            last: Arc::new(watch::Sender::new(None)),
        }
    }

    /// The outcome of the last reload, `None` before the first.
    fn subscribe(&self) -> watch::Receiver<Option<ReloadReport>> {
        self.last.subscribe()
    }

    /// Reloads, and publishes and returns the outcome.
    fn reload(&self, why: &str) -> ReloadReport {
        let mut report = ReloadReport {
            at_unix_seconds: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |since| since.as_secs()),
            trigger: why.to_owned(),
            ok: false,
            policies: None,
            restart_required: Vec::new(),
            problems: Vec::new(),
            error: None,
        };
        match self.apply(why) {
            Ok((policies, restart_required)) => {
                report.ok = true;
                report.policies = Some(policies);
                report.restart_required = restart_required;
            }
            Err(Error::ConfigInvalid(problems)) => report.problems = problems.0,
            Err(other) => report.error = Some(other.to_string()),
        }
        let (kind, detail) = if report.ok {
            let policies = report.policies.unwrap_or_default();
            ("reload", format!("policies in force: {policies}"))
        } else {
            let problem = report.problems.first().map(ToString::to_string);
            (
                "reload_refused",
                problem.or(report.error.clone()).unwrap_or_default(),
            )
        };
        self.metrics.recent.record(kind, why, detail);
        self.last.send_replace(Some(report.clone()));
        report
    }

    /// Hands a valid file's policies to the enforcer; returns how many, and the changed
    /// settings that wait for a restart.
    fn apply(&self, why: &str) -> Result<(usize, Vec<String>), Error> {
        let config = match Config::reload(&self.path) {
            Ok(config) => config.with_metrics_addr(self.metrics_addr),
            Err(problem) => {
                self.metrics.reload_errors.inc();
                error!(
                    why,
                    "configuration rejected; the running configuration stays in force:\n{problem}"
                );
                return Err(problem);
            }
        };
        let changes = self.started_with.restart_only_changes(&config);
        self.restart_required.set(&changes);
        let restart_required: Vec<String> = changes
            .iter()
            .filter(|(_, changed)| *changed)
            .map(|(setting, _)| setting.to_string())
            .collect();
        let policies = config.policies.services.len();
        let containment = ContainmentInput::Reload(config.policies.clone());
        if let Err(refused) = self
            .targets
            .enforcer
            .offer(EnforcerInput::Reload(config.policies))
        {
            self.metrics.reload_errors.inc();
            error!(
                why,
                ?refused,
                "the enforcer cannot take the new policies now; the running ones stay in force"
            );
            return Err(Error::ReloadRefused(format!(
                "the enforcer cannot take the new policies now ({refused:?}); the running ones \
                 stay in force"
            )));
        }
        if let Some(guard) = &self.targets.ssh_guard
            && let Err(refused) = guard.offer(SshInput::Reload(config.ssh_guard.live()))
        {
            self.metrics.reload_errors.inc();
            error!(
                why,
                ?refused,
                "policies reloaded, but the SSH guard cannot take its new settings now; its \
                 running ones stay in force"
            );
            return Err(Error::ReloadRefused(format!(
                "policies reloaded, but the SSH guard cannot take its new settings now \
                 ({refused:?}); its running ones stay in force"
            )));
        }
        if let (Some(detector), Some(settings)) = (&self.targets.port_scan, config.port_scan)
            && let Err(refused) = detector.offer(PortScanInput::Reload(settings))
        {
            self.metrics.reload_errors.inc();
            error!(
                why,
                ?refused,
                "policies reloaded, but the port-scan detector cannot take its new settings now; \
                 its running ones stay in force"
            );
            return Err(Error::ReloadRefused(format!(
                "policies reloaded, but the port-scan detector cannot take its new settings now \
                 ({refused:?}); its running ones stay in force"
            )));
        }
        if let Err(refused) = self.targets.containment.offer(containment) {
            self.metrics.reload_errors.inc();
            error!(
                why,
                ?refused,
                "policies reloaded, but containment cannot take them now; its running ones stay \
                 in force"
            );
            return Err(Error::ReloadRefused(format!(
                "policies reloaded, but containment cannot take them now ({refused:?}); its \
                 running ones stay in force"
            )));
        }
        self.metrics.reloads.inc();
        if restart_required.is_empty() {
            info!(why, policies, "configuration reloaded");
        } else {
            warn!(
                why,
                policies,
                restart_required = restart_required.join(", "),
                "configuration reloaded, except the changed settings that apply only after a \
                 restart"
            );
        }
        Ok((policies, restart_required))
    }

    /// Reloads when the file's size, modification time or inode changes and then stays put
    /// for one poll. A change in the file's directory (or its symlink target's) wakes the
    /// watcher; without one, it looks every [`CONFIG_SAFETY_POLL`].
    async fn watch_file(self, cancel: CancellationToken) {
        let stamp = |path: &PathBuf| {
            std::fs::metadata(path)
                .ok()
                .map(|meta| (meta.len(), meta.mtime(), meta.mtime_nsec(), meta.ino()))
        };
        let changed = Arc::new(tokio::sync::Notify::new());
        let directories = || files::directories(std::slice::from_ref(&self.path));
        let mut watch = DirectoryWatch::new()
            .inspect_err(|errno| {
                warn!(
                    "cannot watch the configuration file's directory ({errno}); it is looked \
                     at every {} s",
                    CONFIG_SAFETY_POLL.as_secs()
                )
            })
            .ok();
        if let Some(watch) = &mut watch {
            watch.watch(&directories());
            let wake = Arc::clone(&changed);
            watch.notify_from_thread("config-files", move || {
                wake.notify_one();
                true
            });
        }
        let mut handled = stamp(&self.path);
        let mut previous = handled;
        loop {
            // A change is read once it stays put for a poll.
            let wait = if previous == handled {
                CONFIG_SAFETY_POLL
            } else {
                CONFIG_POLL
            };
            tokio::select! {
                () = cancel.cancelled() => return,
                () = changed.notified() => {}
                () = tokio::time::sleep(wait) => {}
            }
            let now = stamp(&self.path);
            if now != handled && now == previous {
                handled = now;
                self.reload("the configuration file changed");
            }
            previous = now;
            if let Some(watch) = &mut watch {
                watch.watch(&directories());
            }
        }
    }
}

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
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

    /// Returns on SIGINT or SIGTERM, or with the component that stopped. SIGHUP, or
    /// `sentinel reload`, reloads the configuration and re-reads the cgroup hierarchy.
    async fn wait_for_shutdown(
        &mut self,
        attribution: &Mutex<Attribution>,
        reloader: &Reloader,
        stopped: &mut tokio::sync::mpsc::Receiver<Stopped>,
        reloads_asked: &mut async_mpsc::Receiver<ReloadRequest>,
    ) -> Option<Stopped> {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return None,
                _ = self.terminate.recv() => return None,
                report = stopped.recv() => return report,
                _ = self.hangup.recv() => {
                    attribution.lock().expect("attribution lock").tree_mut().rescan();
                    reloader.reload("SIGHUP");
                }
                Some(reply) = reloads_asked.recv() => {
                    attribution.lock().expect("attribution lock").tree_mut().rescan();
                    let _ = reply.send(reloader.reload("sentinel reload"));
                }
            }
        }
    }
}
