//! The task's key-value namespace.
//!
//! Task logic takes `&mut impl Kv` rather than calling the host directly, so the same code runs
//! against the host's store inside a component ([`HostKv`]) and against [`MemoryKv`] in native
//! unit tests.

use crate::HostError;
use crate::bindings::celeriac::task::kv as host;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, BTreeSet};

/// Operations on a key-value namespace. Set operations are atomic on the host, so concurrent
/// tasks can add to the same set without losing updates.
pub trait Kv {
    /// Reads a value.
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError>;
    /// Writes a value.
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), HostError>;
    /// Removes keys; returns how many existed.
    fn delete(&mut self, keys: &[String]) -> Result<u32, HostError>;
    /// Adds members to a set; returns how many were new.
    fn set_add(&mut self, key: &str, members: &[String]) -> Result<u32, HostError>;
    /// Removes members from a set; returns how many were present.
    fn set_remove(&mut self, key: &str, members: &[String]) -> Result<u32, HostError>;
    /// Lists a set's members, sorted so that results are deterministic.
    fn set_members(&mut self, key: &str) -> Result<Vec<String>, HostError>;

    /// Reads a JSON value.
    fn get_json<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, HostError> {
        match self.get(key)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| HostError::Invalid(format!("value at {key} is not valid JSON: {e}"))),
        }
    }

    /// Writes a JSON value.
    fn set_json<T: Serialize>(&mut self, key: &str, value: &T) -> Result<(), HostError> {
        let bytes = serde_json::to_vec(value).map_err(|e| HostError::Invalid(e.to_string()))?;
        self.set(key, &bytes)
    }
}

/// The host's store, in the namespace the configuration grants.
#[derive(Debug, Clone, Copy, Default)]
pub struct HostKv;

impl Kv for HostKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        host::get(key).map_err(Into::into)
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), HostError> {
        host::set(key, value).map_err(Into::into)
    }
    fn delete(&mut self, keys: &[String]) -> Result<u32, HostError> {
        host::delete(keys).map_err(Into::into)
    }
    fn set_add(&mut self, key: &str, members: &[String]) -> Result<u32, HostError> {
        host::set_add(key, members).map_err(Into::into)
    }
    fn set_remove(&mut self, key: &str, members: &[String]) -> Result<u32, HostError> {
        host::set_remove(key, members).map_err(Into::into)
    }
    fn set_members(&mut self, key: &str) -> Result<Vec<String>, HostError> {
        let mut members = host::set_members(key)?;
        members.sort();
        Ok(members)
    }
}

/// An in-process store for native tests of task logic.
#[derive(Debug, Clone, Default)]
pub struct MemoryKv {
    values: BTreeMap<String, Vec<u8>>,
    sets: BTreeMap<String, BTreeSet<String>>,
}

impl MemoryKv {
    /// Every key holding a value or a non-empty set.
    pub fn keys(&self) -> Vec<&str> {
        let mut keys: Vec<&str> =
            self.values.keys().chain(self.sets.keys()).map(String::as_str).collect();
        keys.sort();
        keys
    }
}

impl Kv for MemoryKv {
    fn get(&mut self, key: &str) -> Result<Option<Vec<u8>>, HostError> {
        Ok(self.values.get(key).cloned())
    }
    fn set(&mut self, key: &str, value: &[u8]) -> Result<(), HostError> {
        self.values.insert(key.to_string(), value.to_vec());
        Ok(())
    }
    fn delete(&mut self, keys: &[String]) -> Result<u32, HostError> {
        let mut n = 0;
        for k in keys {
            if self.values.remove(k).is_some() | self.sets.remove(k).is_some() {
                n += 1;
            }
        }
        Ok(n)
    }
    fn set_add(&mut self, key: &str, members: &[String]) -> Result<u32, HostError> {
        let set = self.sets.entry(key.to_string()).or_default();
        Ok(members.iter().filter(|m| set.insert((*m).clone())).count() as u32)
    }
    fn set_remove(&mut self, key: &str, members: &[String]) -> Result<u32, HostError> {
        let Some(set) = self.sets.get_mut(key) else { return Ok(0) };
        let n = members.iter().filter(|m| set.remove(*m)).count() as u32;
        if set.is_empty() {
            self.sets.remove(key);
        }
        Ok(n)
    }
    fn set_members(&mut self, key: &str) -> Result<Vec<String>, HostError> {
        Ok(self.sets.get(key).map(|s| s.iter().cloned().collect()).unwrap_or_default())
    }
}
