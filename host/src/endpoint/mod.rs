//! Where Redis is and how to reach it: the URL grammar Celery users write (`url`), kombu's
//! transport options (`options`), TLS, the Sentinel master lookup (`sentinel`), and [`Conn`],
//! the shared connection that follows the primary when it moves.
//!
//! Every other module reaches Redis through an [`Endpoint`]: [`Conn::open`] for commands and
//! [`Endpoint::client`] for the connections that must stand alone (pub/sub, BRPOP).

mod options;
mod sentinel;
mod urls;

pub use options::{SentinelKwargs, TransportOptions};
pub use urls::{Target, Tls, UrlError, Verify, cluster_refused};

use anyhow::Context as _;
use redis::aio::{ConnectionLike, ConnectionManager};
use redis::{Cmd, ConnectionAddr, ConnectionInfo, Pipeline, RedisError, RedisFuture, Value};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// How long one connection attempt may take before the next address is tried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Most time one command may wait for its reply.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(30);
/// Least time between two attempts to find a new primary, so a burst of failing commands does
/// not become a burst of Sentinel lookups.
const RECOVER_EVERY: Duration = Duration::from_millis(250);
/// How often a Sentinel endpoint asks which server is the master. After a failover the old
/// master goes on taking writes (which are lost) until Sentinel converts it to a replica, up to
/// ten seconds later; asking moves over within a second instead.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// A broker or result backend address, parsed and checked.
#[derive(Debug, Clone)]
pub struct Endpoint {
    url: String,
    target: Target,
}

impl Endpoint {
    /// Reads `url` with its transport options; every problem is said in the error.
    pub fn parse(url: &str, options: &TransportOptions) -> Result<Endpoint, UrlError> {
        let target = urls::parse(url, options)?;
        Ok(Endpoint { url: url.to_string(), target })
    }

    /// The URL as given, with passwords hidden.
    pub fn shown(&self) -> String {
        masked_url(&self.url)
    }

    /// The database number.
    pub fn db(&self) -> i64 {
        self.target.db()
    }

    /// Where it points.
    pub fn target(&self) -> &Target {
        &self.target
    }

    /// A client for the current primary: the first address of a list that answers, or the
    /// master Sentinel names now. Each call looks again, so a reconnecting subscriber lands on
    /// the new primary after a failover.
    pub async fn client(&self) -> redis::RedisResult<redis::Client> {
        match self.resolve(0).await {
            Ok((_, client)) => Ok(client),
            Err(e) => Err(std::io::Error::other(format!("{:#}", self.explain(e))).into()),
        }
    }

    /// The primary, trying a list from `start`: its index in the list and a client for it.
    async fn resolve(&self, start: usize) -> anyhow::Result<(usize, redis::Client)> {
        match &self.target {
            Target::Direct(nodes) if nodes.len() == 1 => {
                Ok((0, client_for(&nodes[0].info, nodes[0].tls.as_ref())?))
            }
            Target::Direct(nodes) => {
                let mut errors = Vec::new();
                for i in (0..nodes.len()).map(|k| (start + k) % nodes.len()) {
                    let client = client_for(&nodes[i].info, nodes[i].tls.as_ref())?;
                    match ping(&client).await {
                        Ok(()) => return Ok((i, client)),
                        Err(e) => errors.push(format!("{}: {e}", address(&nodes[i].info))),
                    }
                }
                anyhow::bail!("no server of the list answers: {}", errors.join("; "))
            }
            Target::Sentinel(spec) => {
                let info = sentinel::master(spec).await?;
                Ok((0, client_for(&info, spec.master_tls.as_ref())?))
            }
        }
    }

    /// Whether an error on this endpoint may mean the primary moved elsewhere.
    fn follows_failover(&self, err: &RedisError) -> bool {
        if read_only(err) {
            return true;
        }
        // A single address reconnects by itself (ConnectionManager); a list or Sentinel must
        // look for the primary again.
        let single = matches!(&self.target, Target::Direct(n) if n.len() == 1);
        !single
            && (err.is_io_error()
                || err.is_connection_dropped()
                || err.is_connection_refusal()
                || err.is_timeout())
    }

    /// A connection error with the hint that explains a failed certificate check.
    fn explain(&self, err: anyhow::Error) -> anyhow::Error {
        let text = format!("{err:#}");
        let tls = match &self.target {
            Target::Direct(nodes) => nodes.iter().find_map(|n| n.tls.as_ref()),
            Target::Sentinel(s) => s.master_tls.as_ref(),
        };
        match tls {
            Some(tls) if certificate_problem(&text) => {
                let hint = if tls.explicit {
                    "check ssl_ca_certs (the CA that signed the server's certificate) and that the \
                     certificate names the host in the URL (or set ssl_check_hostname=false)"
                } else {
                    "celeriac verifies rediss:// certificates against the system's roots; kombu \
                     does not by default. Add ?ssl_ca_certs=/path/to/ca.pem to verify against your \
                     CA, or ?ssl_cert_reqs=none to match kombu's default"
                };
                err.context(format!("the server's TLS certificate was refused: {hint}"))
            }
            _ => err,
        }
    }
}

/// Whether `err` is Redis refusing a write because the server is now a replica.
fn read_only(err: &RedisError) -> bool {
    err.kind() == redis::ErrorKind::ReadOnly
        || err.code() == Some("READONLY")
        || err.to_string().contains("READONLY")
}

fn certificate_problem(text: &str) -> bool {
    ["certificate", "UnknownIssuer", "NotValidForName", "BadSignature"]
        .iter()
        .any(|s| text.contains(s))
}

/// `host:port` or the socket path, for messages.
fn address(info: &ConnectionInfo) -> String {
    match &info.addr {
        ConnectionAddr::Tcp(h, p) | ConnectionAddr::TcpTls { host: h, port: p, .. } => {
            format!("{h}:{p}")
        }
        ConnectionAddr::Unix(path) => path.display().to_string(),
    }
}

/// A client for `info` with its TLS settings applied.
fn client_for(info: &ConnectionInfo, tls: Option<&Tls>) -> anyhow::Result<redis::Client> {
    let Some(tls) = tls else { return Ok(redis::Client::open(info.clone())?) };
    install_crypto();
    let mut info = info.clone();
    if let ConnectionAddr::TcpTls { insecure, .. } = &mut info.addr {
        *insecure = tls.verify == Verify::Nothing;
    }
    if tls.ca.is_some() || tls.client.is_some() {
        let certs = redis::TlsCertificates {
            root_cert: tls.ca.clone(),
            client_tls: tls.client.clone().map(|(client_cert, client_key)| {
                redis::ClientTlsConfig { client_cert, client_key }
            }),
        };
        info = redis::Client::build_with_tls(info, certs)
            .context("ssl_ca_certs / ssl_certfile / ssl_keyfile")?
            .get_connection_info()
            .clone();
    }
    if tls.verify == Verify::AnyHostname {
        info.addr.set_danger_accept_invalid_hostnames(true);
    }
    Ok(redis::Client::open(info)?)
}

/// rustls needs one process-wide crypto provider; celeriac uses ring's.
fn install_crypto() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // Fails only when a provider is installed already, which serves as well.
        let _ = rustls::crypto::ring::default_provider().install_default();
    });
}

async fn ping(client: &redis::Client) -> redis::RedisResult<()> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(CONNECT_TIMEOUT);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
    redis::cmd("PING").query_async(&mut conn).await
}

/// A reconnecting connection manager for `client`; the first connection must succeed.
async fn manager(client: redis::Client) -> redis::RedisResult<ConnectionManager> {
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_number_of_retries(3)
        .set_max_delay(2_000)
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(RESPONSE_TIMEOUT);
    ConnectionManager::new_with_config(client, config).await
}

/// `url` with every password shown as `**`, for output and error messages; each part of a `;`
/// list on its own.
pub fn masked_url(url: &str) -> String {
    url.split(';').map(mask_one).collect::<Vec<_>>().join(";")
}

fn mask_one(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else { return url.to_string() };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let masked_tail = mask_query(tail);
    let Some((auth, host)) = authority.rsplit_once('@') else {
        return format!("{scheme}://{authority}{masked_tail}");
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:**@{host}{masked_tail}"),
        None => format!("{scheme}://{auth}@{host}{masked_tail}"),
    }
}

/// Hides `pass=` / `password=` in a socket URL's query.
fn mask_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else { return tail.to_string() };
    let pairs: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k @ ("pass" | "password"), _)) => format!("{k}=**"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

/// The connection every command of a process goes through. Cheap to clone; all clones share
/// one connection. When an error says the primary may have moved (a `READONLY` reply, or a lost
/// connection to a list or Sentinel endpoint), it finds the primary again and swaps the
/// connection for every clone. A command refused with `READONLY` changed nothing, so it is sent
/// once more on the new primary; a command whose connection broke is not, as it may have run.
#[derive(Clone)]
pub struct Conn {
    shared: Arc<Shared>,
}

struct Shared {
    endpoint: Endpoint,
    /// The connection and how many swaps came before it.
    current: RwLock<(u64, ConnectionManager)>,
    /// The address it is connected to (`host:port`).
    address: Mutex<String>,
    /// Index of the current server in a `;` list.
    index: Mutex<usize>,
    /// Serialises the search for a new primary.
    switching: tokio::sync::Mutex<Option<Instant>>,
    /// For a Sentinel endpoint, the master as every connection of this process to the same
    /// sentinels and master name last found it, and which of its changes this one followed.
    view: Option<(Arc<MasterView>, std::sync::atomic::AtomicU64)>,
}

/// The master of one Sentinel-monitored name, shared by every connection of the process that
/// follows it. The broker's and the result backend's connections (two databases, so two
/// connections) must move together: a result written to the old master after the ack went to
/// the new one would be lost for good.
#[derive(Default)]
struct MasterView {
    /// Bumped whenever a connection finds the master at another address.
    changes: std::sync::atomic::AtomicU64,
    address: Mutex<String>,
}

impl MasterView {
    /// The view for `spec`'s sentinels and master name.
    fn of(spec: &urls::SentinelSpec) -> Arc<MasterView> {
        static VIEWS: std::sync::LazyLock<
            Mutex<std::collections::HashMap<String, Arc<MasterView>>>,
        > = std::sync::LazyLock::new(Default::default);
        let sentinels: Vec<String> = spec.sentinels.iter().map(|n| address(&n.info)).collect();
        let key = format!("{}@{}", spec.master_name, sentinels.join(","));
        VIEWS.lock().expect("views lock").entry(key).or_default().clone()
    }

    /// Records that the master is at `address`; returns the change count now.
    fn found(&self, address: &str) -> u64 {
        use std::sync::atomic::Ordering;
        let mut current = self.address.lock().expect("view lock");
        if *current != address {
            *current = address.to_string();
            return self.changes.fetch_add(1, Ordering::SeqCst) + 1;
        }
        self.changes.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Conn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn").field("endpoint", &self.shared.endpoint.shown()).finish()
    }
}

impl Conn {
    /// Connects to `endpoint`'s primary; the first connection must succeed.
    pub async fn open(endpoint: &Endpoint) -> anyhow::Result<Conn> {
        let shown = endpoint.shown();
        let connect = async {
            let (index, client) = endpoint.resolve(0).await?;
            let address = address(client.get_connection_info());
            anyhow::Ok((index, address, manager(client).await?))
        };
        let (index, address, conn) = connect
            .await
            .map_err(|e| endpoint.explain(e))
            .with_context(|| format!("connect to Redis at {shown}"))?;
        let view = match endpoint.target() {
            Target::Sentinel(spec) => {
                let view = MasterView::of(spec);
                let seen = view.found(&address);
                Some((view, std::sync::atomic::AtomicU64::new(seen)))
            }
            Target::Direct(_) => None,
        };
        let shared = Arc::new(Shared {
            endpoint: endpoint.clone(),
            current: RwLock::new((0, conn)),
            address: Mutex::new(address),
            index: Mutex::new(index),
            switching: tokio::sync::Mutex::new(None),
            view,
        });
        if let Target::Sentinel(spec) = endpoint.target() {
            tokio::spawn(watch(Arc::downgrade(&shared), spec.clone()));
        }
        Ok(Conn { shared })
    }

    /// The endpoint it follows.
    pub fn endpoint(&self) -> &Endpoint {
        &self.shared.endpoint
    }

    fn current(&self) -> (u64, ConnectionManager) {
        self.shared.current.read().expect("connection lock").clone()
    }

    /// The connection to send on, after following a new master that another connection of the
    /// process found (one atomic read unless there is one).
    async fn followed(&self) -> (u64, ConnectionManager) {
        use std::sync::atomic::Ordering;
        let current = self.current();
        if let Some((view, seen)) = &self.shared.view
            && view.changes.load(Ordering::SeqCst) != seen.load(Ordering::SeqCst)
        {
            self.recover(current.0, &"another connection found a new master").await;
            return self.current();
        }
        current
    }

    /// After `err` on connection number `generation`: finds the primary again and swaps it in,
    /// unless another caller already did. Returns whether a new connection is in place.
    async fn recover(&self, generation: u64, err: &(dyn std::fmt::Display + Sync)) -> bool {
        let shared = &self.shared;
        let mut last = shared.switching.lock().await;
        if self.current().0 != generation {
            return true;
        }
        if last.is_some_and(|t| t.elapsed() < RECOVER_EVERY) {
            return false;
        }
        *last = Some(Instant::now());
        let start = *shared.index.lock().expect("index lock") + 1;
        let found = async {
            let (index, client) = shared.endpoint.resolve(start).await?;
            let address = address(client.get_connection_info());
            anyhow::Ok((index, address, manager(client).await?))
        };
        match tokio::time::timeout(CONNECT_TIMEOUT * 2, found).await {
            Ok(Ok((index, address, conn))) => {
                *shared.index.lock().expect("index lock") = index;
                if let Some((view, seen)) = &shared.view {
                    seen.store(view.found(&address), std::sync::atomic::Ordering::SeqCst);
                }
                *shared.address.lock().expect("address lock") = address;
                *shared.current.write().expect("connection lock") = (generation + 1, conn);
                info!(endpoint = %shared.endpoint.shown(), "reconnected to the primary after: {err}");
                true
            }
            Ok(Err(e)) => {
                warn!(endpoint = %shared.endpoint.shown(), "no primary found yet after {err}: {e:#}");
                false
            }
            Err(_) => {
                warn!(endpoint = %shared.endpoint.shown(), "looking for the primary timed out after {err}");
                false
            }
        }
    }
}

/// Asks Sentinel every [`WATCH_EVERY`] which server is the master, and moves the connection
/// when it names another one; ends when the last clone of the connection is dropped.
async fn watch(shared: std::sync::Weak<Shared>, spec: urls::SentinelSpec) {
    let mut tick = tokio::time::interval(WATCH_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Ok(named) = sentinel::named(&spec).await else { continue };
        let Some(shared) = shared.upgrade() else { return };
        let current = shared.address.lock().expect("address lock").clone();
        if named != current {
            let conn = Conn { shared };
            let generation = conn.current().0;
            let reason = format!("Sentinel names {named} as the master instead of {current}");
            conn.recover(generation, &reason).await;
        }
    }
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let (generation, mut conn) = self.followed().await;
            let result = conn.req_packed_command(cmd).await;
            match result {
                Err(e) if self.shared.endpoint.follows_failover(&e) => {
                    if self.recover(generation, &e).await && read_only(&e) {
                        return self.current().1.req_packed_command(cmd).await;
                    }
                    Err(e)
                }
                other => other,
            }
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let (generation, mut conn) = self.followed().await;
            let result = conn.req_packed_commands(cmd, offset, count).await;
            match result {
                Err(e) if self.shared.endpoint.follows_failover(&e) => {
                    // A replica refuses every write of a pipeline and the reads change
                    // nothing, so a READONLY pipeline is safe to send again.
                    if self.recover(generation, &e).await && read_only(&e) {
                        return self.current().1.req_packed_commands(cmd, offset, count).await;
                    }
                    Err(e)
                }
                other => other,
            }
        })
    }

    fn get_db(&self) -> i64 {
        self.shared.endpoint.db()
    }
}

#[cfg(test)]
mod tests;
