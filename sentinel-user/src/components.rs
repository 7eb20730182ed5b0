//! The daemon's parts and whether each still runs. A part that stops while the daemon is not
//! shutting down (a panic, an error, a channel gone) stops the whole daemon with a non-zero exit,
//! so that the service manager restarts it: a guardian that silently stopped guarding is worse
//! than one that restarts. `sentinel_component_up{component}` shows each part's state.

use std::fmt::Display;

use prometheus_client::{
    metrics::{family::Family, gauge::Gauge},
    registry::Registry,
};
use tokio::sync::mpsc;

/// Names a component to stop at once (a panic where it starts), so that tests can prove the
/// daemon does not run on without it.
pub const FAULT_INJECTION_ENV: &str = "SENTINEL_FAULT_INJECT_STOP";

/// Components that can report at once; each reports once, so the channel never fills.
const MAX_COMPONENTS: usize = 32;

type Labels = Vec<(&'static str, &'static str)>;

/// A component that stopped, and why.
#[derive(Debug)]
pub struct Stopped {
    pub component: &'static str,
    pub reason: String,
}

#[derive(Clone)]
pub struct Components {
    up: Family<Labels, Gauge>,
    stopped: mpsc::Sender<Stopped>,
}

impl Components {
    pub fn new(registry: &mut Registry) -> (Self, mpsc::Receiver<Stopped>) {
        let (stopped, receiver) = mpsc::channel(MAX_COMPONENTS);
        let components = Self {
            up: Family::default(),
            stopped,
        };
        registry.register(
            "sentinel_component_up",
            "Whether a part of the daemon runs (1) or has stopped (0); the daemon exits when one \
             stops",
            components.up.clone(),
        );
        (components, receiver)
    }

    /// Marks `component` running. The token reports it stopped when dropped, also while a
    /// panic unwinds, so it must live exactly as long as the component's work.
    pub fn start(&self, component: &'static str) -> Running {
        self.up
            .get_or_create(&vec![("component", component)])
            .set(1);
        Running {
            component,
            components: self.clone(),
            reason: None,
        }
    }
}

/// A running component; see `Components::start`.
pub struct Running {
    component: &'static str,
    components: Components,
    reason: Option<String>,
}

impl Running {
    pub fn name(&self) -> &'static str {
        self.component
    }

    /// Records why the component is about to stop.
    pub fn failed(&mut self, reason: impl Display) {
        self.reason = Some(reason.to_string());
    }

    /// Where a component's work begins: stops it there when fault injection names it.
    pub fn begin(&self) {
        if std::env::var(FAULT_INJECTION_ENV).is_ok_and(|name| name == self.component) {
            panic!("fault injected into the {}", self.component);
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.components
            .up
            .get_or_create(&vec![("component", self.component)])
            .set(0);
        let reason = self.reason.take().unwrap_or_else(|| {
            if std::thread::panicking() {
                "it panicked".into()
            } else {
                "it ended".into()
            }
        });
        let _ = self.components.stopped.try_send(Stopped {
            component: self.component,
            reason,
        });
    }
}

/// Runs a component's async work, recording its error as the reason it stopped.
pub async fn supervised<E: Display>(
    mut running: Running,
    work: impl Future<Output = Result<(), E>>,
) {
    running.begin();
    if let Err(error) = work.await {
        tracing::error!("{} failed: {error}", running.name());
        running.failed(error);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_component_reports_how_it_stopped() {
        let mut registry = Registry::default();
        let (components, mut stopped) = Components::new(&mut registry);
        let mut failing = components.start("enforcer");
        failing.failed("the channel is gone");
        drop(failing);
        let panicking = components.start("ssh guard");
        let _ = std::thread::spawn(move || {
            let _running = panicking;
            panic!("boom");
        })
        .join();
        drop(components.start("metrics server"));

        let mut reports = Vec::new();
        while let Ok(report) = stopped.try_recv() {
            reports.push((report.component, report.reason));
        }
        assert_eq!(
            reports,
            [
                ("enforcer", "the channel is gone".to_owned()),
                ("ssh guard", "it panicked".to_owned()),
                ("metrics server", "it ended".to_owned()),
            ]
        );
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(
            text.contains("sentinel_component_up{component=\"enforcer\"} 0"),
            "{text}"
        );
    }
}
