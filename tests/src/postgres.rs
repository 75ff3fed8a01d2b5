//! A PostgreSQL server of the test's own: `initdb` into a fresh folder and `pg_ctl start` on a
//! free port, trust authentication on loopback, stopped when dropped. initdb refuses to run as
//! root, so as root it runs as the `postgres` user in a folder that user owns.

use crate::free_port;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// The server.
pub struct PgServer {
    /// Its port on 127.0.0.1.
    pub port: u16,
    data: PathBuf,
    _dir: tempfile::TempDir,
}

/// The folder of PostgreSQL's programs: where `initdb` is on the PATH, else Debian's.
fn bin(program: &str) -> PathBuf {
    if let Ok(out) = Command::new("sh").arg("-c").arg(format!("command -v {program}")).output()
        && out.status.success()
    {
        return PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.flatten().map(|e| e.path().join("bin").join(program)).filter(|p| p.exists()).collect()
        })
        .unwrap_or_default();
    found.sort();
    found.pop().unwrap_or_else(|| panic!("{program} not found: apt-get install postgresql"))
}

/// Runs a PostgreSQL program, as `postgres` when this process is root.
fn run(program: &str, args: &[&str]) -> Output {
    let root = effective_uid() == 0;
    let mut command = if root {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(bin(program));
        c
    } else {
        Command::new(bin(program))
    };
    command.args(args).output().unwrap_or_else(|e| panic!("run {program}: {e}"))
}

/// The effective user id, read from `/proc` (the tests crate forbids unsafe code).
fn effective_uid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(u32::MAX)
}

impl PgServer {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> PgServer {
        let dir = tempfile::Builder::new().prefix("celeriac-pg").tempdir().unwrap();
        if effective_uid() == 0 {
            let out =
                Command::new("chown").args(["-R", "postgres:"]).arg(dir.path()).output().unwrap();
            assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
        }
        let data = dir.path().join("data");
        let data_str = data.to_str().unwrap().to_string();
        let out = run("initdb", &["-D", &data_str, "-A", "trust", "-U", "postgres", "--no-sync"]);
        assert!(out.status.success(), "initdb: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let options = format!(
            "-p {port} -c listen_addresses=127.0.0.1 -k {} -c fsync=off -c max_connections=100",
            dir.path().display()
        );
        let log = dir.path().join("server.log");
        let out = run(
            "pg_ctl",
            &["-D", &data_str, "-l", log.to_str().unwrap(), "-o", &options, "-w", "start"],
        );
        assert!(
            out.status.success(),
            "pg_ctl start: {}{}",
            String::from_utf8_lossy(&out.stderr),
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        let server = PgServer { port, data, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    /// The URL Celery's database backend takes.
    pub fn celery_url(&self) -> String {
        format!("db+postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// The libpq URL, for the test's own client.
    pub fn url(&self) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Stops it at once and starts it again on the same port with the same data.
    pub fn restart(&self) {
        let data = self.data.to_str().unwrap();
        // With its log file again: without one the server would write to this process's pipe,
        // and reading the output would wait for the server to exit.
        let log = self.data.with_file_name("server.log");
        let log = log.to_str().unwrap();
        let out = run("pg_ctl", &["-D", data, "-l", log, "-m", "immediate", "-w", "restart"]);
        assert!(out.status.success(), "pg_ctl restart: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ =
            run("pg_ctl", &["-D", self.data.to_str().unwrap(), "-m", "immediate", "-w", "stop"]);
    }
}
