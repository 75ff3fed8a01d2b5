//! Hostile variants of a real Celery message, for the decoder and the worker: truncations,
//! flipped bytes, bad UTF-8, non-JSON numbers, type swaps, extreme numbers and times, huge
//! strings, deep nesting and broken bodies. Deterministic from a seed, so a failure names the
//! seed and index that reproduce it.

use base64::Engine as _;
use serde_json::{Value, json};

/// The message Python's `add.apply_async((2, 3))` leaves in Redis (celery 5.7).
pub const CAPTURED: &str = include_str!("../fixtures/celery-5.7-add.json");

/// A small deterministic generator (splitmix64).
pub struct Rng(u64);

impl Rng {
    /// A generator that always yields the same sequence for `seed`.
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n` > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// True about once in `n`.
    pub fn one_in(&mut self, n: usize) -> bool {
        self.below(n) == 0
    }
}

/// The captured message re-addressed: `task` with `args` under a fresh `id`.
pub fn celery_message(task: &str, id: &str, args: &Value) -> Value {
    let mut env: Value = serde_json::from_str(CAPTURED).expect("the captured message is JSON");
    env["headers"]["task"] = json!(task);
    env["headers"]["id"] = json!(id);
    env["headers"]["root_id"] = json!(id);
    env["headers"]["argsrepr"] = json!(args.to_string());
    env["properties"]["correlation_id"] = json!(id);
    set_body(
        &mut env,
        &json!([args, {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]),
    );
    env
}

fn set_body(env: &mut Value, body: &Value) {
    env["body"] = json!(base64::engine::general_purpose::STANDARD.encode(body.to_string()));
}

/// `message` with one to three hostile changes, as bytes (they need not be UTF-8).
pub fn mutate(rng: &mut Rng, message: &Value) -> Vec<u8> {
    let mut env = message.clone();
    for _ in 0..=rng.below(2) {
        match rng.below(4) {
            0 | 1 => set_header_or_property(rng, &mut env),
            2 => mutate_body(rng, &mut env),
            _ => remove_something(rng, &mut env),
        }
    }
    let mut bytes = env.to_string().into_bytes();
    if rng.one_in(3) {
        mutate_text(rng, &mut bytes);
    }
    bytes
}

/// The headers and properties the worker reads, and some it only carries.
const HEADERS: &[&str] = &[
    "task",
    "id",
    "eta",
    "expires",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "group",
    "ignore_result",
    "argsrepr",
    "lang",
    "shadow",
    "group_index",
];
const PROPERTIES: &[&str] =
    &["priority", "body_encoding", "delivery_info", "correlation_id", "delivery_tag"];

fn set_header_or_property(rng: &mut Rng, env: &mut Value) {
    let value = hostile_value(rng);
    match rng.below(5) {
        0 => put(env.get_mut("properties"), PROPERTIES[rng.below(PROPERTIES.len())], value),
        1 => put(Some(env), ["content-type", "content-encoding"][rng.below(2)], value),
        _ => put(env.get_mut("headers"), HEADERS[rng.below(HEADERS.len())], value),
    }
}

/// Sets `key` of `target` when it is an object (an earlier mutation may have made it anything).
fn put(target: Option<&mut Value>, key: &str, value: Value) {
    if let Some(Value::Object(map)) = target {
        map.insert(key.to_string(), value);
    }
}

fn remove_something(rng: &mut Rng, env: &mut Value) {
    let Some(top) = env.as_object_mut() else { return };
    match rng.below(3) {
        0 => {
            let keys: Vec<String> = top.keys().cloned().collect();
            top.remove(&keys[rng.below(keys.len())]);
        }
        1 => {
            if let Some(h) = top.get_mut("headers").and_then(Value::as_object_mut) {
                h.remove(HEADERS[rng.below(HEADERS.len())]);
            }
        }
        _ => {
            if let Some(p) = top.get_mut("properties").and_then(Value::as_object_mut) {
                p.remove(PROPERTIES[rng.below(PROPERTIES.len())]);
            }
        }
    }
}

fn mutate_body(rng: &mut Rng, env: &mut Value) {
    let Some(text) = env["body"].as_str() else { return };
    let Ok(raw) = base64::engine::general_purpose::STANDARD.decode(text) else { return };
    let Ok(mut body) = serde_json::from_slice::<Value>(&raw) else { return };
    match rng.below(8) {
        // A type swap or a strange value for args, kwargs or the embed.
        0..=2 => {
            if let Some(parts) = body.as_array_mut()
                && !parts.is_empty()
            {
                let at = rng.below(parts.len());
                parts[at] = hostile_value(rng);
            }
        }
        // A hostile value inside args or kwargs: the task gets it.
        3 => {
            let v = hostile_value(rng);
            if let Some(args) = body.get_mut(0).and_then(Value::as_array_mut) {
                args.push(v);
            }
        }
        // A workflow part set to something odd.
        4 => {
            let part = ["callbacks", "errbacks", "chain", "chord"][rng.below(4)];
            put(body.get_mut(2), part, hostile_value(rng));
        }
        // Too few or too many parts.
        5 => {
            if let Some(parts) = body.as_array_mut() {
                match rng.below(2) {
                    0 => {
                        parts.pop();
                        parts.pop();
                    }
                    _ => parts.push(json!("extra")),
                }
            }
        }
        // The body sent as plain JSON, or as base64 of something that is not.
        6 => {
            env["body"] = json!(body.to_string());
            return;
        }
        _ => {
            let mut bytes = body.to_string().into_bytes();
            mutate_text(rng, &mut bytes);
            env["body"] = json!(base64::engine::general_purpose::STANDARD.encode(bytes));
            return;
        }
    }
    set_body(env, &body);
}

/// Values that have broken decoders: type swaps, extreme numbers, odd and huge strings, times
/// out of range, kombu tags and deep nesting.
fn hostile_value(rng: &mut Rng) -> Value {
    match rng.below(30) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(u64::MAX),
        4 => json!(i64::MIN),
        5 => json!(1e308),
        6 => json!(-1e308),
        7 => json!(5e-324),
        8 => json!(1.5),
        9 => json!(""),
        10 => json!("NaN"),
        11 => json!("Infinity"),
        12 => json!("2020-13-45T99:99:99"),
        13 => json!("9999-12-31T23:59:59.999999+00:00"),
        14 => json!("+262142-01-01T00:00:00Z"),
        15 => json!("1970-01-01T00:00:00+00:00"),
        16 => json!("\u{0}\u{1b}[2J\u{7f}\u{202e}"),
        17 => json!("x".repeat(1 + rng.below(256 << 10))),
        18 => json!([]),
        19 => json!([1, "two", null, 3.5]),
        20 => json!({}),
        21 => json!({"__type__": "datetime", "__value__": "not a time"}),
        22 => json!({"__type__": "bytes", "__value__": [1, 2]}),
        23 => {
            let mut v = json!(0);
            for _ in 0..rng.below(150) {
                v = json!([v]);
            }
            v
        }
        24 => json!([null, null]),
        25 => json!([1e300, -1]),
        26 => json!([18446744073709551615u64, 1e-300]),
        27 => json!(u32::MAX),
        28 => json!("tasks.add"),
        _ => json!({"callbacks": [{"task": 7}], "chain": "x"}),
    }
}

/// Byte-level damage to serialized JSON.
fn mutate_text(rng: &mut Rng, bytes: &mut Vec<u8>) {
    if bytes.is_empty() {
        return;
    }
    let at = rng.below(bytes.len());
    match rng.below(6) {
        0 => bytes.truncate(at),
        1 => bytes[at] = rng.next_u64() as u8,
        2 => {
            let bad: &[u8] =
                [&b"\xff"[..], b"\xc3\x28", b"\xed\xa0\x80", b"\xf4\x90\x80\x80"][rng.below(4)];
            bytes.splice(at..at, bad.iter().copied());
        }
        // Numbers JSON does not have, where a value starts.
        3 => {
            let token: &[u8] =
                [&b"NaN"[..], b"Infinity", b"-Infinity", b"1e400", b"-0x10", b"01", b"1e-400"]
                    [rng.below(7)];
            let rest = &bytes[at..];
            if let Some(pos) = rest.windows(4).position(|w| w == b"null") {
                bytes.splice(at + pos..at + pos + 4, token.iter().copied());
            } else if let Some(pos) = rest.windows(2).position(|w| w == b":0") {
                bytes.splice(at + pos + 1..at + pos + 2, token.iter().copied());
            } else {
                bytes.truncate(at);
                bytes.extend_from_slice(token);
            }
        }
        4 => {
            let n = 1 + rng.below(16);
            let copy: Vec<u8> = bytes[at..(at + n).min(bytes.len())].to_vec();
            bytes.splice(at..at, copy);
        }
        _ => {
            let end = (at + 1 + rng.below(32)).min(bytes.len());
            bytes.drain(at..end);
        }
    }
}
