//! The search index the example tasks share: chat messages grouped into sessions, each session
//! turned into an enriched text, a feature-hashed embedding and inverted-index postings, all kept
//! in the task's key-value namespace.
//!
//! Keys in the namespace:
//! - `session:<id>`: the [`Session`] as JSON (its messages, text, terms and embedding);
//! - `postings:<term>`: the set of session ids containing the term;
//! - `message:<id>`: the session id a message belongs to (for deletion);
//! - `sessions`: the set of all session ids (for retention sweeps).
//!
//! Every operation is idempotent: indexing a session twice, or deleting a message twice, leaves
//! the same index, because task runs may be retried.

use celeriac_sdk::HostError;
use celeriac_sdk::kv::Kv;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};

/// Dimensions of the hashed embedding: enough to keep collisions rare for chat-sized texts.
pub const DIM: usize = 256;

/// The set of all session ids.
pub const SESSIONS_KEY: &str = "sessions";

/// One chat message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    /// Message id, unique across the channel.
    pub id: String,
    /// Who wrote it.
    pub author: String,
    /// The text.
    pub content: String,
    /// Unix seconds.
    pub timestamp: i64,
    /// The message this one replies to, if any.
    #[serde(default)]
    pub reply_to: Option<String>,
}

/// An indexed session.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Session {
    /// Session id.
    pub id: String,
    /// Channel it came from, if known.
    pub channel: Option<String>,
    /// Its messages in time order.
    pub messages: Vec<Message>,
    /// The enriched text: a header with participants and time span, then `author: content` lines.
    pub text: String,
    /// Distinct terms, sorted.
    pub terms: Vec<String>,
    /// Unit-length hashed embedding of the terms (and adjacent-term bigrams).
    pub embedding: Vec<f32>,
    /// Timestamp of the first message.
    pub start: i64,
    /// Timestamp of the last message.
    pub end: i64,
}

/// Words too common to help a search.
const STOPWORDS: &[&str] = &[
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "do", "for", "from", "has", "have",
    "i", "if", "in", "is", "it", "its", "me", "my", "no", "not", "of", "on", "or", "so", "that",
    "the", "this", "to", "was", "we", "were", "what", "will", "with", "you", "your",
];

/// Lower-cased alphanumeric words of two or more characters, stop words removed, in order.
pub fn tokenize(text: &str) -> Vec<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .filter(|w| w.chars().count() >= 2)
        .map(str::to_lowercase)
        .filter(|w| !STOPWORDS.contains(&w.as_str()))
        .collect()
}

/// FNV-1a: small, fast and the same on every platform, which keeps embeddings deterministic.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// A feature-hashed embedding of `tokens`: each term and adjacent pair adds `1 + ln(tf)` to a
/// hashed, signed dimension; the result has unit length (or is all zeros for no tokens).
pub fn embed(tokens: &[String]) -> Vec<f32> {
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for t in tokens {
        *counts.entry(t.clone()).or_default() += 1;
    }
    for pair in tokens.windows(2) {
        *counts.entry(format!("{} {}", pair[0], pair[1])).or_default() += 1;
    }
    let mut v = vec![0f32; DIM];
    for (feature, tf) in counts {
        let h = fnv1a(feature.as_bytes());
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        // Bigrams weigh half: they sharpen ranking without drowning single-word matches.
        let weight = if feature.contains(' ') { 0.5 } else { 1.0 };
        v[(h % DIM as u64) as usize] += sign * weight * (1.0 + (tf as f32).ln());
    }
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        v.iter_mut().for_each(|x| *x /= norm);
    }
    v
}

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Builds the session record for `messages` (sorted by time; duplicates by id dropped).
pub fn build_session(id: &str, channel: Option<String>, messages: &[Message]) -> Session {
    let mut messages: Vec<Message> = messages.to_vec();
    messages.sort_by(|a, b| (a.timestamp, &a.id).cmp(&(b.timestamp, &b.id)));
    messages.dedup_by(|a, b| a.id == b.id);
    let participants: BTreeSet<&str> = messages.iter().map(|m| m.author.as_str()).collect();
    let start = messages.first().map_or(0, |m| m.timestamp);
    let end = messages.last().map_or(0, |m| m.timestamp);
    let mut text = format!(
        "participants: {}\nspan: {start}..{end} ({} messages)\n",
        participants.into_iter().collect::<Vec<_>>().join(", "),
        messages.len()
    );
    for m in &messages {
        text.push_str(&format!("{}: {}\n", m.author, m.content.trim()));
    }
    let tokens: Vec<String> = messages.iter().flat_map(|m| tokenize(&m.content)).collect();
    let terms: BTreeSet<String> = tokens.iter().cloned().collect();
    Session {
        id: id.to_string(),
        channel,
        embedding: embed(&tokens),
        terms: terms.into_iter().collect(),
        text,
        start,
        end,
        messages,
    }
}

fn session_key(id: &str) -> String {
    format!("session:{id}")
}

/// Loads a session.
pub fn load_session(kv: &mut impl Kv, id: &str) -> Result<Option<Session>, HostError> {
    kv.get_json(&session_key(id))
}

/// Stores `session`, replacing an earlier version: postings of terms it no longer has and
/// message links it no longer holds are removed, new ones added.
pub fn store_session(kv: &mut impl Kv, session: &Session) -> Result<(), HostError> {
    let old = load_session(kv, &session.id)?;
    let ids = [session.id.clone()];
    if let Some(old) = &old {
        for term in old.terms.iter().filter(|t| session.terms.binary_search(t).is_err()) {
            kv.set_remove(&format!("postings:{term}"), &ids)?;
        }
        let kept: BTreeSet<&str> = session.messages.iter().map(|m| m.id.as_str()).collect();
        let gone: Vec<String> = old
            .messages
            .iter()
            .filter(|m| !kept.contains(m.id.as_str()))
            .map(|m| format!("message:{}", m.id))
            .collect();
        if !gone.is_empty() {
            kv.delete(&gone)?;
        }
    }
    for term in &session.terms {
        kv.set_add(&format!("postings:{term}"), &ids)?;
    }
    for m in &session.messages {
        kv.set(&format!("message:{}", m.id), session.id.as_bytes())?;
    }
    kv.set_json(&session_key(&session.id), session)?;
    kv.set_add(SESSIONS_KEY, &ids)?;
    Ok(())
}

/// Removes a session and everything pointing at it; returns whether it existed.
pub fn remove_session(kv: &mut impl Kv, id: &str) -> Result<bool, HostError> {
    let Some(old) = load_session(kv, id)? else {
        kv.set_remove(SESSIONS_KEY, &[id.to_string()])?;
        return Ok(false);
    };
    let ids = [id.to_string()];
    for term in &old.terms {
        kv.set_remove(&format!("postings:{term}"), &ids)?;
    }
    let mut keys: Vec<String> = old.messages.iter().map(|m| format!("message:{}", m.id)).collect();
    keys.push(session_key(id));
    kv.delete(&keys)?;
    kv.set_remove(SESSIONS_KEY, &ids)?;
    Ok(true)
}

/// Removes messages from whatever sessions hold them, re-indexing what remains; a session left
/// empty is removed. Returns how many of the ids were indexed.
pub fn delete_messages(kv: &mut impl Kv, message_ids: &[String]) -> Result<u32, HostError> {
    let mut by_session: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for id in message_ids {
        if let Some(session) = kv.get(&format!("message:{id}"))? {
            let session = String::from_utf8_lossy(&session).into_owned();
            by_session.entry(session).or_default().insert(id.clone());
        }
    }
    let mut removed = 0;
    for (session_id, ids) in by_session {
        let Some(session) = load_session(kv, &session_id)? else {
            // A dangling link (the session went away): drop the links and move on.
            let keys: Vec<String> = ids.iter().map(|id| format!("message:{id}")).collect();
            kv.delete(&keys)?;
            continue;
        };
        let remaining: Vec<Message> =
            session.messages.iter().filter(|m| !ids.contains(&m.id)).cloned().collect();
        removed += (session.messages.len() - remaining.len()) as u32;
        if remaining.is_empty() {
            remove_session(kv, &session_id)?;
        } else {
            store_session(kv, &build_session(&session_id, session.channel, &remaining))?;
        }
    }
    Ok(removed)
}

/// One search result.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Hit {
    /// The session.
    pub session_id: String,
    /// Cosine similarity to the query.
    pub score: f32,
    /// The start of the session's text.
    pub snippet: String,
}

/// The sessions best matching `query`: candidates from the postings of the query's terms, ranked
/// by cosine similarity of embeddings (ties by id), at most `limit`.
pub fn search(kv: &mut impl Kv, query: &str, limit: usize) -> Result<Vec<Hit>, HostError> {
    let tokens = tokenize(query);
    let q = embed(&tokens);
    let mut candidates = BTreeSet::new();
    for term in tokens.iter().collect::<BTreeSet<_>>() {
        candidates.extend(kv.set_members(&format!("postings:{term}"))?);
    }
    let mut hits = Vec::new();
    for id in candidates {
        if let Some(session) = load_session(kv, &id)? {
            let body = session.text.lines().skip(2).collect::<Vec<_>>().join(" ");
            hits.push(Hit {
                score: cosine(&q, &session.embedding),
                snippet: body.chars().take(160).collect(),
                session_id: id,
            });
        }
    }
    hits.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.session_id.cmp(&b.session_id)));
    hits.truncate(limit);
    Ok(hits)
}

/// Removes sessions whose last message is older than `cutoff` (unix seconds); returns their ids.
pub fn expire_before(kv: &mut impl Kv, cutoff: i64) -> Result<Vec<String>, HostError> {
    let mut expired = Vec::new();
    for id in kv.set_members(SESSIONS_KEY)? {
        match load_session(kv, &id)? {
            Some(s) if s.end >= cutoff => {}
            _ => {
                remove_session(kv, &id)?;
                expired.push(id);
            }
        }
    }
    Ok(expired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_sdk::kv::MemoryKv;

    fn msg(id: &str, author: &str, content: &str, ts: i64) -> Message {
        Message {
            id: id.into(),
            author: author.into(),
            content: content.into(),
            timestamp: ts,
            reply_to: None,
        }
    }

    fn index_two(kv: &mut MemoryKv) {
        let deploy = [
            msg("m1", "ana", "The deploy pipeline failed on the database migration", 100),
            msg("m2", "bo", "Rolling back the migration, deploy again after lunch", 160),
        ];
        let lunch = [
            msg("m3", "cy", "Anyone up for pizza at lunch?", 5000),
            msg("m4", "ana", "Pizza sounds great, the usual place", 5060),
        ];
        store_session(kv, &build_session("s-deploy", None, &deploy)).unwrap();
        store_session(kv, &build_session("s-lunch", None, &lunch)).unwrap();
    }

    #[test]
    fn tokenize_drops_stopwords_and_short_words() {
        assert_eq!(tokenize("The DB is down, a 5xx storm!"), vec!["db", "down", "5xx", "storm"]);
    }

    #[test]
    fn embeddings_are_deterministic_unit_vectors() {
        let t = tokenize("database migration failed");
        let a = embed(&t);
        assert_eq!(a, embed(&t));
        assert!((cosine(&a, &a) - 1.0).abs() < 1e-5);
        assert!(embed(&[]).iter().all(|x| *x == 0.0));
    }

    #[test]
    fn search_ranks_the_matching_session_first() {
        let mut kv = MemoryKv::default();
        index_two(&mut kv);
        let hits = search(&mut kv, "database migration", 5).unwrap();
        assert_eq!(hits[0].session_id, "s-deploy");
        assert_eq!(hits.len(), 1, "only sessions sharing a term are candidates");
        let hits = search(&mut kv, "pizza lunch", 5).unwrap();
        assert_eq!(hits[0].session_id, "s-lunch");
        assert!(hits.len() == 2 && hits[0].score > hits[1].score, "{hits:?}");
    }

    #[test]
    fn reindexing_drops_stale_postings() {
        let mut kv = MemoryKv::default();
        index_two(&mut kv);
        let again = [msg("m3", "cy", "Sushi instead?", 5000)];
        store_session(&mut kv, &build_session("s-lunch", None, &again)).unwrap();
        assert!(kv.set_members("postings:pizza").unwrap().is_empty());
        assert_eq!(kv.get("message:m4").unwrap(), None);
        assert_eq!(search(&mut kv, "sushi", 5).unwrap()[0].session_id, "s-lunch");
    }

    #[test]
    fn deleting_messages_is_idempotent_and_empties_sessions() {
        let mut kv = MemoryKv::default();
        index_two(&mut kv);
        let ids = vec!["m3".to_string(), "m4".to_string(), "nope".to_string()];
        assert_eq!(delete_messages(&mut kv, &ids).unwrap(), 2);
        assert_eq!(delete_messages(&mut kv, &ids).unwrap(), 0);
        assert!(load_session(&mut kv, "s-lunch").unwrap().is_none());
        assert!(search(&mut kv, "pizza", 5).unwrap().is_empty());
        assert_eq!(kv.set_members(SESSIONS_KEY).unwrap(), vec!["s-deploy".to_string()]);
        // Deleting one message of two keeps the session, re-indexed without it.
        assert_eq!(delete_messages(&mut kv, &["m1".to_string()]).unwrap(), 1);
        let s = load_session(&mut kv, "s-deploy").unwrap().unwrap();
        assert_eq!(s.messages.len(), 1);
        assert!(kv.set_members("postings:database").unwrap().is_empty());
    }

    #[test]
    fn expiry_removes_only_old_sessions() {
        let mut kv = MemoryKv::default();
        index_two(&mut kv);
        assert_eq!(expire_before(&mut kv, 1000).unwrap(), vec!["s-deploy".to_string()]);
        assert!(load_session(&mut kv, "s-deploy").unwrap().is_none());
        assert!(load_session(&mut kv, "s-lunch").unwrap().is_some());
        assert!(kv.keys().iter().all(|k| !k.contains("m1")));
    }
}
