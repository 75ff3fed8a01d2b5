//! A primary, a replica and three `redis-sentinel` processes on loopback, for the failover
//! tests: every process the test's own, on free ports, stopped when dropped.

use crate::{Reaped, RedisServer, free_port};
use std::time::{Duration, Instant};

/// The name the sentinels monitor the primary under.
pub const MASTER_NAME: &str = "mymaster";
/// The sentinels' own password (`requirepass`), which clients give as kombu's
/// `sentinel_kwargs = {"password": ...}`.
pub const SENTINEL_PASSWORD: &str = "sentinel-pw";

/// The servers.
pub struct SentinelFleet {
    /// The first primary (a replica after a failover).
    pub first: RedisServer,
    /// The first replica (the primary after a failover).
    pub second: RedisServer,
    /// The sentinels' ports.
    pub sentinel_ports: Vec<u16>,
    sentinels: Vec<Reaped>,
    _dir: tempfile::TempDir,
}

impl SentinelFleet {
    /// Starts the servers and waits until every sentinel sees the replica and the other two.
    pub fn start() -> SentinelFleet {
        let first = RedisServer::start();
        let port = free_port();
        let second = RedisServer::start_with(
            port,
            &["--port", &port.to_string(), "--replicaof", "127.0.0.1", &first.port.to_string()]
                .map(String::from),
        );
        let dir = tempfile::tempdir().unwrap();
        let mut sentinels = Vec::new();
        let mut sentinel_ports = Vec::new();
        for i in 0..3 {
            let port = free_port();
            let conf = dir.path().join(format!("sentinel-{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "port {port}\nbind 127.0.0.1\ndir {}\n\
                     requirepass {SENTINEL_PASSWORD}\nsentinel sentinel-pass {SENTINEL_PASSWORD}\n\
                     sentinel monitor {MASTER_NAME} 127.0.0.1 {} 2\n\
                     sentinel down-after-milliseconds {MASTER_NAME} 2000\n\
                     sentinel failover-timeout {MASTER_NAME} 10000\n\
                     sentinel parallel-syncs {MASTER_NAME} 1\n",
                    dir.path().display(),
                    first.port
                ),
            )
            .unwrap();
            let child = std::process::Command::new("redis-sentinel")
                .arg(&conf)
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("start redis-sentinel (apt-get install redis-sentinel)");
            sentinels.push(Reaped(child));
            sentinel_ports.push(port);
        }
        let fleet = SentinelFleet { first, second, sentinel_ports, sentinels, _dir: dir };
        fleet.wait_until("every sentinel sees the replica and two other sentinels", |f| {
            f.sentinel_ports.iter().all(|p| {
                let m = master_fields(*p);
                field(&m, "num-slaves") == Some("1")
                    && field(&m, "num-other-sentinels") == Some("2")
            })
        });
        fleet
    }

    /// The URL kombu and celeriac take: every sentinel, database `db`.
    pub fn url(&self, db: u8) -> String {
        self.sentinel_ports
            .iter()
            .map(|p| format!("sentinel://127.0.0.1:{p}/{db}"))
            .collect::<Vec<_>>()
            .join(";")
    }

    /// The port of the primary, as the first sentinel names it.
    pub fn primary_port(&self) -> u16 {
        field(&master_fields(self.sentinel_ports[0]), "port").unwrap().parse().unwrap()
    }

    /// A connection to the current primary.
    pub fn primary(&self, db: u8) -> redis::Connection {
        let url = format!("redis://127.0.0.1:{}/{db}", self.primary_port());
        redis::Client::open(url).unwrap().get_connection().unwrap()
    }

    /// Asks a sentinel for a failover and waits until every sentinel names the other server
    /// and that server says it is the primary.
    pub fn failover(&self) -> u16 {
        let before = self.primary_port();
        let mut s = sentinel(self.sentinel_ports[0]);
        let _: () = redis::cmd("SENTINEL").arg("FAILOVER").arg(MASTER_NAME).query(&mut s).unwrap();
        let after = if before == self.first.port { self.second.port } else { self.first.port };
        // The clients ask for min_other_sentinels = 2, so the failover counts as over only
        // when every sentinel sees the other two beside the new master.
        self.wait_until("every sentinel names the new primary and sees the other two", |f| {
            f.sentinel_ports.iter().all(|p| {
                let m = master_fields(*p);
                field(&m, "port") == Some(&after.to_string())
                    && field(&m, "num-other-sentinels") == Some("2")
            }) && role(after) == "master"
        });
        after
    }

    fn wait_until(&self, what: &str, ok: impl Fn(&Self) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while !ok(self) {
            assert!(Instant::now() < deadline, "timed out waiting until {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Whether the sentinel processes still run (none has exited).
    pub fn sentinels_alive(&mut self) -> bool {
        self.sentinels.iter_mut().all(|s| s.try_wait().ok().flatten().is_none())
    }
}

/// `ROLE`'s first word on the server at `port`.
pub fn role(port: u16) -> String {
    let Ok(mut c) =
        redis::Client::open(format!("redis://127.0.0.1:{port}")).and_then(|c| c.get_connection())
    else {
        return String::new();
    };
    let role: redis::RedisResult<Vec<redis::Value>> = redis::cmd("ROLE").query(&mut c);
    match role.ok().and_then(|r| r.into_iter().next()) {
        Some(redis::Value::BulkString(b)) => String::from_utf8_lossy(&b).into_owned(),
        _ => String::new(),
    }
}

fn sentinel_url(port: u16) -> String {
    format!("redis://:{SENTINEL_PASSWORD}@127.0.0.1:{port}")
}

fn sentinel(port: u16) -> redis::Connection {
    redis::Client::open(sentinel_url(port)).unwrap().get_connection().unwrap()
}

fn master_fields(port: u16) -> Vec<String> {
    let Ok(mut s) = redis::Client::open(sentinel_url(port)).and_then(|c| c.get_connection()) else {
        return Vec::new();
    };
    redis::cmd("SENTINEL").arg("MASTER").arg(MASTER_NAME).query(&mut s).unwrap_or_default()
}

fn field<'a>(fields: &'a [String], name: &str) -> Option<&'a str> {
    fields.chunks_exact(2).find(|kv| kv[0] == name).map(|kv| kv[1].as_str())
}
