//! Summarisation task: `summarize_session` writes an extractive summary of a chat session: it
//! scores sentences by the frequency of their content words, keeps the best ones that fit a
//! length budget and returns them in their original order.
//!
//! Built with the workspace (`cargo build`); run with
//! `celeriac run summarize.summarize_session --kwargs '{"text": "...", "max_chars": 200}'`.

use celeriac_sdk::{Context, TaskError, TaskResult, task};
use serde::Serialize;
use std::collections::BTreeMap;

/// Budget when none is given.
pub const DEFAULT_MAX_CHARS: usize = 280;

/// Fraction of the best sentence's score a sentence needs to be considered at all.
pub const RELEVANCE: f64 = 0.5;

/// What `summarize_session` returns.
#[derive(Debug, Serialize, PartialEq)]
pub struct Summary {
    /// The chosen sentences joined by spaces, in their original order.
    pub summary: String,
    /// Indexes of the chosen sentences in the input.
    pub sentences: Vec<usize>,
    /// Sentences in the input.
    pub total_sentences: usize,
}

task! {
    /// Summarises a session given as `text`, as `messages`, or by `session_id` from the index
    /// (which needs the kv grant), within `max_chars` characters.
    #[task(name = "summarize.summarize_session", queue = "default")]
    pub fn summarize_session(
        cx: &Context,
        text: Option<String>,
        messages: Option<Vec<searchindex::Message>>,
        session_id: Option<String>,
        max_chars: Option<usize>,
    ) -> TaskResult<Summary> {
        let text = match (text, messages, session_id) {
            (Some(t), None, None) => t,
            (None, Some(m), None) => join_messages(&m),
            (None, None, Some(id)) => match searchindex::load_session(&mut cx.kv(), &id)? {
                Some(s) => join_messages(&s.messages),
                None => return Err(TaskError::fail("KeyError", format!("no indexed session {id}"))),
            },
            _ => return Err(TaskError::invalid("give exactly one of text, messages or session_id")),
        };
        Ok(summarize(&text, max_chars.unwrap_or(DEFAULT_MAX_CHARS)))
    }
}

fn join_messages(messages: &[searchindex::Message]) -> String {
    let mut sorted: Vec<&searchindex::Message> = messages.iter().collect();
    sorted.sort_by_key(|m| m.timestamp);
    sorted.iter().map(|m| terminated(m.content.trim())).collect::<Vec<_>>().join(" ")
}

/// Ends a chat line with a full stop when it has no closing punctuation, so each message is at
/// least one sentence.
fn terminated(line: &str) -> String {
    if line.ends_with(['.', '!', '?']) { line.to_string() } else { format!("{line}.") }
}

/// Splits text into sentences at `.`, `!` or `?` followed by whitespace, and at line breaks.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut current = String::new();
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            current.push(c);
            if matches!(c, '.' | '!' | '?') && chars.peek().is_none_or(|n| n.is_whitespace()) {
                out.push(std::mem::take(&mut current));
            }
        }
        out.push(current);
    }
    out.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

/// The extractive summary of `text` within `max_chars`.
pub fn summarize(text: &str, max_chars: usize) -> Summary {
    let sentences = sentences(text);
    let words: Vec<Vec<String>> = sentences.iter().map(|s| searchindex::tokenize(s)).collect();
    let mut freq: BTreeMap<&str, f64> = BTreeMap::new();
    for w in words.iter().flatten() {
        *freq.entry(w.as_str()).or_default() += 1.0;
    }
    let top = freq.values().cloned().fold(1.0, f64::max);
    // Score: mean normalised frequency of content words, so long sentences do not win by length;
    // the opening sentence gets a small boost since chats often state the topic first.
    let mut scored: Vec<(f64, usize)> = words
        .iter()
        .enumerate()
        .map(|(i, ws)| {
            let sum: f64 = ws.iter().map(|w| freq[w.as_str()] / top).sum();
            let mean = if ws.is_empty() { 0.0 } else { sum / (ws.len() as f64).sqrt() };
            (if i == 0 { mean * 1.2 } else { mean }, i)
        })
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    // Sentences scoring under half the best are asides ("I had coffee."): leaving them out keeps
    // a generous budget from filling up with filler.
    let threshold = scored.first().map_or(0.0, |s| s.0 * RELEVANCE);
    let mut chosen = Vec::new();
    let mut used = 0;
    for (_, i) in scored.into_iter().filter(|s| s.0 >= threshold) {
        let len = sentences[i].chars().count() + usize::from(!chosen.is_empty());
        if used + len <= max_chars {
            chosen.push(i);
            used += len;
        }
    }
    chosen.sort_unstable();
    Summary {
        summary: chosen.iter().map(|&i| sentences[i].as_str()).collect::<Vec<_>>().join(" "),
        sentences: chosen,
        total_sentences: sentences.len(),
    }
}

#[cfg(target_arch = "wasm32")]
celeriac_sdk::export_tasks!(summarize_session);

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "The database migration failed during the deploy. \
        I had coffee. \
        The migration locked the orders table and the deploy timed out. \
        Lunch is at noon! \
        We rolled back the migration and will retry the deploy tonight.";

    #[test]
    fn splits_sentences_at_terminators_and_lines() {
        assert_eq!(sentences("One. Two! Three?\nFour"), vec!["One.", "Two!", "Three?", "Four"]);
        assert_eq!(sentences("v1.2 is out. Yes"), vec!["v1.2 is out.", "Yes"]);
    }

    #[test]
    fn keeps_the_central_sentences_in_order_within_budget() {
        let s = summarize(TEXT, 120);
        assert!(s.summary.chars().count() <= 120, "{}", s.summary);
        assert_eq!(s.total_sentences, 5);
        assert!(s.sentences.windows(2).all(|w| w[0] < w[1]), "original order");
        assert!(s.sentences.contains(&0), "{s:?}");
        assert!(!s.sentences.contains(&1) && !s.sentences.contains(&3), "{s:?}");
    }

    #[test]
    fn tiny_budget_gives_empty_summary_and_big_budget_skips_only_asides() {
        assert_eq!(summarize(TEXT, 3).summary, "");
        assert_eq!(summarize(TEXT, 10_000).sentences, vec![0, 2, 4]);
    }

    #[test]
    fn needs_exactly_one_input() {
        let cx = Context::detached("t", 0);
        assert!(summarize_session(&cx, None, None, None, None).is_err());
    }
}
