//! The HTTP side of CrowdSec's Local API: the bouncer's decision stream, the watcher's login
//! and alerts. Every request has a deadline, so a LAPI that stops answering delays the fleet's
//! bans and never the local ones.

use std::time::Duration;

use reqwest::{Client, StatusCode, Url};

use super::{push::Alert, settings::CaFile};
use crate::Error;

/// A request LAPI has not answered by then has failed; the next one starts over.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Larger answers are refused, not parsed: 100,000 decisions are about 20 MiB.
const MAX_ANSWER_BYTES: usize = 64 << 20;

pub struct Lapi {
    http: Client,
    base: Url,
}

impl Lapi {
    /// With `ca`, LAPI's certificate must come from that CA alone; otherwise from one the
    /// system trusts.
    pub fn new(url: &Url, ca: Option<&CaFile>) -> Result<Self, Error> {
        // rustls with the ring provider; a second install (a test) keeps the first.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = Client::builder()
            .user_agent(concat!("sentinel/", env!("CARGO_PKG_VERSION")))
            .timeout(REQUEST_TIMEOUT)
            .connect_timeout(CONNECT_TIMEOUT);
        if let Some(ca) = ca {
            let certs = reqwest::Certificate::from_pem_bundle(&ca.pem)
                .map_err(|error| Error::LapiClient(format!("{}: {error}", ca.path.display())))?;
            builder = builder.tls_certs_only(certs);
        }
        let http = builder
            .build()
            .map_err(|error| Error::LapiClient(error.to_string()))?;
        let mut base = url.clone();
        // `v1/...` is joined below a path such as https://host/lapi/, not beside it.
        if !base.path().ends_with('/') {
            base.set_path(&format!("{}/", base.path()));
        }
        Ok(Self { http, base })
    }

    /// `GET /v1/decisions/stream`: every decision in force with `startup`, else the changes
    /// since this key's previous pull. Returns the body, unread.
    pub async fn stream(&self, key: &str, startup: bool) -> Result<Vec<u8>, Error> {
        let mut url = self.url("v1/decisions/stream");
        url.set_query(Some(if startup {
            "startup=true"
        } else {
            "startup=false"
        }));
        let response = self
            .http
            .get(url)
            .header("X-Api-Key", key)
            .send()
            .await
            .map_err(unreachable)?;
        body(response).await
    }

    /// `POST /v1/watchers/login`: the JWT for the alerts.
    pub async fn login(&self, machine_id: &str, password: &str) -> Result<String, Error> {
        #[derive(serde::Deserialize)]
        struct Token {
            token: String,
        }
        let response = self
            .http
            .post(self.url("v1/watchers/login"))
            .json(&serde_json::json!({ "machine_id": machine_id, "password": password }))
            .send()
            .await
            .map_err(unreachable)?;
        let body = body(response).await?;
        serde_json::from_slice::<Token>(&body)
            .map(|answer| answer.token)
            .map_err(|error| Error::LapiMalformed(format!("login answer: {error}")))
    }

    /// `POST /v1/alerts`.
    pub async fn push(&self, token: &str, alerts: &[Alert]) -> Result<(), Error> {
        let response = self
            .http
            .post(self.url("v1/alerts"))
            .bearer_auth(token)
            .json(alerts)
            .send()
            .await
            .map_err(unreachable)?;
        body(response).await.map(drop)
    }

    /// `GET /v1/heartbeat`: this watcher is alive (`cscli machines list`, Last Heartbeat).
    pub async fn heartbeat(&self, token: &str) -> Result<(), Error> {
        let response = self
            .http
            .get(self.url("v1/heartbeat"))
            .bearer_auth(token)
            .send()
            .await
            .map_err(unreachable)?;
        body(response).await.map(drop)
    }

    fn url(&self, path: &str) -> Url {
        self.base
            .join(path)
            .expect("a relative path joins any base")
    }
}

/// A request that got no usable answer: LAPI unreachable, or its certificate refused.
fn unreachable(error: reqwest::Error) -> Error {
    // The URL is in the configuration already; the chain says what failed.
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    if refused_certificate(&error) {
        Error::LapiCertificate(text)
    } else {
        Error::LapiUnreachable(text)
    }
}

/// Whether rustls refused the peer's certificate somewhere in `error`'s chain.
fn refused_certificate(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut next = Some(error);
    while let Some(cause) = next {
        if let Some(tls) = cause.downcast_ref::<rustls::Error>() {
            return matches!(tls, rustls::Error::InvalidCertificate(_));
        }
        // rustls's error travels inside an io::Error, whose `source` skips it.
        let inner = cause
            .downcast_ref::<std::io::Error>()
            .and_then(std::io::Error::get_ref);
        if let Some(inner) = inner
            && refused_certificate(inner)
        {
            return true;
        }
        next = cause.source();
    }
    false
}

/// The body of a successful answer, read up to [`MAX_ANSWER_BYTES`]; any other status is an
/// error with the start of its body.
async fn body(mut response: reqwest::Response) -> Result<Vec<u8>, Error> {
    let status = response.status();
    let mut bytes = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
        if bytes.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Err(Error::LapiMalformed(format!(
                "an answer over the limit of {MAX_ANSWER_BYTES} bytes"
            )));
        }
        bytes.extend_from_slice(&chunk);
    }
    if status.is_success() {
        return Ok(bytes);
    }
    let excerpt: String = String::from_utf8_lossy(&bytes).chars().take(200).collect();
    Err(Error::LapiStatus {
        status: status.as_u16(),
        unauthorized: status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN,
        body: excerpt,
    })
}
