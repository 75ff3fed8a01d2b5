//! celeriac: a Celery-compatible task worker that runs every task as a sandboxed WebAssembly
//! component.
//!
//! # Layout
//!
//! - [`runtime`]: the sandbox. One wasmtime engine, the linker with every host import, the
//!   compiled-module cache, per-task limits, and [`runtime::Runtime::run`], which runs one task
//!   in a fresh instance and classifies its [`runtime::Outcome`].
//! - [`config`]: the TOML configuration, validated whole before anything runs, resolved per task
//!   into limits and grants.
//! - [`registry`]: the loaded modules and which task each one serves.
//! - [`reload`]: a running worker's modules folder watched and its configuration re-read on
//!   SIGHUP, each swapped in as a new registry.
//! - [`kv`]: the store behind the tasks' key-value import.
//! - [`worker`]: the worker loop and the life of one task, top to bottom.
//! - [`lifecycle`]: the one stream of task events the worker emits, and its subscriber trait.
//! - [`events`]: Celery events (worker heartbeats, task events) for Flower and `celery events`.
//! - [`repr`]: Python's `repr` of JSON values, for the text Celery shows.
//! - [`metrics`]: Prometheus metrics, a lifecycle subscriber plus gauges read at scrape time.
//! - [`api`]: the worker's HTTP server (`--http`): probes and `/metrics`.
//! - [`protocol`]: Celery's wire format (kombu envelope, protocol-v2 messages, result meta).
//! - [`broker`]: kombu's Redis layout: fetch, ack, leases, restore, scheduling, revocation.
//! - [`results`]: the Celery result backend on Redis.
//! - [`client`]: enqueue, status, revoke and dead-letter commands.
//! - [`demo`]: `celeriac demo`, the example tasks end to end in one process.
//! - [`control`]: Celery's remote control (`inspect`, `revoke`, ...) over the pidbox channel.
//! - [`systemd`]: the service manager's notify protocol: readiness, status, a watchdog fed only
//!   while the worker is alive, stopping.
//! - [`units`]: human durations and sizes (`5m`, `64MiB`).
//! - [`cli`]: the `celeriac` command line.
#![warn(missing_docs)]

pub mod api;
pub mod beat;
pub mod broker;
pub mod canvas;
pub mod cli;
pub mod client;
pub mod config;
pub mod control;
pub mod demo;
pub mod endpoint;
pub mod events;
pub mod kv;
pub mod lifecycle;
pub mod metrics;
pub mod overview;
pub mod protocol;
pub mod registry;
pub mod reload;
pub mod repr;
pub mod results;
pub mod runtime;
pub mod systemd;
pub mod tail;
pub mod units;
pub mod worker;

/// Where `cargo build` put the example task components (`target/tasks`).
pub const BUILT_TASKS_DIR: &str = env!("CELERIAC_BUILT_TASKS_DIR");

/// Where `cargo build` put the hostile test fixtures (`target/fixtures`).
pub const BUILT_FIXTURES_DIR: &str = env!("CELERIAC_BUILT_FIXTURES_DIR");
