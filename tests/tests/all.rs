//! celeriac's integration tests, one module per concern.

mod sandbox;
