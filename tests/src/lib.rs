//! Shared helpers for celeriac's integration tests (in `tests/`).

pub mod mutate;
pub mod postgres;
pub mod sentinel;
pub mod tls;

use celeriac::runtime::{
    Grants, Invocation, Limits, Module, RunEnv, RunReport, Runtime, RuntimeConfig,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// The compiled-module cache the tests share, so each component is compiled once per checkout.
pub fn test_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-module-cache")
}

/// A runtime sized for tests, with fuel metering compiled in when `fuel` is set.
pub fn runtime(fuel: bool) -> Arc<Runtime> {
    Arc::new(
        Runtime::new(RuntimeConfig {
            max_instances: 16,
            max_memory: 256 << 20,
            fuel,
            cache_dir: Some(test_cache_dir()),
            ..RuntimeConfig::default()
        })
        .expect("build runtime"),
    )
}

/// Loads a component built by the workspace: `tasks/<name>.wasm` or `fixtures/<name>.wasm`.
pub async fn module(runtime: &Runtime, name: &str) -> Module {
    let tasks = Path::new(celeriac::BUILT_TASKS_DIR).join(format!("{name}.wasm"));
    let path = if tasks.exists() {
        tasks
    } else {
        Path::new(celeriac::BUILT_FIXTURES_DIR).join(format!("{name}.wasm"))
    };
    runtime.load_module(&path).await.unwrap_or_else(|e| panic!("load {}: {e:#}", path.display()))
}

/// An invocation of `task` with JSON `args`.
pub fn invocation(task: &str, args: serde_json::Value) -> Invocation {
    Invocation {
        id: format!("test-{task}"),
        task: task.to_string(),
        args: args.to_string(),
        kwargs: "{}".to_string(),
        retries: 0,
    }
}

/// Limits with a hard limit in milliseconds and everything else default.
pub fn limits_ms(hard: u64) -> Limits {
    Limits { hard_time_limit: Duration::from_millis(hard), ..Limits::default() }
}

/// Runs `task` with `args` under `limits` and `grants`.
pub async fn run(
    runtime: &Runtime,
    module: &Module,
    task: &str,
    args: serde_json::Value,
    limits: &Limits,
    grants: Grants,
    env: RunEnv,
) -> RunReport {
    runtime.run(module, &invocation(task, args), limits, grants, env).await
}

/// Resident memory of this process in bytes (Linux).
pub fn resident_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
    pages * 4096
}

/// A `redis-server` of the test's own on a free port, stopped when dropped. Tests never touch a
/// shared Redis.
pub struct RedisServer {
    /// The port it listens on.
    pub port: u16,
    /// Arguments beyond the common ones (`--port` unless given here).
    args: Vec<String>,
    /// Its working folder. A replica writes the snapshot it receives to `dump.rdb` there, and
    /// every server loads a `dump.rdb` it finds at startup: a shared folder would leak one
    /// test's data into the next test's server.
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers.
    pub fn start() -> RedisServer {
        let port = free_port();
        Self::start_with(port, &["--port".to_string(), port.to_string()])
    }

    /// Starts a server with `args` (which must make it listen on `port`, e.g. `--port 0
    /// --tls-port P ...`) and waits until `port` accepts connections.
    pub fn start_with(port: u16, args: &[String]) -> RedisServer {
        let dir = tempfile::tempdir().unwrap();
        let mut server = RedisServer { port, args: args.to_vec(), dir, child: None };
        server.spawn();
        server
    }

    fn spawn(&mut self) {
        let child = std::process::Command::new("redis-server")
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start redis-server (is it installed? scripts/test and .ci/run need it)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// The URL of database `db`.
    pub fn url(&self, db: u8) -> String {
        format!("redis://127.0.0.1:{}/{db}", self.port)
    }

    /// Kills the server (its data is gone: it keeps nothing on disk).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Starts it again on the same port.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// A synchronous connection for assertions.
    pub fn client(&self, db: u8) -> redis::Connection {
        redis::Client::open(self.url(db)).unwrap().get_connection().unwrap()
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A child process that is killed when dropped, so a test that fails midway leaves no worker
/// running behind it.
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `celeriac` binary next to the running test executable (`target/debug/celeriac`);
/// `scripts/test` builds it before the tests run.
pub fn celeriac_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().and_then(Path::parent).unwrap();
    let bin = dir.join("celeriac");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build` first (scripts/test does)",
        bin.display()
    );
    bin
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// A free TCP port on loopback.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One HTTP/1.1 request to `127.0.0.1:port` (`Connection: close`), enough for the tests to call
/// an HTTP API without a client library. Returns the status code and the body.
pub fn http(
    port: u16,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let body = body.unwrap_or("");
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let (head, rest) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let chunked = head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"));
    Ok((status, if chunked { dechunk(rest) } else { rest.to_string() }))
}

/// The body of a chunked HTTP response.
fn dechunk(mut rest: &str) -> String {
    let mut body = String::new();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else { break };
        if n == 0 || after.len() < n {
            break;
        }
        body.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    body
}
