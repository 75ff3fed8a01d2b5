//! Indexing tasks: `index_session` turns a chat session into a searchable index entry,
//! `batch_index_channel` splits a channel's messages into sessions and enqueues one
//! `index_session` per session, and `search` queries the index.
//!
//! Built with the workspace (`cargo build`). Try it locally, keeping the index in a file:
//! `celeriac run indexing.batch_index_channel --follow --kv-file /tmp/index.json --kwargs '{"channel":"ops","messages":[...]}'`
//! then `celeriac run indexing.search --kv-file /tmp/index.json --args '["deploy failed"]'`.

use celeriac_sdk::{Context, EnqueueOptions, TaskError, TaskResult, task};
use searchindex::{Hit, Message};
use serde::Serialize;
use serde_json::json;
use std::collections::BTreeMap;

/// Messages further apart than this start a new session unless one replies to the other.
pub const DEFAULT_GAP_SECONDS: i64 = 30 * 60;

/// Most messages one `index_session` accepts: a session is a conversation, not an archive.
pub const MAX_SESSION_MESSAGES: usize = 5_000;

/// What `index_session` returns.
#[derive(Debug, Serialize, PartialEq)]
pub struct Indexed {
    /// The session id.
    pub session_id: String,
    /// Messages in the session.
    pub messages: usize,
    /// Distinct terms indexed.
    pub terms: usize,
}

/// What `batch_index_channel` returns.
#[derive(Debug, Serialize, PartialEq)]
pub struct Batch {
    /// Sessions found.
    pub sessions: usize,
    /// `index_session` tasks enqueued (sessions of two or more messages).
    pub enqueued: usize,
    /// Single messages left unindexed.
    pub singletons: usize,
    /// Ids of the enqueued child tasks.
    pub children: Vec<String>,
}

task! {
    /// Indexes one chat session: enriched text, hashed embedding and postings, stored in kv.
    #[task(name = "indexing.index_session", queue = "indexing", max_retries = 5)]
    pub fn index_session(
        cx: &Context,
        session_id: String,
        messages: Vec<Message>,
        channel: Option<String>,
    ) -> TaskResult<Indexed> {
        if messages.is_empty() {
            return Err(TaskError::invalid("a session needs at least one message"));
        }
        if messages.len() > MAX_SESSION_MESSAGES {
            return Err(TaskError::invalid(format!(
                "{} messages exceed the {MAX_SESSION_MESSAGES} a session may have",
                messages.len()
            )));
        }
        let session = searchindex::build_session(&session_id, channel, &messages);
        searchindex::store_session(&mut cx.kv(), &session)?;
        Ok(Indexed { session_id, messages: session.messages.len(), terms: session.terms.len() })
    }

    /// Splits a channel's messages into sessions (time gaps and reply chains) and enqueues one
    /// `indexing.index_session` per session of two or more messages.
    #[task(name = "indexing.batch_index_channel", queue = "indexing")]
    pub fn batch_index_channel(
        cx: &Context,
        channel: String,
        messages: Vec<Message>,
        gap_seconds: Option<i64>,
    ) -> TaskResult<Batch> {
        let sessions = sessionize(&messages, gap_seconds.unwrap_or(DEFAULT_GAP_SECONDS));
        let mut batch = Batch { sessions: sessions.len(), enqueued: 0, singletons: 0, children: vec![] };
        for session in sessions {
            if session.len() < 2 {
                batch.singletons += 1;
                continue;
            }
            let session_id = format!("{channel}:{}", session[0].id);
            let kwargs = json!({ "session_id": session_id, "messages": session, "channel": channel });
            let id = cx.enqueue(
                index_session::NAME,
                &json!([]),
                &kwargs,
                EnqueueOptions::default(),
            )?;
            batch.children.push(id);
            batch.enqueued += 1;
        }
        Ok(batch)
    }

    /// Finds the sessions that best match a query, by cosine similarity over the embeddings of
    /// the sessions that share at least one term with it.
    #[task(name = "indexing.search", queue = "indexing")]
    pub fn search(cx: &Context, query: String, limit: Option<usize>) -> TaskResult<Vec<Hit>> {
        Ok(searchindex::search(&mut cx.kv(), &query, limit.unwrap_or(5).min(100))?)
    }
}

/// Groups messages into sessions: sorted by time, a message joins the previous one's session
/// when it follows within `gap` seconds, and always joins the session of the message it replies
/// to. Sessions come out ordered by their first message, each in time order.
pub fn sessionize(messages: &[Message], gap: i64) -> Vec<Vec<Message>> {
    let mut sorted: Vec<&Message> = messages.iter().collect();
    sorted.sort_by(|a, b| (a.timestamp, &a.id).cmp(&(b.timestamp, &b.id)));
    sorted.dedup_by(|a, b| a.id == b.id);
    let index: BTreeMap<&str, usize> =
        sorted.iter().enumerate().map(|(i, m)| (m.id.as_str(), i)).collect();
    let mut parent: Vec<usize> = (0..sorted.len()).collect();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    // The smaller index becomes the root, so a session is keyed by its earliest message.
    fn union(parent: &mut [usize], a: usize, b: usize) {
        let (ra, rb) = (root(parent, a), root(parent, b));
        if ra != rb {
            parent[ra.max(rb)] = ra.min(rb);
        }
    }
    for i in 1..sorted.len() {
        if sorted[i].timestamp - sorted[i - 1].timestamp <= gap {
            union(&mut parent, i - 1, i);
        }
    }
    for (i, m) in sorted.iter().enumerate() {
        if let Some(&p) = m.reply_to.as_deref().and_then(|r| index.get(r)) {
            union(&mut parent, p, i);
        }
    }
    let mut groups: BTreeMap<usize, Vec<Message>> = BTreeMap::new();
    for (i, m) in sorted.iter().enumerate() {
        let r = root(&mut parent, i);
        groups.entry(r).or_default().push((*m).clone());
    }
    groups.into_values().collect()
}

#[cfg(target_arch = "wasm32")]
celeriac_sdk::export_tasks!(index_session, batch_index_channel, search);

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(id: &str, ts: i64, reply_to: Option<&str>) -> Message {
        Message {
            id: id.into(),
            author: "a".into(),
            content: format!("message {id}"),
            timestamp: ts,
            reply_to: reply_to.map(Into::into),
        }
    }

    fn ids(sessions: &[Vec<Message>]) -> Vec<Vec<&str>> {
        sessions.iter().map(|s| s.iter().map(|m| m.id.as_str()).collect()).collect()
    }

    #[test]
    fn time_gaps_split_sessions() {
        let m =
            [msg("a", 0, None), msg("b", 60, None), msg("c", 10_000, None), msg("d", 10_100, None)];
        assert_eq!(ids(&sessionize(&m, 1800)), vec![vec!["a", "b"], vec!["c", "d"]]);
    }

    #[test]
    fn replies_join_their_parent_across_gaps() {
        let m = [
            msg("a", 0, None),
            msg("b", 5_000, None),
            msg("c", 10_000, Some("a")),
            msg("d", 20_000, None),
        ];
        assert_eq!(ids(&sessionize(&m, 1800)), vec![vec!["a", "c"], vec!["b"], vec!["d"]]);
    }

    #[test]
    fn input_order_and_duplicates_do_not_matter() {
        let m = [msg("b", 60, None), msg("a", 0, None), msg("b", 60, None)];
        assert_eq!(ids(&sessionize(&m, 1800)), vec![vec!["a", "b"]]);
        assert!(sessionize(&[], 1800).is_empty());
    }
}
