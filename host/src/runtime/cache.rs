//! Compiled components cached on disk, keyed by the module's content hash and the engine's
//! compatibility hash, so a restart (or a second worker on the machine) does not recompile, and
//! an upgraded celeriac or changed engine settings never load stale machine code.

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use wasmtime::Engine;
use wasmtime::component::Component;

/// Where a compiled component came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compiled {
    /// Loaded from the disk cache.
    FromCache,
    /// Compiled now (and written to the cache when there is one).
    Fresh,
}

/// The cache key of `wasm` under `engine`.
pub fn cache_key(engine: &Engine, wasm: &[u8]) -> String {
    let mut engine_hash = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut engine_hash);
    format!("{}-{:016x}", hex::encode(Sha256::digest(wasm)), engine_hash.finish())
}

/// Compiles `wasm` or loads it from `cache_dir`.
pub fn load(
    engine: &Engine,
    wasm: &[u8],
    cache_dir: Option<&Path>,
) -> anyhow::Result<(Component, Compiled)> {
    let Some(dir) = cache_dir else {
        return Ok((Component::new(engine, wasm).map_err(anyhow::Error::from)?, Compiled::Fresh));
    };
    let path: PathBuf = dir.join(format!("{}.cwasm", cache_key(engine, wasm)));
    if path.exists() {
        match deserialize(engine, &path) {
            Ok(component) => return Ok((component, Compiled::FromCache)),
            // A truncated or foreign file: recompile and overwrite it.
            Err(e) => {
                tracing::warn!(path = %path.display(), "ignoring unusable cache entry: {e:#}")
            }
        }
    }
    let component = Component::new(engine, wasm).map_err(anyhow::Error::from)?;
    std::fs::create_dir_all(dir)
        .with_context(|| format!("create module cache folder {}", dir.display()))?;
    let bytes = component.serialize().map_err(anyhow::Error::from)?;
    // Write then rename, so a concurrent reader never sees half a file.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, bytes).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, &path).with_context(|| format!("rename to {}", path.display()))?;
    Ok((component, Compiled::Fresh))
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: `deserialize_file` trusts the file to be machine code that wasmtime produced. The
    // cache folder is written only by `load` above, under a name that binds the module's content
    // hash and the engine's compatibility hash, and wasmtime itself re-checks the header and the
    // engine settings before using it. Whoever can write the cache folder can already replace the
    // celeriac binary beside it.
    Ok(unsafe { Component::deserialize_file(engine, path).map_err(anyhow::Error::from)? })
}
