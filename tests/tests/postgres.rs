//! Results in PostgreSQL (`db+postgresql://`), as Celery's database backend keeps them: a real
//! server of the test's own, a real worker, and the real Python client reading the results with
//! `backend="db+postgresql://..."`. The broker stays Redis. One conformance suite runs against
//! both result stores.

use crate::interop::celery_client;
use celeriac::broker::ResultStore as _;
use celeriac::results::{ResultBackend, ResultTarget, StoredResult};
use celeriac_tests::postgres::PgServer;
use celeriac_tests::{Reaped, RedisServer, celeriac_binary, repo_root, test_cache_dir};
use serde_json::{Value, json};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn worker(redis: &RedisServer, pg: &PgServer, args: &[&str]) -> Reaped {
    Reaped(
        Command::new(celeriac_binary())
            .args(args)
            .args(["worker", "-Q", "default", "-c", "2"])
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .env("CELERY_RESULT_BACKEND", pg.celery_url())
            .env("CELERIAC_CACHE", test_cache_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// `columns` of `id`'s row in `celery_taskmeta`, read with a client of the test's own.
fn task_row(pg: &PgServer, columns: &str, id: &str) -> Option<tokio_postgres::Row> {
    let (url, id) = (pg.url(), id.to_string());
    let sql = format!("SELECT {columns} FROM celery_taskmeta WHERE task_id = $1");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async move {
        let (client, connection) =
            tokio_postgres::connect(&url, tokio_postgres::NoTls).await.unwrap();
        tokio::spawn(connection);
        client.query_opt(&sql, &[&id]).await.unwrap()
    })
}

/// Status, the result column's bytes, and whether date_done is set.
fn row(pg: &PgServer, id: &str) -> Option<(String, Vec<u8>, bool)> {
    let row = task_row(pg, "status, result, date_done IS NOT NULL", id)?;
    Some((row.get(0), row.get(1), row.get(2)))
}

/// The extended columns: name, args, worker, retries, queue.
fn extended(pg: &PgServer, id: &str) -> (String, Vec<u8>, String, i32, String) {
    let row = task_row(pg, "name, args, worker, retries, queue", id).expect("the row");
    (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4))
}

#[test]
fn a_python_client_reads_celeriac_results_and_failures_from_postgresql() {
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let _worker = worker(&redis, &pg, &[]);
    let env = [("CELERY_BROKER_URL", redis.url(0)), ("CELERY_RESULT_BACKEND", pg.celery_url())];

    let value = json!({"a": [1, 2.5, null, "x"], "b": true});
    let got = celery_client(&env, &["get", "diagnostics.noop", &format!("[{value}]"), "{}"], None);
    assert_eq!(got["result"], value, "{got}");
    let (status, result, dated) = row(&pg, got["id"].as_str().unwrap()).unwrap();
    assert_eq!((status.as_str(), result[0], dated), ("SUCCESS", 0x80, true), "a pickle by default");

    let got = celery_client(&env, &["get", "diagnostics.fail", "[\"no\"]", "{}"], None);
    assert_eq!(
        (got["exc_type"].as_str(), got["message"].as_str()),
        (Some("ValueError"), Some("no")),
        "{got}"
    );

    // The database restarts under the worker: the next results still land.
    pg.restart();
    let got = celery_client(&env, &["get", "diagnostics.noop", "[\"after restart\"]", "{}"], None);
    assert_eq!(got["result"], "after restart", "{got}");
}

#[test]
fn the_json_column_variant_extended_columns_and_expiry_on_a_schedule() {
    let redis = RedisServer::start();
    let pg = PgServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("celeriac.toml");
    std::fs::write(
        &config,
        format!(
            "modules = \"{}\"\n[result_backend]\nurl = \"{}\"\nserializer = \"json\"\nextended = true\n",
            repo_root().join("target/tasks").display(),
            pg.celery_url()
        ),
    )
    .unwrap();
    let _worker = Reaped(
        Command::new(celeriac_binary())
            .args([
                "--config",
                config.to_str().unwrap(),
                "worker",
                "-Q",
                "default",
                "--result-expires",
                "3s",
            ])
            .current_dir(repo_root())
            .env("CELERY_BROKER_URL", redis.url(0))
            .env_remove("CELERY_RESULT_BACKEND")
            .env("CELERIAC_CACHE", test_cache_dir())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let env = [("CELERY_BROKER_URL", redis.url(0)), ("CELERY_RESULT_BACKEND", pg.celery_url())];
    let got = celery_client(&env, &["get", "diagnostics.noop", "[[7, \"seven\"]]", "{}"], None);
    assert_eq!(got["result"], json!([7, "seven"]), "{got}");
    let id = got["id"].as_str().unwrap().to_string();
    let (_, result, _) = row(&pg, &id).unwrap();
    assert_eq!(serde_json::from_slice::<Value>(&result).unwrap(), json!([7, "seven"]));
    // Celery's extended columns, filled as its database backend fills them.
    let (name, args, worker, retries, queue) = extended(&pg, &id);
    assert_eq!((name.as_str(), retries, queue.as_str()), ("diagnostics.noop", 0, "default"));
    assert_eq!(serde_json::from_slice::<Value>(&args).unwrap(), json!([[7, "seven"]]));
    assert!(worker.starts_with("celeriac@"), "{worker}");

    // result_expires is 3 s: the worker deletes the row within a few seconds after that.
    let deadline = Instant::now() + Duration::from_secs(20);
    while row(&pg, &id).is_some() {
        assert!(Instant::now() < deadline, "the expired result is still there");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// What every result store must do, whatever keeps the results.
async fn conformance(results: ResultBackend) {
    let meta = |id: &str, status: &str, result: Value| StoredResult {
        id: id.to_string(),
        meta: celeriac::protocol::result_meta(id, status, result, None, &[]),
    };
    let id = uuid::Uuid::new_v4().to_string();
    assert_eq!(results.get(&id).await.unwrap(), None, "nothing stored reads as PENDING");
    assert!(!results.known(&id).await.unwrap());

    // The last state of a batch wins; a stored SUCCESS is never overwritten.
    let (started, success) =
        (meta(&id, "STARTED", Value::Null), meta(&id, "SUCCESS", json!({"n": 1})));
    results.store(&[&started, &success]).await.unwrap();
    let again = meta(&id, "STARTED", Value::Null);
    results.store(&[&again]).await.unwrap();
    let got: Value = serde_json::from_str(&results.get(&id).await.unwrap().unwrap()).unwrap();
    assert_eq!(
        (got["status"].as_str(), &got["result"]),
        (Some("SUCCESS"), &json!({"n": 1})),
        "{got}"
    );
    assert!(got["date_done"].is_string(), "{got}");
    assert!(results.known(&id).await.unwrap());

    // A waiter sees a result stored while it waits.
    let other = uuid::Uuid::new_v4().to_string();
    results.remember(&other).await.unwrap();
    assert!(results.known(&other).await.unwrap());
    let waiter = {
        let (results, other) = (results.clone(), other.clone());
        tokio::spawn(async move { results.wait_ready(&other, Duration::from_secs(10)).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failure = meta(&other, "FAILURE", json!({"exc_type": "ValueError", "exc_message": ["no"]}));
    results.store(&[&failure]).await.unwrap();
    let got: Value = serde_json::from_str(&waiter.await.unwrap().unwrap().unwrap()).unwrap();
    assert_eq!(got["result"]["exc_type"], "ValueError", "{got}");
    // A waiter gives up at its timeout with what is there.
    let none = uuid::Uuid::new_v4().to_string();
    assert_eq!(results.wait_ready(&none, Duration::from_millis(200)).await.unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_result_stores_pass_the_same_conformance_suite() {
    let redis = RedisServer::start();
    let pg = PgServer::start();
    conformance(ResultBackend::connect(&redis.url(1), "", Duration::from_secs(60)).await.unwrap())
        .await;
    let spec = celeriac::results::PgSpec::parse(&pg.celery_url(), Default::default(), false);
    let target = ResultTarget::Postgres {
        spec: Box::new(spec.unwrap()),
        broker: celeriac::endpoint::Endpoint::parse(&redis.url(0), &Default::default()).unwrap(),
    };
    conformance(ResultBackend::open(&target, "", Duration::from_secs(60)).await.unwrap()).await;
}
