//! The HTTP endpoint: `GET /metrics`.
//!
//! Every connection holds a file descriptor, and the daemon needs its descriptors for cgroup
//! files, pidfds and nftables, so the server bounds what clients can hold: a fixed number of
//! connections (a silent one is closed to make room for a new one), a deadline for the request
//! and one for the response, one request per connection, and few scrapes encoding at once.

use std::{io::Write, sync::Arc, time::Duration};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{
        HeaderMap, StatusCode,
        header::{ACCEPT, CONTENT_TYPE},
    },
    response::{IntoResponse, Response},
    routing::get,
};
use hyper::{server::conn::http1, service::Service as _};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::Semaphore,
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    metrics::{ConnectionMetrics, Endpoint, Format, Metrics, Rejection, Stage},
    slots::{Slot, Slots},
};

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Far more than scrapers need, far below a service's usual 1024 descriptors.
const MAX_CONNECTIONS: usize = 64;
/// From accepting a connection to having its request head; a scraper sends it at once.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// From the request head to the last byte of the answer taken by the client; above
/// Prometheus's default scrape timeout (10 s).
const RESPONSE_DEADLINE: Duration = Duration::from_secs(15);
/// Scrapes encoding at once (each reads kernel maps and cgroup files on a blocking thread);
/// two lets a pair of redundant Prometheus servers scrape together.
const MAX_CONCURRENT_SCRAPES: usize = 2;
/// A failed accept (e.g. out of file descriptors) would fail again at once; pause before retrying.
const ACCEPT_RETRY_DELAY: Duration = Duration::from_millis(100);
/// Sent, without waiting, to a connection refused because every slot is serving a request.
const BUSY: &[u8] =
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n";

#[derive(Clone)]
struct Scrapes {
    metrics: Arc<Metrics>,
    encoders: Arc<Semaphore>,
}

/// Serves `/metrics` until `cancel`; open connections are closed then.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    connections: ConnectionMetrics,
    cancel: CancellationToken,
) {
    let router = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Scrapes {
            metrics,
            encoders: Arc::new(Semaphore::new(MAX_CONCURRENT_SCRAPES)),
        });
    let mut slots = Slots::new(MAX_CONNECTIONS);
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(error) => {
                warn!("accepting a metrics connection failed: {error}");
                tokio::time::sleep(ACCEPT_RETRY_DELAY).await;
                continue;
            }
        };
        let admitted = tokio::select! {
            () = cancel.cancelled() => return,
            admitted = slots.admit() => admitted,
        };
        let Some(slot) = admitted else {
            connections.rejected(Endpoint::Metrics, Rejection::Busy);
            refuse(stream);
            continue;
        };
        let connection = serve_connection(stream, slot, router.clone(), connections.clone());
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = cancel.cancelled() => {}
                () = connection => {}
            }
        });
    }
}

/// Answers 503 if the socket takes it at once, and closes: the accept loop never waits on a
/// client, and a refused connection keeps no descriptor.
fn refuse(stream: TcpStream) {
    if let Ok(mut stream) = stream.into_std() {
        let _ = stream.write(BUSY);
    }
}

/// One request: the slot is taken back if the request is late or another connection needs it
/// first; the answer must be taken within the response deadline.
async fn serve_connection(
    stream: TcpStream,
    slot: Slot,
    router: Router,
    connections: ConnectionMetrics,
) {
    let head_received = CancellationToken::new();
    let router = TowerToHyperService::new(router);
    let service = {
        let head_received = head_received.clone();
        hyper::service::service_fn(move |request| {
            head_received.cancel();
            router.call(request)
        })
    };
    let connection = http1::Builder::new()
        .keep_alive(false)
        .serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let waited = slot
        .read_request(async {
            tokio::select! {
                () = head_received.cancelled() => Waited::Request,
                // Closed, or malformed (hyper answered 400), before a request.
                finished = &mut connection => Waited::Ended(finished),
                () = tokio::time::sleep(REQUEST_TIMEOUT) => Waited::TimedOut,
            }
        })
        .await;
    // Counted before the connection closes, so a client that sees it closed sees it counted.
    match waited {
        None => connections.rejected(Endpoint::Metrics, Rejection::IdleEvicted),
        Some(Waited::TimedOut) => connections.timed_out(Endpoint::Metrics, Stage::Request),
        Some(Waited::Ended(Ok(()))) => {}
        Some(Waited::Ended(Err(error))) => {
            debug!("metrics connection failed before a request: {error}");
        }
        Some(Waited::Request) => match tokio::time::timeout(RESPONSE_DEADLINE, connection).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => debug!("metrics connection failed: {error}"),
            Err(_) => connections.timed_out(Endpoint::Metrics, Stage::Response),
        },
    }
}

/// How waiting for a request ended.
enum Waited {
    Request,
    Ended(Result<(), hyper::Error>),
    TimedOut,
}

/// OpenMetrics for scrapers that ask for it (Prometheus does); the classic text format for
/// everything else (curl, promtool).
async fn scrape(State(scrapes): State<Scrapes>, headers: HeaderMap) -> Response {
    let wants_openmetrics = headers
        .get_all(ACCEPT)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .any(|value| value.contains("application/openmetrics-text"));
    let (format, content_type) = if wants_openmetrics {
        (Format::OpenMetrics, OPENMETRICS)
    } else {
        (Format::PrometheusText, PROMETHEUS_TEXT)
    };
    let encoder = scrapes
        .encoders
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let metrics = scrapes.metrics;
    // Reading the kernel maps and cgroup files is blocking work. The permit goes with it, so a
    // client that gives up does not let more encodings pile up on the blocking threads.
    let encoded = tokio::task::spawn_blocking(move || {
        let _encoder = encoder;
        metrics.encode(format)
    })
    .await;
    match encoded {
        Ok(Ok(body)) => ([(CONTENT_TYPE, content_type)], Bytes::from_owner(body)).into_response(),
        _ => (
            StatusCode::INTERNAL_SERVER_ERROR,
            "encoding metrics failed\n",
        )
            .into_response(),
    }
}
