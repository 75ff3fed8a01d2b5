//! Deletion task: `delete_message_vectors` removes messages from the search index (their
//! sessions are re-indexed without them, or removed when empty). Idempotent: deleting the same
//! ids again removes nothing and returns 0.
//!
//! Built with the workspace (`cargo build`); run with
//! `celeriac run deletion.delete_message_vectors --kv-file /tmp/index.json --args '[["m1","m2"]]'`.

use celeriac_sdk::{Context, TaskError, TaskResult, task};

/// Most ids one call accepts; larger deletions should be split into several tasks.
pub const MAX_IDS: usize = 10_000;

task! {
    /// Removes message ids from the index; returns how many were indexed and are now gone.
    #[task(name = "deletion.delete_message_vectors", queue = "indexing", max_retries = 5)]
    pub fn delete_message_vectors(cx: &Context, message_ids: Vec<String>) -> TaskResult<u32> {
        if message_ids.len() > MAX_IDS {
            return Err(TaskError::invalid(format!(
                "{} ids exceed the {MAX_IDS} one task may delete",
                message_ids.len()
            )));
        }
        Ok(searchindex::delete_messages(&mut cx.kv(), &message_ids)?)
    }
}

#[cfg(target_arch = "wasm32")]
celeriac_sdk::export_tasks!(delete_message_vectors);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn too_many_ids_is_a_permanent_error() {
        let ids = vec![String::new(); MAX_IDS + 1];
        let e = delete_message_vectors(&Context::detached("t", 0), ids).unwrap_err();
        assert!(matches!(e, TaskError::Fail { ref exc_type, .. } if exc_type == "ValueError"));
    }
}
