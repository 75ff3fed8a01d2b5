//! The Redis URL strings Celery users write, read into what celeriac connects to.
//!
//! The rule is that a `broker_url` or `result_backend` from a Celery app works unchanged:
//! `redis://`, `rediss://` with kombu's `ssl_*` query keys, ACL users, `redis+socket://`,
//! `;` failover lists and `sentinel://` lists (with kombu's transport options beside them).
//! One difference is deliberate: `rediss://` verifies the server's certificate unless the URL
//! says `ssl_cert_reqs=none`, where kombu quietly does not.

use super::options::TransportOptions;
use percent_encoding::percent_decode_str;
use redis::{ConnectionAddr, ConnectionInfo, RedisConnectionInfo};
use std::path::PathBuf;

/// Redis's port when a URL names none; Sentinel's is 26379.
const REDIS_PORT: u16 = 6379;
const SENTINEL_PORT: u16 = 26379;

/// A URL that cannot be used, with what was wrong.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

fn bad(msg: impl Into<String>) -> UrlError {
    UrlError(msg.into())
}

/// How a TLS connection checks the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verify {
    /// The certificate must chain to a trusted root and name the host (the default).
    Full,
    /// The certificate must chain to a trusted root; any host name is accepted
    /// (`ssl_check_hostname=false`).
    AnyHostname,
    /// Nothing is checked (`ssl_cert_reqs=none`, kombu's default for `rediss://`).
    Nothing,
}

/// TLS settings from kombu's `ssl_*` query keys, with the files already read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// How the server is checked.
    pub verify: Verify,
    /// Trusted roots in PEM (`ssl_ca_certs`); the system's roots when `None`.
    pub ca: Option<Vec<u8>>,
    /// The client certificate chain and key in PEM (`ssl_certfile`, `ssl_keyfile`), for
    /// mutual TLS.
    pub client: Option<(Vec<u8>, Vec<u8>)>,
    /// Whether the URL named the verification mode or a CA; when it did not, a failed
    /// verification explains how to match kombu's default.
    pub explicit: bool,
}

/// One server address with what the handshake needs.
#[derive(Debug, Clone)]
pub struct Node {
    /// Where, and how to log in.
    pub info: ConnectionInfo,
    /// TLS, when the scheme asks for it.
    pub tls: Option<Tls>,
}

/// Sentinel discovery settings.
#[derive(Debug, Clone)]
pub struct SentinelSpec {
    /// The sentinels, asked in order.
    pub sentinels: Vec<Node>,
    /// The monitored master's name (`master_name`).
    pub master_name: String,
    /// The master must be known to at least this many other sentinels (`min_other_sentinels`).
    pub min_other_sentinels: u64,
    /// Login, database and TLS for the master itself, taken from the URL (as kombu does).
    pub master: RedisConnectionInfo,
    /// TLS to the master (from the URL's `ssl_*` keys).
    pub master_tls: Option<Tls>,
}

/// Where a broker or result backend lives.
#[derive(Debug, Clone)]
pub enum Target {
    /// One server, or a `;` list of alternates tried in order.
    Direct(Vec<Node>),
    /// A master found through Sentinel.
    Sentinel(SentinelSpec),
}

impl Target {
    /// The database number (kombu puts it in fanout channel names: `/0.celeryev`).
    pub fn db(&self) -> i64 {
        match self {
            Target::Direct(nodes) => nodes[0].info.redis.db,
            Target::Sentinel(s) => s.master.db,
        }
    }
}

/// Reads `url` (one URL or a `;` list) with the transport options beside it.
pub fn parse(url: &str, options: &TransportOptions) -> Result<Target, UrlError> {
    let parts: Vec<&str> = url.split(';').map(str::trim).filter(|p| !p.is_empty()).collect();
    if parts.is_empty() {
        return Err(bad("the URL is empty"));
    }
    let scheme_of = |p: &str| p.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let sentinel = parts.iter().filter(|p| scheme_of(p).as_deref() == Some("sentinel")).count();
    if sentinel > 0 && sentinel < parts.len() {
        return Err(bad("a `;` list mixes sentinel:// with other schemes; use one kind"));
    }
    if sentinel > 0 {
        return parse_sentinel(&parts, options);
    }
    if options.master_name.is_some() {
        return Err(bad("transport option master_name is set but the URL is not sentinel://; \
             write sentinel://host:26379;sentinel://host2:26379"));
    }
    Ok(Target::Direct(parts.iter().map(|p| parse_node(p)).collect::<Result<_, _>>()?))
}

fn parse_sentinel(parts: &[&str], options: &TransportOptions) -> Result<Target, UrlError> {
    let master_name = options.master_name.clone().ok_or_else(|| {
        bad("a sentinel:// URL needs the transport option master_name (as kombu does): \
             [broker.transport_options] master_name = \"mymaster\", or \
             CELERY_BROKER_TRANSPORT_OPTIONS='{\"master_name\": \"mymaster\"}'")
    })?;
    let kwargs = &options.sentinel_kwargs;
    let mut sentinels = Vec::new();
    let mut master = None;
    for part in parts {
        let parsed = parse_url(part)?;
        let (host, port) = host_port(&parsed, SENTINEL_PORT);
        let query = Query::read(&parsed)?;
        // kombu takes the master's login, database and TLS from the first URL.
        if master.is_none() {
            master = Some((login(&parsed, db_from_path(&parsed)?), query.tls(false)?));
        }
        // The sentinels have their own login (`sentinel_kwargs`), as redis-py's Sentinel does.
        let redis = RedisConnectionInfo {
            username: kwargs.username.clone(),
            password: kwargs.password.clone(),
            ..RedisConnectionInfo::default()
        };
        let (addr, tls) = if kwargs.ssl.unwrap_or(false) {
            let tls = query.tls(true)?.unwrap_or(Tls {
                verify: Verify::Full,
                ca: None,
                client: None,
                explicit: false,
            });
            (ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None }, Some(tls))
        } else {
            (ConnectionAddr::Tcp(host, port), None)
        };
        sentinels.push(Node { info: ConnectionInfo { addr, redis }, tls });
    }
    let (master, master_tls) = master.expect("at least one part");
    Ok(Target::Sentinel(SentinelSpec {
        sentinels,
        master_name,
        min_other_sentinels: options.min_other_sentinels.unwrap_or(0),
        master,
        master_tls,
    }))
}

/// Reads one URL of a direct list.
fn parse_node(part: &str) -> Result<Node, UrlError> {
    let parsed = parse_url(part)?;
    let scheme = parsed.scheme().to_ascii_lowercase();
    match scheme.as_str() {
        "redis" | "valkey" | "rediss" | "valkeys" => {
            let (host, port) = host_port(&parsed, REDIS_PORT);
            let query = Query::read(&parsed)?;
            let secure = matches!(scheme.as_str(), "rediss" | "valkeys");
            let tls = query.tls(secure)?;
            if !secure && tls.is_some() {
                return Err(bad(format!(
                    "{}: ssl_* options need a rediss:// URL",
                    super::masked_url(part)
                )));
            }
            let redis = login(&parsed, db_from_path(&parsed)?);
            let addr = match &tls {
                Some(_) => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
                None => ConnectionAddr::Tcp(host, port),
            };
            Ok(Node { info: ConnectionInfo { addr, redis }, tls })
        }
        "redis+socket" | "socket" | "redis+unix" | "valkey+unix" | "unix" => {
            let path = percent_decode_str(parsed.path()).decode_utf8_lossy().to_string();
            if path.is_empty() || path == "/" {
                return Err(bad(format!(
                    "{part}: a socket URL needs a path: redis+socket:///run/redis.sock"
                )));
            }
            let query = Query::read(&parsed)?;
            let db = match query.db.as_deref() {
                Some(db) => db_number(db)?,
                None => 0,
            };
            let mut redis = login(&parsed, db);
            redis.username = redis.username.or(query.user.clone());
            redis.password = redis.password.or(query.pass.clone());
            Ok(Node {
                info: ConnectionInfo { addr: ConnectionAddr::Unix(PathBuf::from(path)), redis },
                tls: None,
            })
        }
        "redis+cluster" | "rediss+cluster" | "cluster" | "redis-cluster" => Err(cluster_refused()),
        "memory" => Err(bad("memory:// lives inside one process; it is not a Redis URL")),
        other => Err(bad(format!(
            "unknown scheme {other}:// in {}; celeriac takes redis://, rediss://, \
             redis+socket://, sentinel:// (and valkey:// aliases)",
            super::masked_url(part)
        ))),
    }
}

/// Why a Redis Cluster endpoint is refused.
pub fn cluster_refused() -> UrlError {
    bad("Redis Cluster is not supported: kombu has never spoken it, celeriac's scripts touch \
         several keys that a cluster would spread over slots, and Celery clients could not \
         share the queues. Use one primary (a managed Redis with cluster mode disabled) or a \
         primary with replicas behind Sentinel (sentinel://)")
}

fn parse_url(part: &str) -> Result<url::Url, UrlError> {
    url::Url::parse(part).map_err(|e| bad(format!("{}: not a URL: {e}", super::masked_url(part))))
}

fn host_port(url: &url::Url, default: u16) -> (String, u16) {
    let host = match url.host() {
        Some(url::Host::Ipv6(ip)) => ip.to_string(),
        Some(h) => h.to_string(),
        None => "localhost".to_string(),
    };
    (host, url.port().unwrap_or(default))
}

/// The database from the path (`/3`); kombu also takes `virtual_host` this way.
fn db_from_path(url: &url::Url) -> Result<i64, UrlError> {
    match url.path().trim_matches('/') {
        "" => Ok(0),
        db => db_number(db),
    }
}

fn db_number(text: &str) -> Result<i64, UrlError> {
    text.parse::<i64>()
        .ok()
        .filter(|n| *n >= 0)
        .ok_or_else(|| bad(format!("database {text:?} is not a number (e.g. /0)")))
}

/// The user and password of a URL, percent-decoded; a password alone is the `default` user's.
fn login(url: &url::Url, db: i64) -> RedisConnectionInfo {
    let decode = |s: &str| percent_decode_str(s).decode_utf8_lossy().to_string();
    let username = Some(decode(url.username())).filter(|u| !u.is_empty());
    let password = url.password().map(decode);
    RedisConnectionInfo { db, username, password, ..RedisConnectionInfo::default() }
}

/// The query keys celeriac reads.
#[derive(Default)]
struct Query {
    cert_reqs: Option<String>,
    ca_certs: Option<String>,
    certfile: Option<String>,
    keyfile: Option<String>,
    check_hostname: Option<bool>,
    db: Option<String>,
    user: Option<String>,
    pass: Option<String>,
}

impl Query {
    fn read(url: &url::Url) -> Result<Query, UrlError> {
        let mut q = Query::default();
        for (key, value) in url.query_pairs() {
            let value = value.to_string();
            match key.as_ref() {
                "ssl_cert_reqs" => q.cert_reqs = Some(value),
                "ssl_ca_certs" => q.ca_certs = Some(value),
                "ssl_certfile" => q.certfile = Some(value),
                "ssl_keyfile" => q.keyfile = Some(value),
                "ssl_check_hostname" => q.check_hostname = Some(truthy(&key, &value)?),
                "virtual_host" | "db" => q.db = Some(value),
                "user" => q.user = Some(value),
                "pass" | "password" => q.pass = Some(value),
                // Other keys (health_check_interval, protocol, ...) tune redis-py; they do not
                // change where or how celeriac connects.
                _ => {}
            }
        }
        Ok(q)
    }

    /// The TLS settings; `None` when the URL is not TLS and names no `ssl_*` key.
    fn tls(&self, secure: bool) -> Result<Option<Tls>, UrlError> {
        let named = self.cert_reqs.is_some()
            || self.ca_certs.is_some()
            || self.certfile.is_some()
            || self.keyfile.is_some()
            || self.check_hostname.is_some();
        if !secure && !named {
            return Ok(None);
        }
        let verify = match self.cert_reqs.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("required" | "cert_required" | "optional" | "cert_optional") => {
                // CERT_OPTIONAL verifies too when Python is the client, so it does here.
                if self.check_hostname == Some(false) { Verify::AnyHostname } else { Verify::Full }
            }
            Some("none" | "cert_none") => Verify::Nothing,
            Some(other) => {
                return Err(bad(format!(
                    "ssl_cert_reqs={other}: use required, optional or none (or CERT_REQUIRED, \
                     CERT_OPTIONAL, CERT_NONE)"
                )));
            }
        };
        let read = |key: &str, path: &str| {
            std::fs::read(path).map_err(|e| bad(format!("{key}={path}: cannot read it: {e}")))
        };
        let ca = self.ca_certs.as_deref().map(|p| read("ssl_ca_certs", p)).transpose()?;
        let client = match (&self.certfile, &self.keyfile) {
            (Some(cert), Some(key)) => {
                Some((read("ssl_certfile", cert)?, read("ssl_keyfile", key)?))
            }
            // One PEM holding both, as Python's ssl module allows.
            (Some(cert), None) => {
                let pem = read("ssl_certfile", cert)?;
                Some((pem.clone(), pem))
            }
            (None, Some(_)) => return Err(bad("ssl_keyfile needs ssl_certfile beside it")),
            (None, None) => None,
        };
        Ok(Some(Tls {
            verify,
            ca,
            client,
            explicit: self.cert_reqs.is_some() || self.ca_certs.is_some(),
        }))
    }
}

fn truthy(key: &str, value: &str) -> Result<bool, UrlError> {
    match value.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(bad(format!("{key}={value}: use true or false"))),
    }
}
