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
        HeaderMap,
        header::{ACCEPT, CONTENT_TYPE},
    },
    response::{IntoResponse, Response},
    routing::get,
};
use hyper::{server::conn::http1, service::Service as _};
use hyper_util::{rt::TokioIo, service::TowerToHyperService};
use tokio::{
    net::{TcpListener, TcpStream},
    runtime::Handle,
    sync::{
        OwnedSemaphorePermit, Semaphore,
        mpsc::{self, error::TrySendError},
    },
};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::{
    metrics::{Chunk, ConnectionMetrics, Endpoint, Format, Metrics, Rejection, Stage},
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
/// Scrapes encoding at once (each reads kernel maps on a blocking thread); two lets a pair of
/// redundant Prometheus servers scrape together. A scrape waiting for its client is not
/// encoding.
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
    let encoder = Arc::clone(&scrapes.encoders)
        .acquire_owned()
        .await
        .expect("the semaphore is never closed");
    let (chunks, body) = mpsc::channel(CHUNKS_IN_FLIGHT);
    let mut sender = ChunkSender {
        chunks,
        encoder: Some(encoder),
        encoders: scrapes.encoders,
        runtime: Handle::current(),
    };
    let metrics = scrapes.metrics;
    // Reading the kernel maps is blocking work, and so is waiting for a slow client.
    tokio::task::spawn_blocking(move || {
        match metrics.encode(format, |chunk| sender.send(Piece::Text(chunk))) {
            Ok(()) => {
                let _ = sender.send(Piece::End);
            }
            // The client went away, or the response deadline passed.
            Err(_) => debug!("a metrics response was not completed"),
        }
    });
    (
        [(CONTENT_TYPE, content_type)],
        axum::body::Body::new(StreamedBody {
            chunks: body,
            ended: false,
        }),
    )
        .into_response()
}

/// Chunks encoded ahead of what the client has taken.
const CHUNKS_IN_FLIGHT: usize = 2;

/// What the encoder hands the response.
enum Piece {
    Text(Chunk),
    /// The body is complete; a body whose encoder stops before this is cut off as failed.
    End,
}

/// The encoder's end of a streamed body.
struct ChunkSender {
    chunks: mpsc::Sender<Piece>,
    encoder: Option<OwnedSemaphorePermit>,
    encoders: Arc<Semaphore>,
    runtime: Handle,
}

impl ChunkSender {
    fn send(&mut self, piece: Piece) -> std::fmt::Result {
        let piece = match self.chunks.try_send(piece) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(std::fmt::Error),
            Err(TrySendError::Full(piece)) => piece,
        };
        // The client is slower than the encoder: while waiting for it, the encoder's place
        // goes to other scrapes, so a client that does not read keeps no one else waiting.
        self.encoder = None;
        self.runtime
            .block_on(self.chunks.send(piece))
            .map_err(|_| std::fmt::Error)?;
        let encoder = self
            .runtime
            .block_on(Arc::clone(&self.encoders).acquire_owned())
            .expect("the semaphore is never closed");
        self.encoder = Some(encoder);
        Ok(())
    }
}

/// The response's end of a streamed body.
struct StreamedBody {
    chunks: mpsc::Receiver<Piece>,
    ended: bool,
}

/// The encoder stopped before the end of the body: the connection is cut, so the client sees a
/// failed scrape rather than a short one.
#[derive(Debug, thiserror::Error)]
#[error("the metrics body was not completed")]
struct Incomplete;

impl http_body::Body for StreamedBody {
    type Data = Bytes;
    type Error = Incomplete;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        context: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Incomplete>>> {
        if self.ended {
            return std::task::Poll::Ready(None);
        }
        self.chunks.poll_recv(context).map(|piece| match piece {
            Some(Piece::Text(chunk)) => Some(Ok(http_body::Frame::data(Bytes::from_owner(chunk)))),
            Some(Piece::End) => {
                self.ended = true;
                None
            }
            None => Some(Err(Incomplete)),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::{
        io::Read,
        net::{SocketAddr, TcpStream as StdTcpStream},
        os::fd::{AsRawFd, RawFd},
    };

    use prometheus_client::metrics::{counter::Counter, family::Family};

    use super::*;

    /// Metrics whose body is about 4 MB, in many families.
    fn large_metrics() -> (Metrics, ConnectionMetrics) {
        let mut metrics = Metrics::default();
        for family in 0..40 {
            let series = Family::<Vec<(&'static str, String)>, Counter>::default();
            for service in 0..2000 {
                let _ = series
                    .get_or_create(&vec![("service", format!("service-{service:05}.service"))]);
            }
            metrics
                .registry_mut()
                .register(format!("family_{family}"), "A family", series);
        }
        let connections = ConnectionMetrics::new(metrics.registry_mut());
        (metrics, connections)
    }

    /// Sets a socket's send buffer size, which also stops the kernel from growing it.
    fn set_send_buffer(socket: RawFd, bytes: libc::c_int) {
        // SAFETY: setsockopt(2) with an open socket and a pointer to an int of that size.
        let set = unsafe {
            libc::setsockopt(
                socket,
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                (&raw const bytes).cast(),
                std::mem::size_of_val(&bytes) as libc::socklen_t,
            )
        };
        assert_eq!(set, 0, "{}", std::io::Error::last_os_error());
    }

    /// Sends a scrape request, and reads nothing yet.
    fn ask(addr: SocketAddr) -> StdTcpStream {
        let mut stream = StdTcpStream::connect(addr).unwrap();
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: test\r\nAccept: application/openmetrics-text\r\n\r\n")
            .unwrap();
        stream
    }

    /// The whole answer, until the server closes.
    fn read_all(mut stream: StdTcpStream) -> String {
        stream
            .set_read_timeout(Some(Duration::from_secs(60)))
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).unwrap();
        answer
    }

    /// A complete chunked OpenMetrics body ends with `# EOF` and then the last, empty chunk.
    fn assert_complete(answer: &str, whose: &str) {
        assert!(answer.starts_with("HTTP/1.1 200"), "{}", &answer[..80]);
        assert!(answer.contains("transfer-encoding: chunked"));
        assert!(
            answer.ends_with("# EOF\n\r\n0\r\n\r\n"),
            "{whose}'s answer is cut off after {} bytes: {}",
            answer.len(),
            &answer[answer.len() - 80..]
        );
    }

    #[test]
    fn stalled_clients_get_whole_bodies_and_others_are_answered_meanwhile() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let (metrics, connections) = large_metrics();
        let listener = runtime
            .block_on(TcpListener::bind(("127.0.0.1", 0)))
            .unwrap();
        // The connections it accepts hold little of an answer their client has not read.
        set_send_buffer(listener.as_raw_fd(), 64 * 1024);
        let addr = listener.local_addr().unwrap();
        let cancel = CancellationToken::new();
        runtime.spawn(serve(
            listener,
            Arc::new(metrics),
            connections,
            cancel.clone(),
        ));

        // More stalled clients than scrapes may encode at once: a reading client is answered
        // while they stall, and each still gets its whole body once it reads.
        let stalled: Vec<StdTcpStream> = (0..=MAX_CONCURRENT_SCRAPES).map(|_| ask(addr)).collect();
        assert_complete(&read_all(ask(addr)), "the reading client");
        for stream in stalled {
            assert_complete(&read_all(stream), "a stalled client");
        }
        cancel.cancel();
    }

    #[test]
    fn an_encoder_waiting_for_its_client_leaves_its_place_to_other_scrapes() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        let encoders = Arc::new(Semaphore::new(1));
        let encoder = runtime
            .block_on(Arc::clone(&encoders).acquire_owned())
            .unwrap();
        let (chunks, mut body) = mpsc::channel(1);
        let mut sender = ChunkSender {
            chunks,
            encoder: Some(encoder),
            encoders: Arc::clone(&encoders),
            runtime: runtime.handle().clone(),
        };
        // Two chunks, each a whole (small) body.
        let mut chunks = Vec::new();
        for _ in 0..2 {
            Metrics::default()
                .encode(Format::OpenMetrics, |chunk| {
                    chunks.push(chunk);
                    Ok(())
                })
                .unwrap();
        }
        let expected: Vec<Vec<u8>> = chunks.iter().map(|chunk| chunk.as_ref().to_vec()).collect();
        let waiting = std::thread::spawn(move || {
            // The second waits for the client: the channel holds one.
            for chunk in chunks {
                sender.send(Piece::Text(chunk))?;
            }
            sender.send(Piece::End)
        });
        let hang_guard = Duration::from_secs(60);
        runtime.block_on(async {
            let other = tokio::time::timeout(hang_guard, encoders.acquire())
                .await
                .expect("another scrape gets the place of the waiting encoder")
                .unwrap();
            drop(other);
            for expected in &expected {
                match body.recv().await {
                    Some(Piece::Text(chunk)) => assert_eq!(chunk.as_ref(), expected),
                    _ => panic!("expected a chunk"),
                }
            }
            assert!(matches!(body.recv().await, Some(Piece::End)));
        });
        assert_eq!(waiting.join().unwrap(), Ok(()));
    }

    #[test]
    fn a_body_whose_encoder_stops_early_fails_instead_of_ending() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        for ends in [true, false] {
            let (sender, receiver) = mpsc::channel(4);
            Metrics::default()
                .encode(Format::OpenMetrics, |chunk| {
                    sender.try_send(Piece::Text(chunk)).ok().unwrap();
                    Ok(())
                })
                .unwrap();
            if ends {
                sender.try_send(Piece::End).ok().unwrap();
            }
            drop(sender);
            let mut body = StreamedBody {
                chunks: receiver,
                ended: false,
            };
            let mut next = || {
                runtime.block_on(std::future::poll_fn(|context| {
                    http_body::Body::poll_frame(std::pin::Pin::new(&mut body), context)
                }))
            };
            assert!(next().unwrap().unwrap().is_data());
            if ends {
                assert!(next().is_none());
                assert!(next().is_none());
            } else {
                assert!(matches!(next(), Some(Err(Incomplete))));
            }
        }
    }
}
