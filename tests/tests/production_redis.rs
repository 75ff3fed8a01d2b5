//! Production Redis as Celery users reach it: TLS (mutual, a wrong CA, `ssl_cert_reqs=none`), an
//! ACL user with exactly the rights the README documents, a Unix socket, a `;` failover list.
//! Every server is a real `redis-server` of the test's own; every URL is written as kombu takes
//! it, and the real Python client uses the same URL.

use crate::interop::celery_client;
use celeriac_tests::tls::Certs;
use celeriac_tests::{Reaped, RedisServer, celeriac_binary, free_port, repo_root, test_cache_dir};
use std::process::{Command, Output, Stdio};

/// The password the tests give the `celeriac` ACL user.
const PASSWORD: &str = "s3cret-pw";

/// The README's ACL rule for celeriac, as `redis-server --user` arguments.
fn documented_acl() -> Vec<String> {
    let readme = std::fs::read_to_string(repo_root().join("README.md")).unwrap();
    let line = readme
        .lines()
        .find(|l| l.trim_start().starts_with("ACL SETUSER celeriac "))
        .expect("the README gives the ACL line for celeriac");
    let rule = line.trim().trim_start_matches("ACL SETUSER ");
    rule.split_whitespace().map(|w| w.replace(">PASSWORD", &format!(">{PASSWORD}"))).collect()
}

/// A TLS-only server (no plain port) with `certs`; `clients` is `yes` (mutual TLS) or `optional`.
fn tls_server(certs: &Certs, clients: &str) -> RedisServer {
    let port = free_port();
    let path = |n: &str| certs.path(n).display().to_string();
    let mut args: Vec<String> = [
        "--port",
        "0",
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &path("server.crt"),
        "--tls-key-file",
        &path("server.key"),
        "--tls-ca-cert-file",
        &path("ca.crt"),
        "--tls-auth-clients",
        clients,
        "--user",
    ]
    .map(String::from)
    .to_vec();
    args.extend(documented_acl());
    RedisServer::start_with(port, &args)
}

fn celeriac(url: &str, args: &[&str]) -> Output {
    Command::new(celeriac_binary())
        .args(args)
        .current_dir(repo_root())
        .env("CELERY_BROKER_URL", url)
        .env("CELERY_RESULT_BACKEND", url)
        .env("CELERIAC_CACHE", test_cache_dir())
        .env_remove("CELERIAC_CONFIG")
        .output()
        .expect("run celeriac")
}

fn worker(broker: &str, results: &str) -> Reaped {
    Reaped(
        Command::new(celeriac_binary())
            .args(["worker", "-Q", "default", "-c", "2"])
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", broker)
            .env("CELERY_RESULT_BACKEND", results)
            .env("CELERIAC_CACHE", test_cache_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_python_client_and_a_worker_share_redis_over_mutual_tls_as_an_acl_user() {
    let certs = Certs::make();
    let redis = tls_server(&certs, "yes");
    let p = |n: &str| certs.path(n).display().to_string();
    let tls = format!(
        "ssl_cert_reqs=required&ssl_ca_certs={}&ssl_certfile={}&ssl_keyfile={}",
        p("ca.crt"),
        p("client.crt"),
        p("client.key")
    );
    let url = |db| format!("rediss://celeriac:{PASSWORD}@localhost:{}/{db}?{tls}", redis.port);
    let _worker = worker(&url(0), &url(1));
    let env = [("CELERY_BROKER_URL", url(0)), ("CELERY_RESULT_BACKEND", url(1))];

    let got = celery_client(&env, &["get", "diagnostics.noop", "[7]", "{}"], None);
    assert_eq!(got["result"], 7, "{got}");
    let got = celery_client(&env, &["get", "diagnostics.fail", "[\"no\"]", "{}"], None);
    assert_eq!(
        (got["exc_type"].as_str(), got["message"].as_str()),
        (Some("ValueError"), Some("no")),
        "{got}"
    );
    // Remote control and its replies travel on pub/sub channels the ACL user must be granted.
    let got = celery_client(&env, &["ping"], None);
    assert_eq!(got["replies"].as_array().map(Vec::len), Some(1), "{got}");

    // Without a client certificate the server refuses the handshake.
    let bare = format!(
        "rediss://celeriac:{PASSWORD}@localhost:{}/0?ssl_ca_certs={}",
        redis.port,
        p("ca.crt")
    );
    let out = celeriac(&bare, &["worker", "--check"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("connect to Redis at rediss://celeriac:**@localhost"),
        "{}",
        stderr(&out)
    );
    assert!(!stderr(&out).contains(PASSWORD), "{}", stderr(&out));
}

#[test]
fn certificates_are_verified_and_a_refusal_says_how_to_match_kombu() {
    let certs = Certs::make();
    let redis = tls_server(&certs, "optional");
    let p = |n: &str| certs.path(n).display().to_string();
    let at = |host: &str, query: &str| {
        format!("rediss://celeriac:{PASSWORD}@{host}:{}/0?{query}", redis.port)
    };

    // A CA that did not sign the server's certificate.
    let out = celeriac(
        &at("localhost", &format!("ssl_ca_certs={}", p("other-ca.crt"))),
        &["worker", "--check"],
    );
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("TLS certificate was refused") && text.contains("ssl_ca_certs"),
        "{text}"
    );

    // No CA given: the system's roots do not know the test CA, and the error says how kombu
    // behaves and how to match it.
    let out = celeriac(&at("localhost", ""), &["worker", "--check"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("ssl_cert_reqs=none") && text.contains("kombu"), "{text}");

    // ssl_cert_reqs=none connects, as kombu's default does.
    let out = celeriac(&at("localhost", "ssl_cert_reqs=none"), &["worker", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));

    // The certificate names 127.0.0.1 too; a name it does not carry needs ssl_check_hostname.
    let ca = format!("ssl_ca_certs={}", p("ca.crt"));
    let out = celeriac(&at("127.0.0.1", &ca), &["worker", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = celeriac(&at("localhost.localdomain", &ca), &["worker", "--check"]);
    if std::net::ToSocketAddrs::to_socket_addrs(&("localhost.localdomain", 1)).is_ok() {
        assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
        let unchecked = format!("{ca}&ssl_check_hostname=false");
        let out = celeriac(&at("localhost.localdomain", &unchecked), &["worker", "--check"]);
        assert!(out.status.success(), "{}", stderr(&out));
    }

    // A wrong password is said as Redis says it, without the password.
    let out = celeriac(
        &format!("rediss://celeriac:wrong@localhost:{}/0?{ca}", redis.port),
        &["worker", "--check"],
    );
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("authentication failed") && !text.contains("wrong@"), "{text}");
}

#[test]
fn a_unix_socket_url_and_a_failover_list_work_as_kombu_writes_them() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("redis.sock");
    let port = free_port();
    let redis = RedisServer::start_with(
        port,
        &[
            "--port",
            &port.to_string(),
            "--unixsocket",
            socket.to_str().unwrap(),
            "--unixsocketperm",
            "700",
        ]
        .map(String::from),
    );
    let url = |db| format!("redis+socket://{}?virtual_host={db}", socket.display());
    let _worker = worker(&url(0), &url(1));
    let env = [("CELERY_BROKER_URL", url(0)), ("CELERY_RESULT_BACKEND", url(1))];
    let got = celery_client(&env, &["get", "diagnostics.noop", "[\"socket\"]", "{}"], None);
    assert_eq!(got["result"], "socket", "{got}");
    // Both used database 0 over the socket: the worker's lease set and the client's binding.
    let mut c = redis.client(0);
    let keys: Vec<String> = redis::Commands::keys(&mut c, "*").unwrap();
    assert!(keys.iter().any(|k| k == "_kombu.binding.default"), "{keys:?}");

    // A list whose first server is down: the worker takes the next, as kombu's round-robin does.
    let dead = free_port();
    let list = |db| format!("redis://127.0.0.1:{dead}/{db};redis://127.0.0.1:{port}/{db}");
    let out = celeriac(&list(0), &["worker", "--check"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let _second = worker(&list(0), &list(1));
    let out = celeriac(&list(0), &["enqueue", "diagnostics.noop", "--args", "[\"listed\"]"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let id = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let out = celeriac(&list(1), &["status", &id, "--wait", "30s"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && stdout.contains("\"listed\""), "{stdout}{}", stderr(&out));
}

#[test]
fn a_redis_cluster_node_is_refused_at_startup_with_the_reason() {
    let port = free_port();
    let _redis = RedisServer::start_with(
        port,
        &["--port", &port.to_string(), "--cluster-enabled", "yes"].map(String::from),
    );
    let out = celeriac(&format!("redis://127.0.0.1:{port}/0"), &["worker", "--check"]);
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("is a Redis Cluster node") && text.contains("Sentinel"), "{text}");
}
