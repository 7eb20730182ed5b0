//! Port scans seen in the kernel: every segment to a closed port of Sentinel's network
//! namespace is a hit (`tcp_send_reset` without a socket, no log read); an address that hits
//! `ports` distinct closed ports within `window` is a scanner, handed to the SSH guard, which
//! bans it like an SSH attacker (same sets, allow list, ban lengths, state and audit log) with
//! the reason `port_scan`.
//!
//! The detector runs on its own thread: a scan is a burst of thousands of hits, which must not
//! crowd the SSH guard's queue; only scanners reach it.

mod detector;
mod metrics;
pub mod settings;

use std::{
    net::IpAddr,
    sync::mpsc::RecvTimeoutError,
    time::{Duration, Instant},
};

use tracing::{info, warn};

pub use self::{
    detector::{ScanDetector, ScanRules, Scanner},
    metrics::PortScanMetrics,
    settings::PortScanConfig,
};
use crate::{
    queue::{Inbox, Queue},
    ssh_guard::{GuardMode, Input as GuardInput},
};

/// The ban reason, audit reason and `sentinel bans` reason of port-scan bans.
pub const PORT_SCAN_REASON: &str = "port_scan";

/// A closed port hit, from the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClosedPort {
    pub addr: IpAddr,
    pub port: u16,
}

/// What reaches the detector's thread.
pub enum Input {
    Hit(ClosedPort),
    /// The configuration file was reloaded.
    Reload(PortScanConfig),
    Stop,
}

pub struct PortScan {
    mode: GuardMode,
    detector: ScanDetector,
    metrics: PortScanMetrics,
    guard: Queue<GuardInput>,
}

impl PortScan {
    pub fn new(
        config: &PortScanConfig,
        metrics: PortScanMetrics,
        guard: Queue<GuardInput>,
    ) -> Self {
        Self {
            mode: config.mode(),
            detector: ScanDetector::new(config.rules()),
            metrics,
            guard,
        }
    }

    /// Handles inputs until `Stop` (or every sender is gone).
    pub fn run(mut self, inputs: Inbox<Input>) {
        loop {
            match inputs.recv_timeout(Duration::from_secs(1)) {
                Ok(Input::Hit(hit)) => self.hit(Instant::now(), hit),
                Ok(Input::Reload(config)) => {
                    self.mode = config.mode();
                    self.detector.set_rules(config.rules());
                }
                Ok(Input::Stop) | Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => {}
            }
            self.metrics
                .set_tracked(self.detector.tracked(), self.detector.evicted);
        }
    }

    fn hit(&mut self, now: Instant, hit: ClosedPort) {
        self.metrics.hits.inc();
        let Some(scanner) = self.detector.hit(now, hit.addr, hit.port) else {
            return;
        };
        self.metrics.scanners(self.mode).inc();
        info!(address = %scanner.addr, ports = scanner.ports, mode = ?self.mode, "port scan detected");
        if self
            .guard
            .offer(GuardInput::Scanner {
                scanner,
                mode: self.mode,
            })
            .is_err()
        {
            warn!(address = %scanner.addr, "the SSH guard cannot take the port scanner now; it is not banned");
        }
    }
}
