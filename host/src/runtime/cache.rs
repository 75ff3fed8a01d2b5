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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Compiled {
    /// Loaded from the disk cache.
    FromCache,
    /// Compiled now (and written to the cache when there is one).
    Fresh,
    /// Compiled now, because the cache could not be trusted (the reason): it was neither read
    /// nor written.
    CacheRefused(String),
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
    // Native code is loaded from here without further checks, so whoever can write the folder
    // or the file can run code as celeriac: refuse a cache anyone else could have written.
    if let Err(reason) = trusted(dir, true).and_then(|()| trusted(&path, false)) {
        tracing::warn!("not using the module cache: {reason}");
        let component = Component::new(engine, wasm).map_err(anyhow::Error::from)?;
        return Ok((component, Compiled::CacheRefused(reason)));
    }
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
    if let Err(e) = store(dir, &path, &component) {
        // The component is compiled and good; only the next start will compile it again.
        tracing::warn!("could not write the module cache: {e:#}");
    }
    Ok((component, Compiled::Fresh))
}

/// Writes `component` to `path` in the cache folder `dir`.
fn store(dir: &Path, path: &Path, component: &Component) -> anyhow::Result<()> {
    // Created writable by celeriac's user alone, whatever the umask, so `trusted` accepts them.
    use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
    use std::sync::atomic::{AtomicU64, Ordering};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("create module cache folder {}", dir.display()))?;
    let bytes = component.serialize().map_err(anyhow::Error::from)?;
    // Write then rename, so a concurrent reader never sees half a file. The temporary name is
    // this writer's alone: two loads of one component at once (two workers on the machine, or
    // two registries in one process) each write their own and the last rename wins.
    static WRITES: AtomicU64 = AtomicU64::new(0);
    let n = WRITES.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("tmp{}-{n}", std::process::id()));
    let write = |tmp: &Path| -> std::io::Result<()> {
        use std::io::Write as _;
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o644)
            .open(tmp)?;
        file.write_all(&bytes)
    };
    write(&tmp).with_context(|| format!("write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("rename to {}", path.display()))
}

/// Checks that `path`, if it exists, can only have been written by this user (or root): it is
/// owned by one of them and neither group nor others may write it. The folder may be reached
/// through a symbolic link (its target is checked); an entry may not be one, as celeriac never
/// writes links.
fn trusted(path: &Path, follow: bool) -> Result<(), String> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = if follow { std::fs::metadata(path) } else { std::fs::symlink_metadata(path) };
    let meta = match meta {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let me = effective_uid();
    let shown = path.display();
    if meta.file_type().is_symlink() {
        return Err(format!("{shown} is a symbolic link, which celeriac never writes there"));
    }
    if meta.uid() != me && meta.uid() != 0 {
        return Err(format!(
            "{shown} is owned by uid {}, not by celeriac's user (uid {me}) or root; \
             chown it or choose another folder with CELERIAC_CACHE",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "{shown} has mode {:o}, so other users may write it; run `chmod go-w {shown}`",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

#[allow(unsafe_code)]
fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions, cannot fail and touches no memory of ours.
    unsafe { libc::geteuid() }
}

#[allow(unsafe_code)]
fn deserialize(engine: &Engine, path: &Path) -> anyhow::Result<Component> {
    // SAFETY: `deserialize_file` trusts the file to be machine code that wasmtime produced. The
    // cache folder is written only by `load` above, under a name that binds the module's content
    // hash and the engine's compatibility hash, and wasmtime itself re-checks the header and the
    // engine settings before using it. `trusted` has checked that only celeriac's user or root
    // could have written the folder and the file.
    Ok(unsafe { Component::deserialize_file(engine, path).map_err(anyhow::Error::from)? })
}
