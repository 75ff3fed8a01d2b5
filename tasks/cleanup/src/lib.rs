//! Cleanup tasks: `cleanup_temp_files` deletes old files under the folder the configuration
//! preopens for it (and can reach nothing else), `cleanup_expired` drops index sessions past a
//! retention period.
//!
//! Built with the workspace (`cargo build`); run with
//! `celeriac run cleanup.cleanup_temp_files --kwargs '{"older_than_seconds": 3600}'` once
//! `celeriac.toml` preopens a scratch folder as `/scratch` for it.

use celeriac_sdk::{Context, TaskError, TaskResult, task};
use serde::Serialize;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where the task looks when no folder is given: the guest path the config should preopen.
pub const DEFAULT_DIR: &str = "/scratch";

/// What `cleanup_temp_files` did.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct Swept {
    /// Files deleted.
    pub deleted: u64,
    /// Bytes those files held.
    pub bytes_freed: u64,
    /// Files young enough to keep.
    pub kept: u64,
    /// Empty folders removed.
    pub folders_removed: u64,
    /// Entries that could not be examined or removed, with the reason.
    pub errors: Vec<String>,
}

task! {
    /// Deletes files older than `older_than_seconds` under `dir` (default `/scratch`), then
    /// removes folders left empty. `now` (unix seconds) defaults to the clock.
    #[task(name = "cleanup.cleanup_temp_files", queue = "maintenance")]
    pub fn cleanup_temp_files(
        _cx: &Context,
        older_than_seconds: u64,
        dir: Option<String>,
        now: Option<i64>,
    ) -> TaskResult<Swept> {
        let now = match now {
            Some(n) => UNIX_EPOCH + Duration::from_secs(n.max(0) as u64),
            None => SystemTime::now(),
        };
        let cutoff = now
            .checked_sub(Duration::from_secs(older_than_seconds))
            .unwrap_or(UNIX_EPOCH);
        let dir = dir.unwrap_or_else(|| DEFAULT_DIR.to_string());
        let root = Path::new(&dir);
        if !root.is_dir() {
            return Err(TaskError::fail(
                "FileNotFoundError",
                format!("{dir} is not a folder this task can see (is it preopened?)"),
            ));
        }
        let mut swept = Swept::default();
        sweep(root, cutoff, &mut swept, true);
        Ok(swept)
    }

    /// Removes index sessions whose last message is older than `retention_seconds`; returns
    /// the removed session ids. `now` (unix seconds) defaults to the clock.
    #[task(name = "cleanup.cleanup_expired", queue = "maintenance")]
    pub fn cleanup_expired(
        cx: &Context,
        retention_seconds: i64,
        now: Option<i64>,
    ) -> TaskResult<Vec<String>> {
        let now = now.unwrap_or_else(|| {
            SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs() as i64)
        });
        Ok(searchindex::expire_before(&mut cx.kv(), now - retention_seconds)?)
    }
}

/// Deletes old files below `dir` depth-first; removes `dir` itself if it ends up empty and is not
/// the root. Symlinks are removed as entries, never followed.
fn sweep(dir: &Path, cutoff: SystemTime, swept: &mut Swept, is_root: bool) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) => return swept.errors.push(format!("{}: {e}", dir.display())),
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) => {
                swept.errors.push(format!("{}: {e}", path.display()));
                continue;
            }
        };
        if meta.is_dir() {
            sweep(&path, cutoff, swept, false);
            continue;
        }
        let old = meta.modified().map(|m| m < cutoff).unwrap_or(false);
        if !old {
            swept.kept += 1;
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                swept.deleted += 1;
                swept.bytes_freed += meta.len();
            }
            Err(e) => swept.errors.push(format!("{}: {e}", path.display())),
        }
    }
    let empty = std::fs::read_dir(dir).map(|mut d| d.next().is_none()).unwrap_or(false);
    if !is_root && empty && std::fs::remove_dir(dir).is_ok() {
        swept.folders_removed += 1;
    }
}

#[cfg(target_arch = "wasm32")]
celeriac_sdk::export_tasks!(cleanup_temp_files, cleanup_expired);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn old_files_go_young_files_stay() {
        let dir = std::env::temp_dir().join(format!("celeriac-cleanup-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("nested/deeper")).unwrap();
        std::fs::write(dir.join("old.tmp"), "12345").unwrap();
        std::fs::write(dir.join("nested/deeper/old.tmp"), "1").unwrap();
        // Files are all written "now"; a `now` one hour ahead makes them an hour old.
        let later = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64 + 3600;
        let cx = Context::detached("t", 0);
        let keep =
            cleanup_temp_files(&cx, 7200, Some(dir.display().to_string()), Some(later)).unwrap();
        assert_eq!((keep.deleted, keep.kept), (0, 2));
        let swept =
            cleanup_temp_files(&cx, 1800, Some(dir.display().to_string()), Some(later)).unwrap();
        assert_eq!((swept.deleted, swept.bytes_freed, swept.folders_removed), (2, 6, 2));
        assert!(dir.exists() && !dir.join("nested").exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_missing_folder_is_a_clear_error() {
        let cx = Context::detached("t", 0);
        let e = cleanup_temp_files(&cx, 1, Some("/definitely/not/here".into()), None).unwrap_err();
        assert!(e.to_string().contains("is it preopened"), "{e}");
    }
}
