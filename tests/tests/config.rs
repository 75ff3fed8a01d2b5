//! Configuration: layering, human units, and errors that name the file, the key and the problem.

use celeriac::config::{Config, Overrides, TaskSettings};
use celeriac::registry::Registry;
use celeriac::units::ByteSize;
use std::path::Path;
use std::time::Duration;

fn parse(text: &str) -> Result<Config, String> {
    Config::parse(text, Path::new("test.toml"), &Overrides::default()).map_err(|e| e.to_string())
}

#[test]
fn unknown_keys_and_bad_units_name_the_file_and_key() {
    let e = parse("[defaults]\nmemroy = \"64MiB\"\n").unwrap_err();
    assert!(e.contains("test.toml") && e.contains("memroy"), "{e}");
    let e = parse("[tasks.\"a.b\"]\nmemory = \"64XB\"\n").unwrap_err();
    assert!(e.contains("test.toml") && e.contains("invalid size \"64XB\""), "{e}");
    assert!(e.contains("line 2"), "{e}");
    let e = parse("[defaults]\nrate_limit = \"fast\"\n").unwrap_err();
    assert!(e.contains("invalid rate limit"), "{e}");
}

#[test]
fn every_problem_is_reported_at_once() {
    let e = parse(
        "[defaults]\nsoft_time_limit = \"2m\"\nhard_time_limit = \"1m\"\n\
         [tasks.\"x\"]\nmemory = \"8GiB\"\nretry_on = [\"sometimes\"]\nkv = \"no spaces\"\n",
    )
    .unwrap_err();
    for expected in [
        "test.toml: defaults.soft_time_limit: 120s must be shorter",
        "test.toml: tasks.\"x\".memory",
        "test.toml: tasks.\"x\".retry_on: unknown outcome \"sometimes\"",
        "test.toml: tasks.\"x\".kv",
    ] {
        assert!(e.contains(expected), "missing {expected:?} in:\n{e}");
    }
}

#[test]
fn missing_preopen_folder_is_an_error_unless_created() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("c.toml");
    let text = "[tasks.\"t\"]\npreopens = [{ host = \"scratch\", guest = \"/s\" }]\n";
    let e = Config::parse(text, &file, &Overrides::default()).unwrap_err().to_string();
    assert!(e.contains("does not exist"), "{e}");
    let text =
        "[tasks.\"t\"]\npreopens = [{ host = \"scratch\", guest = \"/s\", create = true }]\n";
    Config::parse(text, &file, &Overrides::default()).unwrap();
    assert!(dir.path().join("scratch").is_dir(), "relative to the config file");
}

#[tokio::test]
async fn settings_layer_from_defaults_through_describe_to_task_table_and_flags() {
    let text = format!(
        "modules = {:?}\n[defaults]\nmemory = \"32MiB\"\nmax_retries = 1\nlog = true\n\
         [tasks.\"diagnostics.noop\"]\nqueue = \"fast\"\nhard_time_limit = \"2s\"\n",
        celeriac::BUILT_TASKS_DIR
    );
    let overrides = Overrides {
        task: TaskSettings { memory: Some(ByteSize(48 << 20)), ..TaskSettings::default() },
        ..Overrides::default()
    };
    let mut config = Config::parse(&text, Path::new("layers.toml"), &overrides).unwrap();
    config.cache = Some(celeriac_tests::test_cache_dir());
    let reg = Registry::load(&config, 2).await.unwrap();
    let noop = &reg.get("diagnostics.noop").unwrap().spec;
    assert_eq!(noop.queue, "fast", "task table beats describe's `default`");
    assert_eq!(noop.limits.hard_time_limit, Duration::from_secs(2));
    assert_eq!(noop.limits.memory, 48 << 20, "flags beat everything");
    assert_eq!(noop.retry.max_retries, 1, "from [defaults]");
    assert!(noop.grants.log && !noop.grants.progress && noop.grants.kv.is_none());
    let flaky = &reg.get("diagnostics.flaky").unwrap().spec;
    assert_eq!(flaky.queue, "default", "describe's queue");
    assert_eq!(flaky.retry.max_retries, 5, "describe beats [defaults]");
}

#[tokio::test]
async fn a_configured_task_that_no_module_serves_stops_startup() {
    let text = format!(
        "modules = {:?}\n[tasks.\"diagnostics.nope\"]\nqueue = \"x\"\n",
        celeriac::BUILT_TASKS_DIR
    );
    let mut config = Config::parse(&text, Path::new("typo.toml"), &Overrides::default()).unwrap();
    config.cache = Some(celeriac_tests::test_cache_dir());
    let e = Registry::load(&config, 1).await.err().expect("an error").to_string();
    assert!(e.contains("typo.toml: tasks.\"diagnostics.nope\": no module"), "{e}");
}

#[tokio::test]
async fn a_task_served_by_two_modules_must_be_disambiguated() {
    let dir = tempfile::tempdir().unwrap();
    let wasm = Path::new(celeriac::BUILT_TASKS_DIR).join("diagnostics.wasm");
    std::fs::copy(&wasm, dir.path().join("one.wasm")).unwrap();
    std::fs::copy(&wasm, dir.path().join("two.wasm")).unwrap();
    let text = format!("modules = {:?}\n", dir.path());
    let mut config = Config::parse(&text, Path::new("dup.toml"), &Overrides::default()).unwrap();
    config.cache = Some(celeriac_tests::test_cache_dir());
    let e = Registry::load(&config, 1).await.err().expect("an error").to_string();
    assert!(
        e.contains("served by both") && e.contains("one.wasm") && e.contains("two.wasm"),
        "{e}"
    );
    let text = format!(
        "modules = {:?}\n[tasks.\"diagnostics.noop\"]\nmodule = \"two\"\n\
         [tasks.\"diagnostics.fail\"]\nmodule = \"one\"\n[tasks.\"diagnostics.flaky\"]\nmodule = \"one\"\n\
         [tasks.\"diagnostics.sleep\"]\nmodule = \"one\"\n[tasks.\"diagnostics.spin\"]\nmodule = \"one\"\n\
         [tasks.\"diagnostics.add\"]\nmodule = \"one\"\n[tasks.\"diagnostics.tsum\"]\nmodule = \"one\"\n\
         [tasks.\"diagnostics.fanout\"]\nmodule = \"one\"\n",
        dir.path()
    );
    let mut config = Config::parse(&text, Path::new("dup.toml"), &Overrides::default()).unwrap();
    config.cache = Some(celeriac_tests::test_cache_dir());
    let reg = Registry::load(&config, 1).await.unwrap();
    assert_eq!(reg.get("diagnostics.noop").unwrap().spec.module, "two");
}

#[tokio::test]
async fn routing_rules_place_tasks_on_queues_below_the_task_table() {
    let text = format!(
        "modules = {:?}\nroutes = [{{ task = \"diagnostics.s*\", queue = \"slow\" }}, {{ task = \"diagnostics.*\", queue = \"diag\" }}]\n\
         [tasks.\"diagnostics.noop\"]\nqueue = \"fast\"\n",
        celeriac::BUILT_TASKS_DIR
    );
    let mut config = Config::parse(&text, Path::new("routes.toml"), &Overrides::default()).unwrap();
    config.cache = Some(celeriac_tests::test_cache_dir());
    let reg = Registry::load(&config, 1).await.unwrap();
    let queue = |t: &str| reg.get(t).unwrap().spec.queue.clone();
    assert_eq!(queue("diagnostics.sleep"), "slow", "first matching rule wins");
    assert_eq!(queue("diagnostics.spin"), "slow");
    assert_eq!(queue("diagnostics.fail"), "diag", "a rule beats the queue the module declares");
    assert_eq!(queue("diagnostics.noop"), "fast", "the task table beats rules");
    let e = parse("routes = [{ task = \"x\" }]\n").unwrap_err();
    assert!(e.contains("queue"), "{e}");
}

/// The repository's beat entries parse, and a bad entry is named with what is wrong.
#[test]
fn beat_entries_parse_and_a_bad_one_names_itself() {
    let path = celeriac_tests::repo_root().join("celeriac.toml");
    let config = Config::load(Some(&path), &Overrides::default()).unwrap();
    let entries = config.beat_entries(|_| "q".into()).unwrap();
    let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["cleanup-expired-sessions", "cleanup-temp-files"]);
    let e = parse("[beat.nightly]\ntask = \"t\"\ncron = \"0 2 * *\"\n").unwrap_err();
    assert!(e.contains("test.toml") && e.contains("\"nightly\"") && e.contains("5 fields"), "{e}");
    let e = parse("[beat.x]\ntask = \"t\"\nevery = \"1m\"\nmissed = \"sometimes\"\n").unwrap_err();
    assert!(e.contains("sometimes"), "{e}");
}

#[test]
fn a_broker_table_carries_kombus_transport_options_and_bad_urls_name_the_key() {
    let config = parse(
        "[broker]\nurl = \"sentinel://:pw@10.0.0.1:26379/2;sentinel://10.0.0.2:26379/2\"\n\
         [broker.transport_options]\nmaster_name = \"mymaster\"\nvisibility_timeout = 3600\n\
         sentinel_kwargs = { password = \"sp\" }\n",
    )
    .unwrap();
    assert_eq!(config.broker_options.master_name.as_deref(), Some("mymaster"));
    assert_eq!(config.broker_options.ignored(), ["visibility_timeout"]);
    // Results on the broker's server follow the broker's Sentinel master.
    assert_eq!(config.result_backend, config.broker);
    assert!(
        matches!(config.result_target().unwrap(), celeriac::results::ResultTarget::Redis(e) if e.db() == 2)
    );

    let e = parse("broker = \"sentinel://10.0.0.1:26379\"\n").unwrap_err();
    assert!(
        e.contains("test.toml: broker sentinel://10.0.0.1:26379: ") && e.contains("master_name"),
        "{e}"
    );
    let e = parse("result_backend = \"redis+cluster://h:7000\"\n").unwrap_err();
    assert!(
        e.contains("test.toml: result_backend ") && e.contains("Redis Cluster is not supported"),
        "{e}"
    );
    let e = parse("broker = \"rediss://u:secret@h/0?ssl_ca_certs=/no/such/ca.pem\"\n").unwrap_err();
    assert!(
        e.contains("rediss://u:**@h/0")
            && e.contains("ssl_ca_certs=/no/such/ca.pem: cannot read it"),
        "{e}"
    );
    assert!(!e.contains("secret"), "{e}");
}
