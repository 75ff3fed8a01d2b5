//! Finding the master through Sentinel, as redis-py's `Sentinel.discover_master` does: ask each
//! sentinel in turn for the named master, skip one it thinks is down or that too few other
//! sentinels watch, and confirm with the master itself that it is a master (a sentinel that
//! has not yet seen a failover can name the old one).

use super::urls::{Node, SentinelSpec};
use super::{CONNECT_TIMEOUT, address, client_for};
use anyhow::bail;
use redis::{ConnectionAddr, ConnectionInfo};
use std::collections::HashMap;

/// The current master's address with the master's login, database and TLS.
pub async fn master(spec: &SentinelSpec) -> anyhow::Result<ConnectionInfo> {
    let mut errors = Vec::new();
    for sentinel in &spec.sentinels {
        match ask(sentinel, spec).await {
            Ok(info) => match confirm(&info, spec).await {
                Ok(()) => return Ok(info),
                Err(e) => errors.push(format!(
                    "{}: named {} but {e}",
                    address(&sentinel.info),
                    address(&info)
                )),
            },
            Err(e) => errors.push(format!("{}: {e}", address(&sentinel.info))),
        }
    }
    bail!("no sentinel names a usable master {:?} ({})", spec.master_name, errors.join("; "))
}

/// The master's `host:port` as the first sentinel that answers names it (not confirmed).
pub async fn named(spec: &SentinelSpec) -> anyhow::Result<String> {
    let mut last = None;
    for sentinel in &spec.sentinels {
        match ask(sentinel, spec).await {
            Ok(info) => return Ok(address(&info)),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no sentinel")))
}

/// One sentinel's answer for the master.
async fn ask(sentinel: &Node, spec: &SentinelSpec) -> anyhow::Result<ConnectionInfo> {
    let client = client_for(&sentinel.info, sentinel.tls.as_ref())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(CONNECT_TIMEOUT);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
    let fields: Vec<String> =
        redis::cmd("SENTINEL").arg("MASTER").arg(&spec.master_name).query_async(&mut conn).await?;
    let fields: HashMap<&str, &str> =
        fields.chunks_exact(2).map(|kv| (kv[0].as_str(), kv[1].as_str())).collect();
    let flags = fields.get("flags").copied().unwrap_or_default();
    if flags.split(',').any(|f| matches!(f, "s_down" | "o_down" | "disconnected")) {
        bail!("it reports the master down ({flags})");
    }
    let others: u64 = fields.get("num-other-sentinels").and_then(|n| n.parse().ok()).unwrap_or(0);
    if others < spec.min_other_sentinels {
        bail!(
            "only {others} other sentinels watch the master; min_other_sentinels is {}",
            spec.min_other_sentinels
        );
    }
    let (Some(host), Some(port)) =
        (fields.get("ip"), fields.get("port").and_then(|p| p.parse::<u16>().ok()))
    else {
        bail!("its answer has no ip and port");
    };
    let host = host.to_string();
    let addr = match &spec.master_tls {
        Some(_) => ConnectionAddr::TcpTls { host, port, insecure: false, tls_params: None },
        None => ConnectionAddr::Tcp(host, port),
    };
    Ok(ConnectionInfo { addr, redis: spec.master.clone() })
}

/// Checks that `info` says it is a master (`ROLE`).
async fn confirm(info: &ConnectionInfo, spec: &SentinelSpec) -> anyhow::Result<()> {
    let client = client_for(info, spec.master_tls.as_ref())?;
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(CONNECT_TIMEOUT)
        .set_response_timeout(CONNECT_TIMEOUT);
    let mut conn = client.get_multiplexed_async_connection_with_config(&config).await?;
    let role: redis::Value = redis::cmd("ROLE").query_async(&mut conn).await?;
    let first = match &role {
        redis::Value::Array(items) => items.first(),
        _ => None,
    };
    match first {
        Some(redis::Value::BulkString(b)) if b == b"master" => Ok(()),
        Some(redis::Value::SimpleString(s)) if s == "master" => Ok(()),
        _ => bail!("it is not a master (ROLE answered {role:?})"),
    }
}
