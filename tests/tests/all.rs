//! celeriac's integration tests, one module per concern.

mod beat;
mod broker;
mod canvas;
mod cli;
mod config;
mod deploy;
mod faults;
mod hardening;
mod http_api;
mod interop;
mod languages;
mod monitoring;
mod postgres;
mod production_redis;
mod sandbox;
mod scripts;
mod sentinel;
mod systemd;
mod tasks;
mod worker;
