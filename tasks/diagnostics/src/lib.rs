//! Diagnostic tasks: `noop`, `add`, `tsum`, `fanout`, `sleep`, `spin`, `fail` and `flaky`, for
//! smoke tests, benchmarks and the Celery interop tests (`add` and `tsum` are the steps and
//! chord bodies of the workflow tests, `fanout` sends them as a chain, group or chord).
//!
//! Built with the workspace (`cargo build`); run one with
//! `celeriac run diagnostics.noop --args '[42]'`.

use celeriac_sdk::serde_json::Value;
use celeriac_sdk::{Context, Step, TaskError, TaskResult, task};
use std::time::{Duration, Instant};

task! {
    /// Returns its argument unchanged.
    #[task(name = "diagnostics.noop", queue = "default")]
    pub fn noop(_cx: &Context, x: Value) -> TaskResult<Value> {
        Ok(x)
    }

    /// `x + y`, as Celery's canonical `add` (a chain step gets the previous result as `x`).
    #[task(name = "diagnostics.add", queue = "default")]
    pub fn add(_cx: &Context, x: i64, y: i64) -> TaskResult<i64> {
        x.checked_add(y).ok_or_else(|| TaskError::invalid(format!("{x} + {y} overflows")))
    }

    /// The sum of a list, as a chord body gets its parts' results.
    #[task(name = "diagnostics.tsum", queue = "default")]
    pub fn tsum(_cx: &Context, values: Vec<i64>) -> TaskResult<i64> {
        values
            .iter()
            .try_fold(0i64, |sum, v| sum.checked_add(*v))
            .ok_or_else(|| TaskError::invalid("the sum overflows"))
    }

    /// Sends `n` children as one workflow (`kind`: `chain`, `group` or `chord`) of
    /// `diagnostics.add` steps, and returns their ids: a chain of `add(1, 1)` then `add(1)`
    /// (result `n + 1`), a group of `add(i, i)`, or a chord of those whose body is
    /// `diagnostics.tsum` (result `n * (n - 1)`, its id last). Needs those two names granted.
    #[task(name = "diagnostics.fanout", queue = "default")]
    pub fn fanout(cx: &Context, kind: String, n: u32) -> TaskResult<Vec<String>> {
        let step = |args: &[u32]| Step::new("diagnostics.add", &args).map_err(TaskError::from);
        let sent = match kind.as_str() {
            "chain" => {
                let mut steps = vec![step(&[1, 1])?];
                for _ in 1..n {
                    steps.push(step(&[1])?);
                }
                cx.chain(&steps)
            }
            "group" => cx.group(&(0..n).map(|i| step(&[i, i])).collect::<Result<Vec<_>, _>>()?),
            "chord" => {
                let header = (0..n).map(|i| step(&[i, i])).collect::<Result<Vec<_>, _>>()?;
                let body = Step::new("diagnostics.tsum", &[0u32; 0]).map_err(TaskError::from)?;
                cx.chord(&header, &body)
            }
            other => return Err(TaskError::invalid(format!("no workflow kind {other:?}"))),
        };
        sent.map_err(TaskError::from)
    }

    /// Sleeps for `ms` milliseconds (a task that waits), returning early when cancelled.
    /// Reports a `PROGRESS` state with the elapsed time every 100 ms, when granted progress.
    #[task(name = "diagnostics.sleep", queue = "default")]
    pub fn sleep(cx: &Context, ms: u64) -> TaskResult<u64> {
        let start = Instant::now();
        let total = Duration::from_millis(ms);
        let mut reported = 0;
        loop {
            // Read the clock once per round: the time left is computed from the same reading
            // that decided the loop goes on, so it can never be negative.
            let elapsed = start.elapsed();
            let Some(left) = total.checked_sub(elapsed).filter(|l| !l.is_zero()) else { break };
            if cx.cancelled() {
                return Err(TaskError::fail("SoftTimeLimitExceeded", "cancelled while sleeping"));
            }
            let elapsed_ms = elapsed.as_millis() as u64;
            if elapsed_ms / 100 > reported {
                reported = elapsed_ms / 100;
                // Progress is optional: without the grant the task just sleeps.
                let _ = cx.progress("PROGRESS", &celeriac_sdk::serde_json::json!({"elapsed_ms": elapsed_ms, "total_ms": ms}));
            }
            std::thread::sleep(left.min(Duration::from_millis(10)));
        }
        Ok(start.elapsed().as_millis() as u64)
    }

    /// Burns CPU for `ms` milliseconds and returns how many rounds of work it did.
    #[task(name = "diagnostics.spin", queue = "default")]
    pub fn spin(cx: &Context, ms: u64) -> TaskResult<u64> {
        let start = Instant::now();
        let mut rounds = 0u64;
        while start.elapsed() < Duration::from_millis(ms) {
            rounds += u64::from(busy_work(rounds) & 1);
            rounds += 1;
            if rounds.is_multiple_of(1024) && cx.cancelled() {
                return Err(TaskError::fail("SoftTimeLimitExceeded", "cancelled while spinning"));
            }
        }
        Ok(rounds)
    }

    /// Fails permanently with `message` (a `ValueError` in Python).
    #[task(name = "diagnostics.fail", queue = "default")]
    pub fn fail(_cx: &Context, message: String) -> TaskResult<()> {
        Err(TaskError::invalid(message))
    }

    /// Asks to be retried until it runs as attempt `n` (retries = n - 1), then returns the
    /// attempt number.
    #[task(name = "diagnostics.flaky", queue = "default", max_retries = 5, retry_backoff_ms = 100)]
    pub fn flaky(cx: &Context, n: u32) -> TaskResult<u32> {
        let attempt = cx.retries() + 1;
        if attempt < n {
            return Err(TaskError::retry(format!("attempt {attempt} of {n}: not yet")));
        }
        Ok(attempt)
    }
}

/// A few hundred integer operations the optimiser cannot remove.
fn busy_work(seed: u64) -> u32 {
    let mut x = seed as u32 | 1;
    for _ in 0..256 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
    }
    std::hint::black_box(x)
}

#[cfg(target_arch = "wasm32")]
celeriac_sdk::export_tasks!(noop, add, tsum, fanout, sleep, spin, fail, flaky);

#[cfg(test)]
mod tests {
    use super::*;
    use celeriac_sdk::serde_json::json;

    fn cx(retries: u32) -> Context {
        Context::detached("t-1", retries)
    }

    #[test]
    fn noop_returns_its_argument() {
        assert_eq!(noop(&cx(0), json!({"a": [1, 2]})).unwrap(), json!({"a": [1, 2]}));
    }

    #[test]
    fn add_and_tsum_add_up_and_refuse_to_overflow() {
        assert_eq!(add(&cx(0), 2, 3).unwrap(), 5);
        assert!(add(&cx(0), i64::MAX, 1).is_err());
        assert_eq!(tsum(&cx(0), vec![1, 2, 3]).unwrap(), 6);
        assert_eq!(tsum(&cx(0), vec![]).unwrap(), 0);
        assert!(tsum(&cx(0), vec![i64::MAX, 1]).is_err());
    }

    #[test]
    fn fail_is_a_permanent_value_error() {
        assert_eq!(fail(&cx(0), "boom".into()), Err(TaskError::fail("ValueError", "boom")));
    }

    #[test]
    fn flaky_retries_until_attempt_n() {
        assert!(matches!(flaky(&cx(0), 3), Err(TaskError::Retry { .. })));
        assert!(matches!(flaky(&cx(1), 3), Err(TaskError::Retry { .. })));
        assert_eq!(flaky(&cx(2), 3), Ok(3));
    }

    #[test]
    fn task_declares_its_defaults() {
        let info = flaky::info();
        assert_eq!(info.name, "diagnostics.flaky");
        assert_eq!(info.max_retries, Some(5));
        assert!(info.description.starts_with("Asks to be retried"));
    }
}
