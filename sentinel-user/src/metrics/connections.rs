//! How the daemon's two servers, `/metrics` and the control socket, turned connections away.
//! Both hold a fixed number of connections; these counts show a client (or an attack) hitting
//! those bounds.

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};

type Labels = Vec<(&'static str, &'static str)>;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Endpoint {
    Metrics,
    Control,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Rejection {
    /// A new connection refused at once: every slot was serving a request.
    Busy,
    /// A connection that had not sent its request, closed to make room for a new one.
    IdleEvicted,
}

#[derive(Debug, Clone, Copy)]
pub(crate) enum Stage {
    /// No complete request within the request timeout.
    Request,
    /// The answer was not taken within the response deadline.
    Response,
}

#[derive(Clone)]
pub struct ConnectionMetrics {
    rejected: Family<Labels, Counter>,
    timed_out: Family<Labels, Counter>,
}

impl ConnectionMetrics {
    pub fn new(registry: &mut Registry) -> Self {
        let metrics = Self {
            rejected: Family::default(),
            timed_out: Family::default(),
        };
        registry.register(
            "sentinel_connections_rejected",
            "Connections to /metrics or the control socket closed for lack of a free slot: \
             reason=busy, refused at once because every slot was serving a request; \
             reason=idle_evicted, closed before sending a request to make room for a new one",
            metrics.rejected.clone(),
        );
        registry.register(
            "sentinel_connections_timed_out",
            "Connections to /metrics or the control socket closed because the client sent no \
             complete request in time (stage=request) or did not take the answer in time \
             (stage=response)",
            metrics.timed_out.clone(),
        );
        // Every series exists from the start, so that a missing one is an error, never a 0.
        for endpoint in [Endpoint::Metrics, Endpoint::Control] {
            for reason in [Rejection::Busy, Rejection::IdleEvicted] {
                metrics.rejected_counter(endpoint, reason);
            }
            for stage in [Stage::Request, Stage::Response] {
                metrics.timed_out_counter(endpoint, stage);
            }
        }
        metrics
    }

    pub(crate) fn rejected(&self, endpoint: Endpoint, reason: Rejection) {
        self.rejected_counter(endpoint, reason).inc();
    }

    pub(crate) fn timed_out(&self, endpoint: Endpoint, stage: Stage) {
        self.timed_out_counter(endpoint, stage).inc();
    }

    fn rejected_counter(&self, endpoint: Endpoint, reason: Rejection) -> Counter {
        let reason = match reason {
            Rejection::Busy => "busy",
            Rejection::IdleEvicted => "idle_evicted",
        };
        self.rejected
            .get_or_create(&vec![("endpoint", endpoint.label()), ("reason", reason)])
            .clone()
    }

    fn timed_out_counter(&self, endpoint: Endpoint, stage: Stage) -> Counter {
        let stage = match stage {
            Stage::Request => "request",
            Stage::Response => "response",
        };
        self.timed_out
            .get_or_create(&vec![("endpoint", endpoint.label()), ("stage", stage)])
            .clone()
    }
}

impl Endpoint {
    fn label(self) -> &'static str {
        match self {
            Self::Metrics => "metrics",
            Self::Control => "control",
        }
    }
}
