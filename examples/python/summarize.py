"""Summarisation in Python: ``summarize.summarize_session_py`` writes an extractive summary of a
chat session, as the Rust ``summarize.summarize_session`` does: it scores sentences by how often
their content words occur, keeps the best ones that fit ``max_chars`` and returns them in their
original order.

Build: ``python -m celeriac_task build summarize -p examples/python -o modules/summarize_py.wasm``
Run:   ``celeriac run summarize.summarize_session_py --modules modules --kwargs '{"text": "..."}'``
"""

import math
import re

from celeriac_task import current, logger, task

DEFAULT_MAX_CHARS = 280
# Fraction of the best sentence's score a sentence needs to be considered at all.
RELEVANCE = 0.5
# The Rust task's stop words, so both give the same summary.
STOPWORDS = frozenset(
    "a an and are as at be but by do for from has have i if in is it its me my no not of on or "
    "so that the this to was we were what will with you your".split()
)
WORD = re.compile(r"[^\W_]+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences(text: str) -> list[str]:
    """Splits at ``.``, ``!`` or ``?`` followed by whitespace, and at line breaks."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in SENTENCE_END.split(line))
    return [s for s in out if s]


def tokenize(sentence: str) -> list[str]:
    """Lower-cased alphanumeric words of two or more characters, stop words removed."""
    words = (w.lower() for w in WORD.findall(sentence) if len(w) >= 2)
    return [w for w in words if w not in STOPWORDS]


def summarize(text: str, max_chars: int = DEFAULT_MAX_CHARS) -> dict:
    found = sentences(text)
    words = [tokenize(s) for s in found]
    freq: dict[str, float] = {}
    for ws in words:
        for w in ws:
            freq[w] = freq.get(w, 0.0) + 1.0
    top = max(freq.values(), default=1.0)
    scored = []
    for i, ws in enumerate(words):
        mean = sum(freq[w] / top for w in ws) / math.sqrt(len(ws)) if ws else 0.0
        # The opening sentence gets a small boost: chats often state the topic first.
        scored.append((mean * 1.2 if i == 0 else mean, i))
    scored.sort(key=lambda s: (-s[0], s[1]))
    threshold = scored[0][0] * RELEVANCE if scored else 0.0
    chosen, used = [], 0
    for score, i in scored:
        if score < threshold:
            break
        length = len(found[i]) + (1 if chosen else 0)
        if used + length <= max_chars:
            chosen.append(i)
            used += length
    chosen.sort()
    return {
        "summary": " ".join(found[i] for i in chosen),
        "sentences": chosen,
        "total_sentences": len(found),
    }


@task(name="summarize.summarize_session_py", queue="default", max_retries=3)
def summarize_session_py(text: str = None, messages: list = None, max_chars: int = DEFAULT_MAX_CHARS):
    """Summarises a session given as ``text`` or as chat ``messages`` within ``max_chars``."""
    if (text is None) == (messages is None):
        raise ValueError("give exactly one of text or messages")
    if messages is not None:
        ordered = sorted(messages, key=lambda m: m.get("timestamp", 0))
        lines = [m["content"].strip() for m in ordered]
        text = " ".join(l if l.endswith((".", "!", "?")) else l + "." for l in lines)
    if not isinstance(max_chars, int) or max_chars < 0:
        raise ValueError(f"max_chars must be an int >= 0, got {max_chars!r}")
    result = summarize(text, max_chars)
    logger.info("task %s: kept %d of %d sentences", current().id,
                len(result["sentences"]), result["total_sentences"])
    return result
