//! Wiring: start-up checks, probes, tasks, and the one shutdown path.

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use aya::maps::{MapData, RingBuf};
use tokio::{
    net::TcpListener,
    signal::unix::{Signal, SignalKind, signal},
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    Error,
    cgroup::{Attribution, CgroupTree, find_cgroup2_mount},
    config::Config,
    events::{EventHandler, read_ring, readable},
    http,
    kernel::{self, Btf},
    metrics::{KernelCounters, Metrics},
    probes,
};

/// How long tasks get to finish after SIGINT/SIGTERM before the programs are detached anyway.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(1500);
/// How often batched (no-wakeup) events are drained.
const EVENTS_POLL: Duration = Duration::from_millis(100);
/// Alerts wake the daemon per record; the timer is only a safety net.
const ALERTS_POLL: Duration = Duration::from_secs(1);
/// How often removed cgroups' counters are folded even without scrapes.
const HOUSEKEEPING: Duration = Duration::from_secs(60);

pub async fn run(config: Config) -> Result<(), Error> {
    // Installed first, so that a stop request at any point takes the clean path.
    let mut signals = Signals::install()?;
    kernel::check_privileges()?;
    let btf = Btf::from_sys_fs()?;
    let cgroup_root = find_cgroup2_mount()?;
    // Bind before loading anything, so a taken port fails fast and changes nothing.
    let listen = config.metrics.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| Error::MetricsListen {
            addr: listen,
            source,
        })?;
    kernel::raise_memlock_limit();

    let resolved = kernel::resolve_offsets(&btf);
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
    let metrics = Arc::new(Metrics::new(kernel_counters.clone(), &probes.statuses));
    let handler = Arc::new(EventHandler::new(attribution.clone()));

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
    forward_ebpf_logs(&mut probes.ebpf, &tasks, cancel.clone());
    tasks.close();

    let attached = probes.statuses.iter().filter(|p| p.attached).count();
    info!(
        metrics = %format!("http://{listen}/metrics"),
        cgroup2 = %cgroup_root.display(),
        probes_attached = attached,
        probes_total = probes.statuses.len(),
        "sentinel is running"
    );

    signals.wait_for_shutdown(&attribution).await;
    info!("shutting down");
    cancel.cancel();
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

fn take_map(ebpf: &mut aya::Ebpf, name: &'static str) -> Result<aya::maps::Map, Error> {
    ebpf.take_map(name).ok_or(Error::MissingMap(name))
}

async fn log_failure(task: &'static str, work: impl Future<Output = std::io::Result<()>>) {
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

    /// Returns on SIGINT or SIGTERM. SIGHUP re-reads the cgroup hierarchy.
    async fn wait_for_shutdown(&mut self, attribution: &Mutex<Attribution>) {
        loop {
            tokio::select! {
                _ = self.interrupt.recv() => return,
                _ = self.terminate.recv() => return,
                _ = self.hangup.recv() => {
                    info!("SIGHUP: rescanning the cgroup hierarchy");
                    attribution.lock().expect("attribution lock").tree_mut().rescan();
                }
            }
        }
    }
}
