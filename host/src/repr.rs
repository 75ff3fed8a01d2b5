//! Python's `repr` of JSON values: what Celery shows as text for a task's args, kwargs, result
//! and exception (the `argsrepr` header, the `result` of a `task-succeeded` event, Flower's task
//! page). A Python client or Flower reading celeriac's text sees what a Python worker would have
//! written: `('a', None, True)`, `{'k': 1.5}`, `ValueError('boom')`.

use serde_json::Value;
use std::fmt::Write as _;

/// The longest text Celery keeps for a repr (`resultrepr_maxsize`, `argsrepr_maxsize`).
pub const MAX_REPR: usize = 1024;

/// `repr(value)`.
pub fn repr(value: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, value);
    out
}

/// `repr(tuple(args))` for a JSON array of positional args: `(1,)`, `(1, 2)`, `()`. Anything
/// else is shown as its own repr.
pub fn args_repr(args: &Value) -> String {
    let Value::Array(items) = args else { return repr(args) };
    let mut out = String::from("(");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_value(&mut out, item);
    }
    if items.len() == 1 {
        out.push(',');
    }
    out.push(')');
    out
}

/// The repr of JSON given as text; text that is not JSON is shown as a Python string.
pub fn repr_of_json(text: &str) -> String {
    match serde_json::from_str::<Value>(text) {
        Ok(v) => repr(&v),
        Err(_) => repr(&Value::String(text.to_string())),
    }
}

/// `repr(ExcType('message'))`, as Celery's events show an exception.
pub fn exception_repr(exc_type: &str, message: &str) -> String {
    let mut out = String::from(exc_type);
    out.push('(');
    write_str(&mut out, message);
    out.push(')');
    out
}

/// Cuts `text` to at most `max` bytes on a character boundary, marking the cut with `...` as
/// Celery's `saferepr` does.
pub fn truncate(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut cut = max;
        while !text.is_char_boundary(cut) {
            cut -= 1;
        }
        text.truncate(cut);
        text.push_str("...");
    }
    text
}

fn write_value(out: &mut String, value: &Value) {
    match value {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(map) => {
            out.push('{');
            for (i, (k, v)) in map.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, v);
            }
            out.push('}');
        }
    }
}

/// Integers as they are; floats as Python prints them (`1.0`, `1e+20`, `1e-07`).
fn write_number(out: &mut String, n: &serde_json::Number) {
    if n.is_f64() {
        let f = n.as_f64().unwrap_or(f64::NAN);
        let text = n.to_string();
        match text.split_once('e') {
            // Python always signs an exponent and writes at least two digits.
            Some((mantissa, exp)) => {
                let (sign, digits) = match exp.strip_prefix('-') {
                    Some(d) => ('-', d),
                    None => ('+', exp.trim_start_matches('+')),
                };
                let _ = write!(out, "{mantissa}e{sign}{digits:0>2}");
            }
            None if f.fract() == 0.0 && !text.contains('.') => {
                let _ = write!(out, "{text}.0");
            }
            None => out.push_str(&text),
        }
    } else {
        let _ = write!(out, "{n}");
    }
}

/// A Python string literal: single quotes unless the text has one and no double quote, and
/// escapes for what is not printable.
fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') { '"' } else { '\'' };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c if c.is_control() => {
                let _ = write!(out, "\\x{:02x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_values_read_as_python_would_print_them() {
        assert_eq!(repr(&json!(null)), "None");
        assert_eq!(repr(&json!([true, false, 3, -2.5, 1.0])), "[True, False, 3, -2.5, 1.0]");
        assert_eq!(repr(&json!({"a": "x", "b": [null]})), "{'a': 'x', 'b': [None]}");
        assert_eq!(repr(&json!("it's")), "\"it's\"");
        assert_eq!(repr(&json!("say \"hi\" it's")), "'say \"hi\" it\\'s'");
        assert_eq!(repr(&json!("a\nb\\c\u{1}")), "'a\\nb\\\\c\\x01'");
        // Words that are JSON literals inside a string stay as they were written.
        assert_eq!(repr(&json!("null true")), "'null true'");
        assert_eq!(repr(&json!(1e20)), "1e+20");
        assert_eq!(repr(&json!(1.5e-7)), "1.5e-07");
        assert_eq!(repr(&json!(12345678901234567890u64)), "12345678901234567890");
    }

    #[test]
    fn args_are_a_tuple_and_exceptions_a_call() {
        assert_eq!(args_repr(&json!([])), "()");
        assert_eq!(args_repr(&json!([1])), "(1,)");
        assert_eq!(args_repr(&json!([1, "a"])), "(1, 'a')");
        assert_eq!(exception_repr("ValueError", "boom"), "ValueError('boom')");
        assert_eq!(repr_of_json("not json"), "'not json'");
        assert_eq!(truncate("é".repeat(10), 5), "éé...");
    }
}
