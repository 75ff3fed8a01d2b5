//! celeriac's integration tests, one module per concern.

mod broker;
mod cli;
mod config;
mod faults;
mod interop;
mod sandbox;
mod scripts;
mod tasks;
mod worker;
