//! The key-value store behind the tasks' `kv` import.
//!
//! Every task that is granted `kv` gets one namespace; the host prefixes each key with it, so a
//! task can neither see nor touch another namespace. Workers keep it in Redis under
//! `celeriac:kv:<namespace>:<key>`; `celeriac run` and tests use the in-memory store (optionally
//! saved to a file between runs).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Longest key a task may use, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Largest value a task may store, in bytes: big enough for an index shard, small enough that a
/// runaway task cannot fill the store in one call.
pub const MAX_VALUE_BYTES: usize = 8 << 20;
/// Most members one `set_add` call may add, and their most bytes in all: the same bound on what
/// one call can store as [`MAX_VALUE_BYTES`] puts on `set`.
pub const MAX_SET_ADD_MEMBERS: usize = 100_000;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KvError {
    /// The task passed a key or value the store refuses.
    #[error("{0}")]
    Invalid(String),
    /// The store could not be reached or failed.
    #[error("{0}")]
    Unavailable(String),
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Contents {
    /// Values, hex-encoded so the file stays valid JSON for any bytes.
    values: BTreeMap<String, String>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

/// A shared store; cloning shares it.
#[derive(Clone)]
pub struct KvStore {
    inner: Arc<Mutex<Contents>>,
    file: Option<PathBuf>,
    redis: Option<(crate::endpoint::Conn, String)>,
}

impl std::fmt::Debug for KvStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvStore")
            .field("file", &self.file)
            .field("redis", &self.redis.is_some())
            .finish()
    }
}

fn unavailable(e: redis::RedisError) -> KvError {
    KvError::Unavailable(format!("kv store: {e}"))
}

impl KvStore {
    /// An empty in-memory store.
    pub fn memory() -> Self {
        KvStore { inner: Arc::default(), file: None, redis: None }
    }

    /// A store loaded from `path` (empty if the file does not exist) and saved back by
    /// [`save`](Self::save).
    pub fn file(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let contents = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .with_context(|| format!("kv file {} is not a celeriac kv dump", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Contents::default(),
            Err(e) => return Err(e).with_context(|| format!("read kv file {}", path.display())),
        };
        Ok(KvStore {
            inner: Arc::new(Mutex::new(contents)),
            file: Some(path.to_path_buf()),
            redis: None,
        })
    }

    /// A store in Redis; `prefix` is the global key prefix.
    pub fn redis(conn: crate::endpoint::Conn, prefix: &str) -> Self {
        KvStore {
            inner: Arc::default(),
            file: None,
            redis: Some((conn, format!("{prefix}celeriac:kv:"))),
        }
    }

    fn remote(
        &self,
        ns: &str,
        key: &str,
    ) -> Result<Option<(crate::endpoint::Conn, String)>, KvError> {
        let full = Self::full_key(ns, key)?;
        Ok(self.redis.as_ref().map(|(c, p)| (c.clone(), format!("{p}{full}"))))
    }

    /// Writes a file-backed store back to its file; a no-op for a memory store.
    pub fn save(&self) -> anyhow::Result<()> {
        use anyhow::Context as _;
        let Some(path) = &self.file else { return Ok(()) };
        let json = serde_json::to_vec_pretty(&*self.lock())?;
        std::fs::write(path, json).with_context(|| format!("write kv file {}", path.display()))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Contents> {
        // A panic while holding the lock cannot leave the maps half-updated (each operation is a
        // single map call), so a poisoned lock is still safe to use.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn full_key(namespace: &str, key: &str) -> Result<String, KvError> {
        if key.len() > MAX_KEY_BYTES {
            return Err(KvError::Invalid(format!(
                "key of {} bytes exceeds {MAX_KEY_BYTES}",
                key.len()
            )));
        }
        Ok(format!("{namespace}:{key}"))
    }

    /// Reads a value.
    pub async fn get(&self, ns: &str, key: &str) -> Result<Option<Vec<u8>>, KvError> {
        if let Some((mut c, k)) = self.remote(ns, key)? {
            return redis::AsyncCommands::get(&mut c, k).await.map_err(unavailable);
        }
        let key = Self::full_key(ns, key)?;
        Ok(self.lock().values.get(&key).map(|v| hex::decode(v).unwrap_or_default()))
    }

    /// Writes a value.
    pub async fn set(&self, ns: &str, key: &str, value: &[u8]) -> Result<(), KvError> {
        if value.len() > MAX_VALUE_BYTES {
            return Err(KvError::Invalid(format!(
                "value of {} bytes exceeds {MAX_VALUE_BYTES}",
                value.len()
            )));
        }
        if let Some((mut c, k)) = self.remote(ns, key)? {
            return redis::AsyncCommands::set(&mut c, k, value).await.map_err(unavailable);
        }
        let key = Self::full_key(ns, key)?;
        self.lock().values.insert(key, hex::encode(value));
        Ok(())
    }

    /// Removes keys (values or sets); returns how many existed.
    pub async fn delete(&self, ns: &str, keys: &[String]) -> Result<u32, KvError> {
        if let Some((conn, prefix)) = &self.redis {
            if keys.is_empty() {
                return Ok(0);
            }
            let full: Vec<String> = keys
                .iter()
                .map(|k| Self::full_key(ns, k).map(|f| format!("{prefix}{f}")))
                .collect::<Result<_, _>>()?;
            return redis::AsyncCommands::del(&mut conn.clone(), full).await.map_err(unavailable);
        }
        let mut c = self.lock();
        let mut n = 0;
        for key in keys {
            let key = Self::full_key(ns, key)?;
            if c.values.remove(&key).is_some() | c.sets.remove(&key).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }

    /// Adds members to a set; returns how many were new.
    pub async fn set_add(&self, ns: &str, key: &str, members: &[String]) -> Result<u32, KvError> {
        let bytes: usize = members.iter().map(String::len).sum();
        if members.len() > MAX_SET_ADD_MEMBERS || bytes > MAX_VALUE_BYTES {
            return Err(KvError::Invalid(format!(
                "set_add of {} members ({bytes} bytes) exceeds {MAX_SET_ADD_MEMBERS} members or \
                 {MAX_VALUE_BYTES} bytes per call",
                members.len()
            )));
        }
        if let Some((mut c, k)) = self.remote(ns, key)? {
            if members.is_empty() {
                return Ok(0);
            }
            return redis::AsyncCommands::sadd(&mut c, k, members).await.map_err(unavailable);
        }
        let key = Self::full_key(ns, key)?;
        let mut c = self.lock();
        let set = c.sets.entry(key).or_default();
        Ok(members.iter().filter(|m| set.insert((*m).clone())).count() as u32)
    }

    /// Removes members from a set; returns how many were present.
    pub async fn set_remove(
        &self,
        ns: &str,
        key: &str,
        members: &[String],
    ) -> Result<u32, KvError> {
        if let Some((mut c, k)) = self.remote(ns, key)? {
            if members.is_empty() {
                return Ok(0);
            }
            return redis::AsyncCommands::srem(&mut c, k, members).await.map_err(unavailable);
        }
        let key = Self::full_key(ns, key)?;
        let mut c = self.lock();
        let Some(set) = c.sets.get_mut(&key) else { return Ok(0) };
        let n = members.iter().filter(|m| set.remove(*m)).count() as u32;
        if set.is_empty() {
            c.sets.remove(&key);
        }
        Ok(n)
    }

    /// Lists a set's members.
    pub async fn set_members(&self, ns: &str, key: &str) -> Result<Vec<String>, KvError> {
        if let Some((mut c, k)) = self.remote(ns, key)? {
            return redis::AsyncCommands::smembers(&mut c, k).await.map_err(unavailable);
        }
        let key = Self::full_key(ns, key)?;
        Ok(self.lock().sets.get(&key).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }

    /// Number of keys (values and sets) in a namespace; for tests and diagnostics.
    pub fn len(&self, ns: &str) -> usize {
        let prefix = format!("{ns}:");
        let c = self.lock();
        c.values.keys().chain(c.sets.keys()).filter(|k| k.starts_with(&prefix)).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn namespaces_do_not_see_each_other() {
        let kv = KvStore::memory();
        kv.set("a", "k", b"1").await.unwrap();
        assert_eq!(kv.get("a", "k").await.unwrap(), Some(b"1".to_vec()));
        assert_eq!(kv.get("b", "k").await.unwrap(), None);
        kv.set_add("a", "s", &["x".into(), "y".into()]).await.unwrap();
        assert!(kv.set_members("b", "s").await.unwrap().is_empty());
        assert_eq!(kv.delete("b", &["k".into()]).await.unwrap(), 0);
        assert_eq!(kv.len("a"), 2);
    }

    #[tokio::test]
    async fn file_store_survives_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kv.json");
        let kv = KvStore::file(&path).unwrap();
        kv.set("ns", "bin", &[0, 255, 7]).await.unwrap();
        kv.set_add("ns", "set", &["m".into()]).await.unwrap();
        kv.save().unwrap();
        let again = KvStore::file(&path).unwrap();
        assert_eq!(again.get("ns", "bin").await.unwrap(), Some(vec![0, 255, 7]));
        assert_eq!(again.set_members("ns", "set").await.unwrap(), vec!["m".to_string()]);
    }

    #[tokio::test]
    async fn oversized_values_are_refused() {
        let kv = KvStore::memory();
        let big = vec![0u8; MAX_VALUE_BYTES + 1];
        assert!(matches!(kv.set("ns", "k", &big).await, Err(KvError::Invalid(_))));
    }
}
