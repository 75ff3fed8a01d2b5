//! systemd's service protocol (sd_notify(3)): readiness, status, the watchdog and stopping, sent
//! as one datagram of `KEY=VALUE` lines to the socket `$NOTIFY_SOCKET` names.
//!
//! Without `NOTIFY_SOCKET` every call does nothing, so `celeriac worker` runs the same under
//! systemd, in a container and in a terminal. The protocol is a dozen lines over a Unix datagram
//! socket; a crate for it would not add anything, and the `sd-notify` crate cannot reach the
//! abstract sockets (`@name`) some container runtimes hand out.
//!
//! The watchdog is the point of [`supervise`]: `WATCHDOG=1` goes out only after a liveness check
//! passes (for the worker, Redis answers and the fetch loops advance), never from a timer alone,
//! so systemd restarts a worker that is wedged, not merely one whose process died.

use std::future::Future;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use crate::broker::{Broker as _, RedisBroker, ResultStore};
use crate::worker::Worker;

use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// How often the status line is refreshed when systemd asks for no watchdog.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The connection to the service manager, if there is one.
#[derive(Debug)]
pub struct Notifier {
    /// The socket and where to send; `None` when `NOTIFY_SOCKET` is unset or unusable.
    target: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
    /// `WATCHDOG_USEC`, when it is meant for this process.
    watchdog: Option<Duration>,
    /// Whether a failed send was already logged (a gone manager would otherwise log each tick).
    failed: AtomicBool,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Notifier {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let usec = std::env::var("WATCHDOG_USEC").ok();
        let pid = std::env::var("WATCHDOG_PID").ok();
        Notifier::new(socket.as_deref(), usec.as_deref(), pid.as_deref())
    }

    /// A notifier for these values of `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`.
    pub fn new(
        socket: Option<&std::ffi::OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
    ) -> Notifier {
        let target = socket.filter(|s| !s.is_empty()).and_then(|path| match connect(path) {
            Ok(t) => Some(t),
            Err(e) => {
                warn!("NOTIFY_SOCKET={}: {e}; not notifying systemd", path.to_string_lossy());
                None
            }
        });
        // A WATCHDOG_PID naming another process means the variables were inherited: the
        // watchdog is not ours to feed.
        let ours = watchdog_pid.is_none_or(|p| p.trim() == std::process::id().to_string());
        let watchdog = watchdog_usec
            .and_then(|u| u.trim().parse::<u64>().ok())
            .filter(|&u| u > 0 && ours)
            .map(Duration::from_micros);
        Notifier { target, watchdog, failed: AtomicBool::new(false) }
    }

    /// Whether a service manager is listening.
    pub fn enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half the manager's timeout, as sd_watchdog_enabled(3)
    /// recommends. `None` when the manager set no watchdog.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog.map(|t| t / 2)
    }

    /// Sends these lines as one datagram.
    pub fn send(&self, lines: &[String]) {
        let Some((socket, addr)) = &self.target else { return };
        let mut message = lines.join("\n");
        message.push('\n');
        match socket.send_to_addr(message.as_bytes(), addr) {
            Ok(_) => {
                debug!(notify = %message.trim_end(), "told systemd");
                self.failed.store(false, Ordering::Relaxed);
            }
            Err(e) if !self.failed.swap(true, Ordering::Relaxed) => {
                warn!("could not notify systemd: {e}");
            }
            Err(_) => {}
        }
    }

    /// `READY=1` with a status line: the service is up.
    pub fn ready(&self, status: &str) {
        self.send(&["READY=1".into(), status_line(status)]);
    }

    /// `STOPPING=1`, with `EXTEND_TIMEOUT_USEC` so the manager waits `drain` more for running
    /// work before it kills the service.
    pub fn stopping(&self, drain: Duration, status: &str) {
        self.send(&[
            "STOPPING=1".into(),
            format!("EXTEND_TIMEOUT_USEC={}", drain.as_micros()),
            status_line(status),
        ]);
    }
}

fn status_line(status: &str) -> String {
    // One line: a newline would start another KEY=VALUE.
    format!("STATUS={}", status.replace(['\n', '\r'], " "))
}

fn connect(
    path: &std::ffi::OsStr,
) -> std::io::Result<(UnixDatagram, std::os::unix::net::SocketAddr)> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_bytes();
    let addr = match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            std::os::unix::net::SocketAddr::from_abstract_name(name)?
        }
        None => std::os::unix::net::SocketAddr::from_pathname(path)?,
    };
    let socket = UnixDatagram::unbound()?;
    // A full socket buffer must not stall the async runtime; a dropped notification is
    // followed by the next one.
    socket.set_nonblocking(true)?;
    Ok((socket, addr))
}

/// Keeps the manager informed until `stop`: every tick runs `check`, which answers the status
/// line when the service is alive and why it is not otherwise. `WATCHDOG=1` goes out only for
/// a live service; a failed check is logged once when it starts failing and once when it passes
/// again. Ticks at half the watchdog timeout, or every few seconds for the status alone.
pub async fn supervise<F, Fut>(notifier: &Notifier, stop: CancellationToken, check: F)
where
    F: Fn(Duration) -> Fut,
    Fut: Future<Output = Result<String, String>>,
{
    if !notifier.enabled() {
        return;
    }
    let every = notifier.watchdog_every().unwrap_or(STATUS_EVERY);
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let (mut last_status, mut failing) = (String::new(), false);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        // A check that hangs is a failed check: it gets the rest of this tick.
        let verdict = match tokio::time::timeout(every, check(every)).await {
            Ok(v) => v,
            Err(_) => Err(format!("the liveness check did not answer within {every:?}")),
        };
        let mut lines = Vec::new();
        match verdict {
            Ok(status) => {
                if failing {
                    warn!("alive again: feeding the systemd watchdog");
                    failing = false;
                }
                if notifier.watchdog.is_some() {
                    lines.push("WATCHDOG=1".to_string());
                }
                if status != last_status {
                    lines.push(status_line(&status));
                    last_status = status;
                }
            }
            Err(why) => {
                if !failing {
                    warn!("not alive, so not feeding the systemd watchdog: {why}");
                    failing = true;
                }
                let status = format!("not alive: {why}");
                if status != last_status {
                    lines.push(status_line(&status));
                    last_status = status;
                }
            }
        }
        if !lines.is_empty() {
            notifier.send(&lines);
        }
    }
}

/// Extra stop time asked for beyond the grace period: settling the last results and saying
/// goodbye on the event channel.
const STOP_MARGIN: Duration = Duration::from_secs(10);

/// The fetch loops may stand still this long, with a slot free, before the worker counts as
/// wedged. Idle loops turn every few ms and a failing fetch retries within 5 s.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// The worker under systemd, until `done`: `READY=1` once it consumes, then the status line and
/// the watchdog (fed while Redis answers and the fetch loops move), and `STOPPING=1` with the
/// grace period when `shutdown` begins.
pub async fn attend_worker<R: ResultStore>(
    notifier: Arc<Notifier>,
    worker: Arc<Worker<RedisBroker, R>>,
    broker: RedisBroker,
    grace: Duration,
    shutdown: CancellationToken,
    done: CancellationToken,
) {
    if !notifier.enabled() {
        return;
    }
    tokio::select! {
        _ = worker.ready() => {}
        _ = done.cancelled() => return,
    }
    let check = |budget: Duration| worker_status(&worker, &broker, budget);
    let first = check(STOP_MARGIN).await.unwrap_or_else(|why| format!("started, but {why}"));
    notifier.ready(&first);
    let stopping = async {
        shutdown.cancelled().await;
        notifier.stopping(grace + STOP_MARGIN, &draining(worker.load().active));
        std::future::pending::<()>().await
    };
    tokio::select! {
        _ = supervise(&notifier, done.clone(), check) => {}
        _ = stopping => {}
    }
}

fn draining(running: usize) -> String {
    format!("stopping: draining {running} running task(s)")
}

/// The worker's status line, or why it is not alive.
async fn worker_status<R: ResultStore>(
    worker: &Worker<RedisBroker, R>,
    broker: &RedisBroker,
    budget: Duration,
) -> Result<String, String> {
    let limit = STALL_LIMIT.max(budget * 2);
    if let Some(why) = worker.stalled(limit) {
        return Err(why);
    }
    let queues = crate::control::Node::queues(worker);
    let lengths = async {
        let mut conn = broker.conn();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        let mut queued = 0;
        for q in &queues {
            queued += broker.queue_len(q).await?;
        }
        Ok::<u64, crate::broker::BrokerError>(queued)
    };
    let queued = match tokio::time::timeout(budget / 2, lengths).await {
        Ok(Ok(n)) => n,
        Ok(Err(e)) => return Err(format!("Redis: {e}")),
        Err(_) => return Err(format!("Redis did not answer within {:?}", budget / 2)),
    };
    let running = worker.load().active;
    if worker.is_shutting_down() {
        return Ok(draining(running));
    }
    Ok(format!("{running} running, {queued} queued on {}", queues.join(", ")))
}

/// A beat under systemd, until `stop`: `READY=1` now (the broker answered), then the watchdog,
/// fed while the beat's ticks reach Redis, and `STOPPING=1` when it stops.
pub async fn attend_beat(
    notifier: &Notifier,
    pulse: Arc<crate::beat::Pulse>,
    entries: usize,
    stop: CancellationToken,
) {
    use std::sync::atomic::Ordering::Relaxed;
    if !notifier.enabled() {
        return;
    }
    notifier.ready(&format!("{entries} entries; standing by"));
    // Counted from now until the first tick lands.
    let started = chrono::Utc::now().timestamp_millis();
    let check = |budget: Duration| {
        let pulse = pulse.clone();
        async move {
            let last = pulse.ok_ms.load(Relaxed).max(started);
            let since = chrono::Utc::now().timestamp_millis() - last;
            let limit = (crate::beat::TICK_EVERY * 3).max(budget * 2);
            if since > limit.as_millis() as i64 {
                return Err(format!("no tick reached Redis for {:.1}s", since as f64 / 1000.0));
            }
            let fired = pulse.fired.load(Relaxed);
            Ok(match pulse.leader.load(Relaxed) {
                true => format!("{entries} entries; leading, {fired} fired since start"),
                false => format!("{entries} entries; standing by, {fired} fired since start"),
            })
        }
    };
    supervise(notifier, stop.clone(), check).await;
    notifier.stopping(STOP_MARGIN, "stopping: giving up the lease");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bound() -> (tempfile::TempDir, UnixDatagram, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (dir, socket, path)
    }

    fn recv(socket: &UnixDatagram) -> String {
        let mut buf = [0u8; 4096];
        let n = socket.recv(&mut buf).unwrap();
        String::from_utf8(buf[..n].to_vec()).unwrap()
    }

    #[test]
    fn ready_and_stopping_are_one_datagram_each_with_a_one_line_status() {
        let (_dir, socket, path) = bound();
        let n = Notifier::new(Some(path.as_os_str()), None, None);
        n.ready("consuming 2 queues\nforged=1");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=consuming 2 queues forged=1\n");
        n.stopping(Duration::from_secs(30), "draining 1 task");
        assert_eq!(
            recv(&socket),
            "STOPPING=1\nEXTEND_TIMEOUT_USEC=30000000\nSTATUS=draining 1 task\n"
        );
    }

    #[test]
    fn an_abstract_socket_is_reached_by_its_at_name() {
        let name = format!("celeriac-test-{}", uuid::Uuid::new_v4().simple());
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let socket = UnixDatagram::bind_addr(&addr).unwrap();
        socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let at = format!("@{name}");
        Notifier::new(Some(std::ffi::OsStr::new(&at)), None, None).ready("up");
        assert_eq!(recv(&socket), "READY=1\nSTATUS=up\n");
    }

    #[test]
    fn the_watchdog_is_half_the_timeout_and_only_for_the_named_pid() {
        let mine = std::process::id().to_string();
        let half = |usec, pid| Notifier::new(None, usec, pid).watchdog_every();
        assert_eq!(half(Some("2000000"), None), Some(Duration::from_secs(1)));
        assert_eq!(half(Some("2000000"), Some(mine.as_str())), Some(Duration::from_secs(1)));
        assert_eq!(half(Some("2000000"), Some("1")), None);
        assert_eq!(half(Some("0"), None), None);
        assert_eq!(half(Some("soon"), None), None);
        assert_eq!(half(None, None), None);
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_fails() {
        let n = Notifier::new(None, Some("2000000"), None);
        assert!(!n.enabled());
        n.ready("up");
        n.stopping(Duration::from_secs(1), "down");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watchdog_is_fed_only_while_the_check_passes() {
        let (_dir, socket, path) = bound();
        // A 200 ms timeout: ticks every 100 ms.
        let n = Notifier::new(Some(path.as_os_str()), Some("200000"), None);
        let alive = std::sync::Arc::new(AtomicBool::new(true));
        let stop = CancellationToken::new();
        let check = {
            let alive = alive.clone();
            move |_: Duration| {
                let ok = alive.load(Ordering::Relaxed);
                async move { if ok { Ok("2 running".to_string()) } else { Err("wedged".into()) } }
            }
        };
        let supervisor = {
            let stop = stop.clone();
            tokio::spawn(async move { supervise(&n, stop, check).await })
        };
        // One datagram within `within`, read off the async threads.
        let within = move |within: Duration| {
            let socket = socket.try_clone().unwrap();
            async move {
                tokio::task::spawn_blocking(move || {
                    socket.set_read_timeout(Some(within)).unwrap();
                    let mut buf = [0u8; 4096];
                    let n = socket.recv(&mut buf).ok()?;
                    Some(String::from_utf8(buf[..n].to_vec()).unwrap())
                })
                .await
                .unwrap()
            }
        };
        let next = || async { within(Duration::from_secs(5)).await.expect("a datagram") };
        assert_eq!(next().await, "WATCHDOG=1\nSTATUS=2 running\n");
        assert_eq!(next().await, "WATCHDOG=1\n");
        alive.store(false, Ordering::Relaxed);
        // Perhaps one more tick that checked before the flip, then the starving status.
        let mut message = next().await;
        if message == "WATCHDOG=1\n" {
            message = next().await;
        }
        assert_eq!(message, "STATUS=not alive: wedged\n");
        // Nothing while it stays wedged: no watchdog, and the same status is not repeated.
        let quiet = within(Duration::from_millis(350)).await;
        assert_eq!(quiet, None);
        alive.store(true, Ordering::Relaxed);
        assert_eq!(next().await, "WATCHDOG=1\nSTATUS=2 running\n");
        stop.cancel();
        supervisor.await.unwrap();
    }
}
