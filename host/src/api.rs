//! The worker's HTTP server (`celeriac worker --http ADDR`): health probes and Prometheus
//! metrics. Routing and auth live here; what is served comes from [`crate::metrics`] and the
//! broker.
//!
//! - `GET /healthz`: 200 while the process serves; no auth (liveness probes).
//! - `GET /readyz`: 200 when Redis answers, 503 otherwise; no auth (readiness probes).
//! - `GET /metrics`: the Prometheus text format; with a token set, it needs
//!   `Authorization: Bearer <token>` (Prometheus' `authorization` scrape setting).
//!
//! Without a token the server only listens on a loopback address, unless told otherwise
//! (`--http-insecure`): metrics name tasks and queues, which is not for everyone on a network.

use crate::broker::Broker;
use crate::metrics::{Metrics, Sample};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// What the server reads from the worker at each scrape: tasks running now, and the queues
/// consumed.
pub type WorkerView = Arc<dyn Fn() -> (usize, Vec<String>) + Send + Sync>;

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// The bearer token `/metrics` needs; `None` serves it to anyone who can connect.
    pub token: Option<String>,
    /// Serve without a token on an address that is not loopback.
    pub insecure: bool,
}

impl HttpOptions {
    /// Refuses a setting that would expose the server without auth by accident.
    pub fn check(&self) -> anyhow::Result<()> {
        if self.token.is_none() && !self.addr.ip().is_loopback() && !self.insecure {
            anyhow::bail!(
                "--http {}: refusing to serve without a token on an address other machines can \
                 reach; set CELERIAC_API_TOKEN (or --api-token), listen on 127.0.0.1, or pass \
                 --http-insecure",
                self.addr
            );
        }
        Ok(())
    }
}

struct Served<B> {
    metrics: Arc<Metrics>,
    broker: B,
    view: WorkerView,
    token: Option<String>,
}

/// Binds `opts.addr` (so a taken port fails the start, not later) and returns the server to
/// run until `stop`.
pub async fn bind<B: Broker>(
    opts: &HttpOptions,
    metrics: Arc<Metrics>,
    broker: B,
    view: WorkerView,
    stop: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    opts.check()?;
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http {}: {e}", opts.addr))?;
    let served = Arc::new(Served { metrics, broker, view, token: opts.token.clone() });
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz::<B>))
        .route("/metrics", get(metrics_text::<B>))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such route") })
        .with_state(served);
    Ok(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = server.await {
            tracing::warn!("the HTTP server stopped: {e}");
        }
    })
}

/// A JSON error body with its status.
fn error(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({"error": message, "status": status.as_u16()});
    (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response()
}

async fn readyz<B: Broker>(State(s): State<Arc<Served<B>>>) -> Response {
    match s.broker.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, &format!("Redis does not answer: {e}")),
    }
}

async fn metrics_text<B: Broker>(State(s): State<Arc<Served<B>>>, headers: HeaderMap) -> Response {
    if let Some(token) = &s.token {
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match given {
            None => return error(StatusCode::UNAUTHORIZED, "a bearer token is required"),
            Some(t) if !same(t.as_bytes(), token.as_bytes()) => {
                return error(StatusCode::FORBIDDEN, "wrong token");
            }
            Some(_) => {}
        }
    }
    let (active, queues) = (s.view)();
    let mut sample = Sample { active, queues: Vec::with_capacity(queues.len()) };
    for q in queues {
        // A queue Redis cannot measure now is left out of this scrape rather than shown as 0.
        if let (Ok(waiting), Ok(dead)) = (s.broker.queue_len(&q).await, s.broker.dlq_len(&q).await)
        {
            sample.queues.push((q, waiting, dead));
        }
    }
    let text = s.metrics.render(&sample);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Compares in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
