//! kombu's transport options that decide where celeriac connects: the `[broker.transport_options]`
//! and `[result_backend.transport_options]` tables, or the same as JSON in
//! `CELERY_BROKER_TRANSPORT_OPTIONS` / `CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS`.

use serde::Deserialize;
use std::collections::BTreeMap;

/// The options, with kombu's key names.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct TransportOptions {
    /// The Sentinel master to follow (required with `sentinel://`).
    pub master_name: Option<String>,
    /// How to log in to the sentinels themselves.
    #[serde(default)]
    pub sentinel_kwargs: SentinelKwargs,
    /// A master counts only when at least this many other sentinels watch it.
    pub min_other_sentinels: Option<u64>,
    /// Every other key a Celery app may carry (visibility_timeout, fanout_prefix, ...): they
    /// tune kombu's own transport and are listed in a warning, not refused, so a copied
    /// `broker_transport_options` works.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// redis-py's `sentinel_kwargs`: the connection settings for the sentinels.
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
pub struct SentinelKwargs {
    /// ACL user on the sentinels.
    pub username: Option<String>,
    /// Password on the sentinels (`requirepass` / `sentinel sentinel-pass`).
    pub password: Option<String>,
    /// Speak TLS to the sentinels, with the URL's `ssl_*` settings.
    pub ssl: Option<bool>,
    /// Other redis-py connection keywords (socket_timeout, ...), which celeriac sets itself.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

impl TransportOptions {
    /// Reads the JSON of a `CELERY_*_TRANSPORT_OPTIONS` variable named `var`.
    pub fn from_json(var: &str, text: &str) -> Result<Self, String> {
        serde_json::from_str(text)
            .map_err(|e| format!("{var}: not a JSON object of transport options: {e}"))
    }

    /// The keys celeriac does not use, for a warning.
    pub fn ignored(&self) -> Vec<String> {
        let mut keys: Vec<String> = self.other.keys().cloned().collect();
        keys.extend(self.sentinel_kwargs.other.keys().map(|k| format!("sentinel_kwargs.{k}")));
        keys
    }
}
