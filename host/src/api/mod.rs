//! The HTTP server, served by `celeriac worker --http ADDR` and by the standalone `celeriac api`.
//! This module owns the server: routing, auth, errors and the probes. What it serves lives in
//! [`tasks`] (celeriac's own task, queue, worker and dead-letter routes), [`flower`] (the subset
//! of Flower's API that existing scripts call) and `openapi.json` (the description of both).
//!
//! - `GET /healthz`: 200 while the process serves; no auth (liveness probes).
//! - `GET /readyz`: 200 when Redis answers, 503 otherwise; no auth (readiness probes).
//! - `GET /openapi.json`: the API's description; no auth (it holds nothing secret).
//! - everything else, `/metrics` included, needs `Authorization: Bearer <token>` when a token
//!   is set (Prometheus' `authorization` scrape setting sends it).
//!
//! Without a token the server only listens on a loopback address, unless told otherwise
//! (`--http-insecure`): the API sends and revokes tasks, which is not for everyone on a network.
//!
//! Errors are JSON, `{"error": "...", "status": N}`: 400 for a body that is not JSON, 401
//! without a token, 403 with a wrong one, 404 for an unknown route, task or id, 409 for a
//! request that conflicts with the task's state, 413 for a body over [`MAX_BODY_BYTES`], 422 for
//! well-formed JSON that asks for something invalid, 503 when Redis does not answer.

mod flower;
mod tasks;

use crate::broker::{Broker, RedisBroker, check_queue_name};
use crate::config::{Config, Route};
use crate::metrics::{Metrics, QueueSample, Sample};
use crate::registry::Registry;
use crate::results::ResultBackend;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The largest request body accepted. Task arguments belong in a message, not a file upload;
/// bigger data goes through the tasks' `kv` store.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// What the server reads from the worker it runs in, at each request that needs it; `None`
/// when no worker runs in this process (`celeriac api`).
pub type WorkerView = Arc<dyn Fn() -> Option<Local> + Send + Sync>;

/// The worker in this process, now.
#[derive(Debug, Clone)]
pub struct Local {
    /// Tasks running.
    pub active: usize,
    /// Queues consumed.
    pub queues: Vec<String>,
    /// Times fetching resumed after Redis did not answer.
    pub reconnects: u64,
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct HttpOptions {
    /// The address to listen on.
    pub addr: SocketAddr,
    /// The bearer token requests need; `None` serves anyone who can connect.
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

/// The tasks the server knows by name, and where a task is sent. Clones share one catalog, so
/// a worker's deploy or reload ([`Catalog::replace`]) reaches its HTTP server at once.
#[derive(Debug, Clone, Default)]
pub struct Catalog(Arc<std::sync::RwLock<Known>>);

#[derive(Debug, Default)]
struct Known {
    /// Registered task names and their queues.
    queues: BTreeMap<String, String>,
    /// The configured routing rules, for names no module registers.
    routes: Vec<Route>,
}

impl Catalog {
    /// The tasks `registry` serves, with the queues the configuration gives them.
    pub fn new(registry: &Registry, config: &Config) -> Catalog {
        let catalog = Catalog::default();
        catalog.replace(registry, config);
        catalog
    }

    /// Knows the tasks `registry` serves and the routing rules of `config` from now on.
    pub fn replace(&self, registry: &Registry, config: &Config) {
        let queues =
            registry.tasks().map(|e| (e.info.name.clone(), e.spec.queue.clone())).collect();
        *self.0.write().unwrap_or_else(|p| p.into_inner()) =
            Known { queues, routes: config.routes.clone() };
    }

    fn known(&self) -> std::sync::RwLockReadGuard<'_, Known> {
        self.0.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a module registers `name`.
    pub fn has(&self, name: &str) -> bool {
        self.known().queues.contains_key(name)
    }

    /// The registered task names, sorted.
    pub fn names(&self) -> Vec<String> {
        self.known().queues.keys().cloned().collect()
    }

    /// The queue a task goes to when the request names none: its configured queue, else the
    /// first routing rule that matches, else Celery's default.
    pub fn queue_for(&self, name: &str) -> String {
        let known = self.known();
        if let Some(q) = known.queues.get(name) {
            return q.clone();
        }
        crate::config::route(&known.routes, name).unwrap_or("celery").to_string()
    }

    /// Every queue a registered task or a rule sends to.
    fn queues(&self) -> Vec<String> {
        let known = self.known();
        known.queues.values().chain(known.routes.iter().map(|r| &r.queue)).cloned().collect()
    }
}

/// What the server serves from.
pub struct Api {
    /// The broker tasks are sent to.
    pub broker: RedisBroker,
    /// Where results are read.
    pub results: ResultBackend,
    /// The tasks known by name.
    pub catalog: Catalog,
    /// The metrics `/metrics` renders.
    pub metrics: Arc<Metrics>,
    /// The worker in this process, if any.
    pub view: WorkerView,
    /// How long a revocation sent through the API is remembered.
    pub revoke_ttl: Duration,
}

impl Api {
    /// The queues to report: those consumed here, those the tasks and rules send to, Celery's
    /// default and any queue with dead letters.
    async fn queue_names(&self) -> Result<Vec<String>, ApiError> {
        let mut names: Vec<String> = (self.view)().map(|l| l.queues).unwrap_or_default();
        names.extend(self.catalog.queues());
        names.push("celery".into());
        names.extend(self.broker.dlq_queues().await?);
        names.sort();
        names.dedup();
        Ok(names)
    }
}

/// Binds `opts.addr` (so a taken port fails the start, not later) and returns the server to
/// run until `stop`.
pub async fn bind(
    opts: &HttpOptions,
    api: Api,
    stop: CancellationToken,
) -> anyhow::Result<impl Future<Output = ()> + Send + 'static> {
    opts.check()?;
    let listener = tokio::net::TcpListener::bind(opts.addr)
        .await
        .map_err(|e| anyhow::anyhow!("--http {}: {e}", opts.addr))?;
    let api = Arc::new(api);
    let token: Option<Arc<str>> = opts.token.as_deref().map(Arc::from);
    let guarded = axum::Router::new()
        .route("/metrics", get(metrics_text))
        .merge(tasks::routes())
        .merge(flower::routes())
        .route_layer(axum::middleware::from_fn_with_state(token, authorize));
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi))
        // Flower's probe, for load balancers pointed at Flower before.
        .route("/healthcheck", get(|| async { "OK" }))
        .merge(guarded)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed on this route")
        })
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(api);
    Ok(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned());
        if let Err(e) = server.await {
            tracing::warn!("the HTTP server stopped: {e}");
        }
    })
}

/// A failed request: its status and what was wrong, sent as JSON.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError { status, message: message.into() }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({"error": self.message, "status": self.status.as_u16()});
        (self.status, [(header::CONTENT_TYPE, "application/json")], body.to_string())
            .into_response()
    }
}

impl From<crate::broker::BrokerError> for ApiError {
    fn from(e: crate::broker::BrokerError) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("Redis: {e}"))
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> ApiError {
        ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("{e:#}"))
    }
}

type Shared = State<Arc<Api>>;

async fn authorize(
    State(token): State<Option<Arc<str>>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(token) = token {
        match bearer(request.headers()) {
            None => {
                return ApiError::new(StatusCode::UNAUTHORIZED, "a bearer token is required")
                    .into_response();
            }
            Some(t) if !same(t.as_bytes(), token.as_bytes()) => {
                return ApiError::new(StatusCode::FORBIDDEN, "wrong token").into_response();
            }
            Some(_) => {}
        }
    }
    next.run(request).await
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::AUTHORIZATION)?.to_str().ok()?.strip_prefix("Bearer ")
}

/// Compares in time that does not depend on where the first difference is.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn readyz(State(api): Shared) -> Response {
    match api.broker.ping().await {
        Ok(()) => "ready\n".into_response(),
        Err(e) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, format!("Redis does not answer: {e}"))
                .into_response()
        }
    }
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], include_str!("openapi.json")).into_response()
}

async fn metrics_text(State(api): Shared) -> Response {
    let local = (api.view)();
    // Without Redis the worker's own metrics are still served: an outage is when they matter.
    let names = api.queue_names().await.unwrap_or_default();
    let mut sample = Sample {
        active: local.as_ref().map(|l| l.active),
        reconnects: local.map(|l| l.reconnects),
        queues: Vec::with_capacity(names.len()),
    };
    for name in names {
        // A queue Redis cannot measure now is left out of this scrape rather than shown as 0.
        let b = &api.broker;
        if let (Ok(waiting), Ok(dead), Ok(oldest_age)) =
            (b.queue_len(&name).await, b.dlq_len(&name).await, b.oldest_age(&name).await)
        {
            sample.queues.push(QueueSample { name, waiting, dead, oldest_age });
        }
    }
    let text = api.metrics.render(&sample);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

/// Query parameters; a malformed query string is a 400 in JSON like every other error.
pub struct Params(pub BTreeMap<String, String>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Params {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        axum::extract::Query::<BTreeMap<String, String>>::from_request_parts(parts, state)
            .await
            .map(|q| Params(q.0))
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.body_text()))
    }
}

/// A request body as JSON: empty is `{}`; over [`MAX_BODY_BYTES`] is 413; not JSON is 400.
pub struct Body(pub serde_json::Value);

impl<S: Send + Sync> axum::extract::FromRequest<S> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(request, state)
            .await
            .map_err(|e| ApiError::new(e.status(), e.body_text()))?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Body(serde_json::json!({})));
        }
        serde_json::from_slice(&bytes).map(Body).map_err(|e| {
            ApiError::new(StatusCode::BAD_REQUEST, format!("the body is not JSON: {e}"))
        })
    }
}

/// A queue name from a request, checked as the worker checks it.
fn queue_name(name: &str) -> Result<&str, ApiError> {
    check_queue_name(name).map_err(|e| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, e))?;
    Ok(name)
}

/// A task id from a request path: the worker accepts any text, but an id is no essay.
fn task_id(id: &str) -> Result<&str, ApiError> {
    if id.is_empty() || id.len() > 200 || id.chars().any(char::is_control) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "a task id is 1 to 200 characters with no control characters",
        ));
    }
    Ok(id)
}
