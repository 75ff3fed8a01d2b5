//! celeriac's integration tests, one module per concern.

mod cli;
mod config;
mod sandbox;
mod tasks;
mod worker;
