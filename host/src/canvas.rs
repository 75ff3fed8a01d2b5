//! Celery's canvas as a worker follows it: the third element of a task body (`callbacks`,
//! `errbacks`, `chain`, `chord`) says what is sent when the task ends. A Python app's
//! `chain(...)`, `link=` and `link_error=` therefore work unchanged with celeriac workers.
//!
//! Nothing here talks to Redis: a finished task's workflow becomes messages ([`Sent`]) and result
//! ids, which the worker hands to the settler with the task's own result and ack, so a crash never
//! splits a task from what follows it.
//!
//! What a Python worker does, and this module mirrors (`celery/app/trace.py`,
//! `celery/backends/base.py`):
//! - on success, every callback gets the result as its first argument, then the next chain step
//!   does, carrying the rest of the chain; their ids become the task's `children`;
//! - on failure, the same FAILURE is stored at every frozen id of the rest of the chain (so
//!   `chain(...).get()` raises instead of waiting for ever), and every errback is sent with the
//!   failed task's id as its only argument.
//!
//! Python's "new-style" errbacks (`def on_error(request, exc, traceback)`) run inside a Python
//! worker's process; sent to celeriac they are tasks like any other, given the failed id.

use crate::broker::FollowUp;
use crate::protocol::{self, NewTask, TaskMessage};
use serde_json::{Map, Value, json};

/// The workflow a task message carries: signature dicts, as Celery sends them.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Workflow {
    /// `link`: sent with the result on success.
    pub callbacks: Vec<Value>,
    /// `link_error`: sent with the failed task's id on failure.
    pub errbacks: Vec<Value>,
    /// The rest of a chain, **last step first** (Celery pops the next step off the end).
    pub chain: Vec<Value>,
    /// The chord body this task is a header part of.
    pub chord: Option<Value>,
}

/// Why a workflow cannot be followed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CanvasError(pub String);

fn bad(what: impl Into<String>) -> CanvasError {
    CanvasError(what.into())
}

impl Workflow {
    /// Reads a body's third element. `Ok(None)` when nothing follows the task (all four parts
    /// null or empty); an error names the part that is not a list of signatures.
    pub fn parse(embed: &Value) -> Result<Option<Workflow>, CanvasError> {
        let Value::Object(embed) = embed else {
            return match embed {
                Value::Null => Ok(None),
                other => Err(bad(format!("the body's third element is not an object: {other}"))),
            };
        };
        let list = |key: &str| -> Result<Vec<Value>, CanvasError> {
            match embed.get(key) {
                None | Some(Value::Null) => Ok(Vec::new()),
                Some(Value::Array(sigs)) => {
                    for (i, sig) in sigs.iter().enumerate() {
                        check_signature(sig).map_err(|e| bad(format!("{key}[{i}]: {}", e.0)))?;
                    }
                    Ok(sigs.clone())
                }
                Some(other) => Err(bad(format!("{key} is not a list of signatures: {other}"))),
            }
        };
        let chord = match embed.get("chord") {
            None | Some(Value::Null) => None,
            Some(sig) => {
                check_signature(sig).map_err(|e| bad(format!("chord: {}", e.0)))?;
                Some(sig.clone())
            }
        };
        let wf = Workflow {
            callbacks: list("callbacks")?,
            errbacks: list("errbacks")?,
            chain: list("chain")?,
            chord,
        };
        Ok((!wf.is_empty()).then_some(wf))
    }

    /// Whether nothing follows the task.
    pub fn is_empty(&self) -> bool {
        self.callbacks.is_empty()
            && self.errbacks.is_empty()
            && self.chain.is_empty()
            && self.chord.is_none()
    }

    /// The body's third element for a message carrying this workflow.
    pub fn embed(&self) -> Value {
        let list = |sigs: &[Value]| if sigs.is_empty() { Value::Null } else { json!(sigs) };
        json!({
            "callbacks": list(&self.callbacks),
            "errbacks": list(&self.errbacks),
            "chain": list(&self.chain),
            "chord": self.chord,
        })
    }

    /// The ids of the rest of the chain that were frozen by the client: a failure is stored at
    /// each, as Celery's `mark_as_failure` does.
    pub fn chain_ids(&self) -> Vec<String> {
        self.chain
            .iter()
            .filter_map(|s| s["options"]["task_id"].as_str())
            .map(str::to_string)
            .collect()
    }
}

/// Checks that `sig` is a signature dict: a task name, a list of args, a dict of kwargs and a
/// dict of options (each may be missing).
fn check_signature(sig: &Value) -> Result<(), CanvasError> {
    let Value::Object(m) = sig else { return Err(bad(format!("not a signature: {sig}"))) };
    match m.get("task") {
        Some(Value::String(t)) if !t.is_empty() => {}
        _ => return Err(bad("a signature without a task name")),
    }
    let ok =
        |key: &str, shape: fn(&Value) -> bool| m.get(key).is_none_or(|v| v.is_null() || shape(v));
    if !ok("args", Value::is_array)
        || !ok("kwargs", Value::is_object)
        || !ok("options", Value::is_object)
    {
        return Err(bad("a signature's args must be a list, kwargs and options dicts"));
    }
    Ok(())
}

/// A message a workflow sends: its task id (for `children`) and how it is sent.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// The new task's id.
    pub id: String,
    /// Publish now, or schedule for its countdown/eta.
    pub follow_up: FollowUp,
}

/// Everything a workflow step sends: its messages, and the size of each chord it starts, which
/// the join needs before any of the chord's parts can end.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Followed {
    /// Messages, in the order Celery sends them.
    pub sent: Vec<Sent>,
    /// `(group id, header size)` of each chord started.
    pub chord_sizes: Vec<(String, u64)>,
}

/// The queue a task goes to when its signature names none.
pub trait Router {
    /// The queue for task `name`.
    fn queue_for(&self, name: &str) -> String;
}

impl<F: Fn(&str) -> String> Router for F {
    fn queue_for(&self, name: &str) -> String {
        self(name)
    }
}

/// Where a workflow's messages come from: the task that ended (their parent), and how a task
/// name is routed to a queue when its signature names none.
pub struct Origin<'a> {
    /// The task that ended.
    pub id: &'a str,
    /// Its workflow's root.
    pub root_id: &'a str,
    /// Its priority, which what it sends inherits.
    pub priority: u8,
    /// Queues for task names.
    pub route: &'a dyn Router,
}

impl<'a> Origin<'a> {
    /// Messages sent because `task` ended.
    pub fn of(task: &'a TaskMessage, route: &'a dyn Router) -> Origin<'a> {
        let root_id = task.root_id.as_deref().unwrap_or(&task.id);
        Origin { id: &task.id, root_id, priority: task.priority, route }
    }
}

/// What a successful task sends, in Celery's order: its callbacks with `result` prepended, then
/// the next step of its chain, carrying the steps after it.
pub fn on_success(
    wf: &Workflow,
    from: &Origin<'_>,
    result: &Value,
) -> Result<Followed, CanvasError> {
    let mut out = Followed::default();
    for sig in &wf.callbacks {
        apply(sig, Some(result), &[], from, &mut out)?;
    }
    if let Some((next, rest)) = wf.chain.split_last() {
        apply(next, Some(result), rest, from, &mut out)?;
    }
    Ok(out)
}

/// What sending a workflow signature (a task's own chain, group or chord of children) sends.
pub fn send(sig: &Value, from: &Origin<'_>) -> Result<Followed, CanvasError> {
    let mut out = Followed::default();
    apply(sig, None, &[], from, &mut out)?;
    Ok(out)
}

/// What a failed task sends: each errback, given the failed task's id.
pub fn on_failure(wf: &Workflow, from: &Origin<'_>) -> Result<Followed, CanvasError> {
    let mut out = Followed::default();
    let failed = Value::String(from.id.to_string());
    for sig in &wf.errbacks {
        apply(sig, Some(&failed), &[], from, &mut out)?;
    }
    Ok(out)
}

/// Sends one signature as `Signature.apply_async((partial,), chain=chain)` would: a plain task
/// becomes one message; a group, one message per member; a chain, its first step carrying the
/// rest; a chord, its header parts (the rest of the chain goes on from its body).
fn apply(
    sig: &Value,
    partial: Option<&Value>,
    chain: &[Value],
    from: &Origin<'_>,
    out: &mut Followed,
) -> Result<(), CanvasError> {
    check_signature(sig)?;
    let kind = sig.get("subtask_type").and_then(Value::as_str);
    // An immutable signature (`.si()`) keeps its own args.
    let partial = partial.filter(|_| sig["immutable"] != Value::Bool(true));
    let own_id = || sig["options"]["task_id"].as_str().map(str::to_string);
    match kind {
        None => {
            out.sent.push(message(sig, partial, chain, None, from));
            Ok(())
        }
        Some("chain") => {
            let steps = members(sig, "chain")?;
            let (first, after) = steps.split_first().unwrap_or_else(|| unreachable!());
            // The inner chain's steps run before the outer chain's: they go at its end.
            let mut rest = chain.to_vec();
            rest.extend(after.iter().rev().cloned());
            apply(first, partial, &rest, from, out)
        }
        Some("group") if chain.is_empty() => {
            let group_id = own_id().unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            send_members(&members(sig, "group")?, partial, &group_id, None, from, out)
        }
        Some("group") => {
            Err(bad("a group followed by more chain steps (Celery's client sends that as a chord)"))
        }
        Some("chord") => {
            let header = match &sig["kwargs"]["header"] {
                group @ Value::Object(_) => members(group, "chord header")?,
                Value::Array(parts) if !parts.is_empty() => parts.clone(),
                other => return Err(bad(format!("a chord without a header: {other}"))),
            };
            let mut body = sig["kwargs"]["body"].clone();
            check_signature(&body).map_err(|e| bad(format!("the chord's body: {}", e.0)))?;
            let group_id = sig["kwargs"]["header"]["options"]["task_id"]
                .as_str()
                .map(str::to_string)
                .or_else(own_id)
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
            // As Celery's `_chord.run`: the body carries the rest of the chain and the group.
            let options = body
                .as_object_mut()
                .and_then(|b| {
                    b.entry("options").or_insert_with(|| json!({}));
                    b.get_mut("options")?.as_object_mut()
                })
                .ok_or_else(|| bad("the chord's body has no options"))?;
            options.insert("group_id".into(), json!(group_id));
            if !options.contains_key("task_id") {
                options.insert("task_id".into(), json!(uuid::Uuid::new_v4().to_string()));
            }
            if !chain.is_empty() {
                options.insert("chain".into(), json!(chain));
            }
            out.chord_sizes.push((group_id.clone(), header.len() as u64));
            send_members(&header, partial, &group_id, Some(&body), from, out)
        }
        Some(other) => Err(bad(format!("celeriac cannot follow a {other:?} signature yet"))),
    }
}

/// The signatures a group, chain or chord header signature holds (`kwargs.tasks`).
fn members(sig: &Value, what: &str) -> Result<Vec<Value>, CanvasError> {
    match &sig["kwargs"]["tasks"] {
        Value::Array(t) if !t.is_empty() => Ok(t.clone()),
        other => Err(bad(format!("a {what} signature without tasks: {other}"))),
    }
}

/// Sends a group's members (a chord's header parts when `chord` is its body), each with the
/// group id and its index, and `partial` first unless it is immutable.
fn send_members(
    members: &[Value],
    partial: Option<&Value>,
    group_id: &str,
    chord: Option<&Value>,
    from: &Origin<'_>,
    out: &mut Followed,
) -> Result<(), CanvasError> {
    for (i, member) in members.iter().enumerate() {
        check_signature(member)?;
        if member.get("subtask_type").and_then(Value::as_str).is_some() {
            return Err(bad("a group or chord header whose members are groups, chains or chords"));
        }
        let index = member["options"]["group_index"].as_u64().unwrap_or(i as u64);
        let partial = partial.filter(|_| member["immutable"] != Value::Bool(true));
        out.sent.push(message(member, partial, &[], Some((group_id, index, chord)), from));
    }
    Ok(())
}

/// One task message for a plain signature.
fn message(
    sig: &Value,
    partial: Option<&Value>,
    chain: &[Value],
    group: Option<(&str, u64, Option<&Value>)>,
    from: &Origin<'_>,
) -> Sent {
    let empty = Map::new();
    let options = sig["options"].as_object().unwrap_or(&empty);
    let name = sig["task"].as_str().unwrap_or_default();
    let mut args: Vec<Value> = partial.into_iter().cloned().collect();
    args.extend(sig["args"].as_array().into_iter().flatten().cloned());
    let kwargs = match &sig["kwargs"] {
        Value::Object(k) => Value::Object(k.clone()),
        _ => json!({}),
    };
    let opt_str = |key: &str| options.get(key).and_then(Value::as_str).map(str::to_string);
    let queue = opt_str("queue").unwrap_or_else(|| from.route.queue_for(name));
    let priority =
        options.get("priority").and_then(Value::as_u64).map_or(from.priority, |p| p.min(9) as u8);
    let eta = match options.get("countdown").and_then(Value::as_f64) {
        Some(secs) if secs > 0.0 => {
            Some(protocol::eta_after(std::time::Duration::from_secs_f64(secs.min(1e9))))
        }
        _ => opt_str("eta").as_deref().and_then(protocol::parse_time),
    };
    let expires = match options.get("expires") {
        Some(Value::Number(secs)) => secs
            .as_f64()
            .map(|s| protocol::eta_after(std::time::Duration::from_secs_f64(s.clamp(0.0, 1e9)))),
        Some(Value::String(t)) => protocol::parse_time(t),
        _ => None,
    };
    let links = |key: &str| match options.get(key) {
        Some(Value::Array(sigs)) => sigs.clone(),
        Some(sig @ Value::Object(_)) => vec![sig.clone()],
        _ => Vec::new(),
    };
    // The rest of a chain comes from the caller, or (a chord's body) from the options.
    let chain = match (chain, options.get("chain")) {
        ([], Some(Value::Array(rest))) => rest.clone(),
        (chain, _) => chain.to_vec(),
    };
    let (group, group_index, chord) = match group {
        Some((id, index, chord)) => (Some(id.to_string()), Some(index), chord.cloned()),
        None => (
            opt_str("group_id"),
            options.get("group_index").and_then(Value::as_u64),
            options.get("chord").filter(|c| !c.is_null()).cloned(),
        ),
    };
    let workflow =
        Workflow { callbacks: links("link"), errbacks: links("link_error"), chain, chord };
    let opts = NewTask {
        id: opt_str("task_id"),
        priority: Some(priority),
        eta,
        expires,
        parent_id: Some(from.id.to_string()),
        root_id: Some(from.root_id.to_string()),
        group,
        group_index,
        workflow: (!workflow.is_empty()).then_some(workflow),
    };
    let (id, envelope) = protocol::encode(name, &Value::Array(args), &kwargs, &queue, &opts);
    let follow_up = match eta {
        Some(eta) => {
            FollowUp::Schedule { queue, priority, envelope, due_ms: eta.timestamp_millis() }
        }
        None => FollowUp::Publish { queue, priority, envelope },
    };
    Sent { id, follow_up }
}

/// A chord header part that ended, as the chord's join records it (Celery's
/// `on_chord_part_return`): its id and place in the group, its state and result (for FAILURE
/// and REVOKED the exception dict), and what the chord sends when this part completes it.
#[derive(Debug, Clone, PartialEq)]
pub struct ChordPart {
    /// The chord's group id (`celery-taskset-meta-<group>.*` holds the join).
    pub group_id: String,
    /// The part's task id.
    pub task_id: String,
    /// Its `group_index`: the join returns results in this order.
    pub index: Option<u64>,
    /// SUCCESS, FAILURE or REVOKED.
    pub state: String,
    /// The result, or the exception dict.
    pub result: Value,
    /// The chord body signature.
    pub body: Value,
    /// The root of the part's workflow (the body's root when this part completes the chord).
    pub root_id: String,
    /// The part's priority.
    pub priority: u8,
}

impl ChordPart {
    /// What the join stores for this part: Celery's `[1, task_id, state, result]`.
    pub fn entry(&self) -> String {
        json!([1, self.task_id, self.state, self.result]).to_string()
    }
}

/// The chord parts among a finished task's results: the task itself when it is a chord header
/// part (it carries a chord and a group), and, when it failed, every frozen id of the rest of
/// its chain that is a header part (a chain inside a chord fails the chord at its last step).
pub fn chord_parts(task: &TaskMessage, results: &[crate::results::StoredResult]) -> Vec<ChordPart> {
    let Some(wf) = task.workflow.as_deref() else { return Vec::new() };
    let root_id = task.root_id.as_deref().unwrap_or(&task.id);
    let ended = |id: &str| {
        let meta: Value = serde_json::from_str(&results.iter().find(|r| r.id == id)?.meta).ok()?;
        let state = meta["status"].as_str()?.to_string();
        crate::results::is_ready_state(&state).then(|| (state, meta["result"].clone()))
    };
    let mut parts = Vec::new();
    if let (Some(body), Some(group_id)) = (&wf.chord, &task.group)
        && let Some((state, result)) = ended(&task.id)
    {
        parts.push(ChordPart {
            group_id: group_id.clone(),
            task_id: task.id.clone(),
            index: task.group_index,
            state,
            result,
            body: body.clone(),
            root_id: root_id.to_string(),
            priority: task.priority,
        });
    }
    for step in &wf.chain {
        let options = &step["options"];
        let (Some(id), Some(group_id), Some(body)) = (
            options["task_id"].as_str(),
            options["group_id"].as_str(),
            options.get("chord").filter(|c| c.is_object()),
        ) else {
            continue;
        };
        if let Some((state, result)) = ended(id).filter(|(s, _)| s != protocol::states::SUCCESS) {
            parts.push(ChordPart {
                group_id: group_id.to_string(),
                task_id: id.to_string(),
                index: options["group_index"].as_u64(),
                state,
                result,
                body: body.clone(),
                root_id: root_id.to_string(),
                priority: task.priority,
            });
        }
    }
    parts
}

/// What completing a chord sends, given the join's entries (`[1, id, state, result]`, in
/// `group_index` order): the body, with the list of results as its first argument, from the
/// part that completed it. When a part failed or was revoked, the body is not run: it gets a
/// `ChordError` naming the first such part (as Celery's `Dependency <id> raised <repr>`), and
/// its errbacks are sent with the body's id.
pub fn chord_complete(
    part: &ChordPart,
    entries: &[Value],
    route: &dyn Router,
) -> Result<(Vec<crate::results::StoredResult>, Followed), CanvasError> {
    let from = Origin { id: &part.task_id, root_id: &part.root_id, priority: part.priority, route };
    let mut values = Vec::with_capacity(entries.len());
    for entry in entries {
        let (id, state, result) = (&entry[1], entry[2].as_str().unwrap_or_default(), &entry[3]);
        if [protocol::states::FAILURE, protocol::states::REVOKED].contains(&state) {
            let raised = match (result["exc_type"].as_str(), &result["exc_message"]) {
                (Some(t), Value::Array(m)) if m.len() == 1 && m[0].is_string() => {
                    crate::repr::exception_repr(t, m[0].as_str().unwrap_or_default())
                }
                (Some(t), m) => format!("{t}({})", crate::repr::repr(m)),
                _ => crate::repr::repr(result),
            };
            let id = id.as_str().unwrap_or("?");
            let message = format!("Dependency {id} raised {raised}");
            let exception = json!({"exc_type": "ChordError", "exc_message": [message],
                                   "exc_module": "celery.exceptions"});
            let body_id = part.body["options"]["task_id"].as_str().unwrap_or_default();
            let mut stored = Vec::new();
            if !body_id.is_empty() {
                let meta =
                    protocol::result_meta(body_id, protocol::states::FAILURE, exception, None, &[]);
                stored.push(crate::results::StoredResult { id: body_id.to_string(), meta });
            }
            let mut out = Followed::default();
            let errbacks = match &part.body["options"]["link_error"] {
                Value::Array(sigs) => sigs.clone(),
                sig @ Value::Object(_) => vec![sig.clone()],
                _ => Vec::new(),
            };
            let failed = Value::String(body_id.to_string());
            for sig in &errbacks {
                apply(sig, Some(&failed), &[], &from, &mut out)?;
            }
            return Ok((stored, out));
        }
        values.push(result.clone());
    }
    let mut out = Followed::default();
    apply(&part.body, Some(&Value::Array(values)), &[], &from, &mut out)?;
    Ok((Vec::new(), out))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sig(task: &str, args: Value, options: Value) -> Value {
        json!({"task": task, "args": args, "kwargs": {}, "options": options,
               "subtask_type": null, "immutable": false})
    }

    fn parent() -> TaskMessage {
        let (_, env) = protocol::encode(
            "tasks.add",
            &json!([1, 2]),
            &json!({}),
            "celery",
            &NewTask { priority: Some(3), root_id: Some("root".into()), ..NewTask::default() },
        );
        protocol::decode(env.as_bytes()).unwrap()
    }

    fn decoded(s: &Sent) -> TaskMessage {
        let (FollowUp::Publish { envelope, .. } | FollowUp::Schedule { envelope, .. }) =
            &s.follow_up
        else {
            panic!("not a message: {:?}", s.follow_up)
        };
        protocol::decode(envelope.as_bytes()).unwrap()
    }

    #[test]
    fn the_next_chain_step_gets_the_result_first_and_carries_the_rest() {
        let last = sig("tasks.add", json!([10, 10]), json!({"task_id": "t3"}));
        let last = {
            let mut l = last;
            l["immutable"] = json!(true);
            l
        };
        let next = sig("tasks.add", json!([3]), json!({"task_id": "t2"}));
        let wf = Workflow { chain: vec![last.clone(), next], ..Workflow::default() };
        let p = parent();
        let from = Origin::of(&p, &|_: &str| "celery".to_string());
        let sent = on_success(&wf, &from, &json!(3)).unwrap().sent;
        assert_eq!(sent.len(), 1);
        let step = decoded(&sent[0]);
        assert_eq!((step.id.as_str(), step.args.as_str()), ("t2", "[3,3]"));
        assert_eq!(step.parent_id.as_deref(), Some(p.id.as_str()));
        assert_eq!(step.root_id.as_deref(), Some("root"));
        assert_eq!(step.priority, 3, "the priority is inherited");
        assert_eq!(step.workflow.unwrap().chain, vec![last.clone()]);
        // The immutable last step ignores the result it is given.
        let wf = Workflow { chain: vec![last], ..Workflow::default() };
        let step = decoded(&on_success(&wf, &from, &json!(6)).unwrap().sent[0]);
        assert_eq!((step.id.as_str(), step.args.as_str()), ("t3", "[10,10]"));
    }

    #[test]
    fn errbacks_get_the_failed_id_and_the_rest_of_the_chain_is_named() {
        let wf = Workflow {
            errbacks: vec![sig("tasks.on_error", json!([]), json!({"queue": "errors"}))],
            chain: vec![
                sig("tasks.b", json!([]), json!({"task_id": "b"})),
                sig("tasks.c", json!([]), json!({})),
            ],
            ..Workflow::default()
        };
        let p = parent();
        let from = Origin::of(&p, &|_: &str| "celery".to_string());
        let sent = on_failure(&wf, &from).unwrap().sent;
        let errback = decoded(&sent[0]);
        assert_eq!(errback.args, format!("[{:?}]", p.id));
        assert!(matches!(&sent[0].follow_up, FollowUp::Publish { queue, .. } if queue == "errors"));
        assert_eq!(wf.chain_ids(), vec!["b".to_string()]);
    }

    #[test]
    fn a_group_step_sends_every_member_with_its_group_and_index() {
        let group = json!({"task": "celery.group", "args": [], "subtask_type": "group",
            "options": {"task_id": "g1"},
            "kwargs": {"tasks": [sig("tasks.add", json!([1]), json!({"task_id": "m0"})),
                                 sig("tasks.add", json!([2]), json!({"task_id": "m1"}))]}});
        let wf = Workflow { chain: vec![group], ..Workflow::default() };
        let p = parent();
        let from = Origin::of(&p, &|name: &str| format!("q-{name}"));
        let sent = on_success(&wf, &from, &json!(5)).unwrap().sent;
        let members: Vec<_> = sent.iter().map(decoded).collect();
        assert_eq!(members.len(), 2);
        for (i, m) in members.iter().enumerate() {
            assert_eq!(m.group.as_deref(), Some("g1"));
            assert_eq!(m.group_index, Some(i as u64));
            assert_eq!(m.args, format!("[5,{}]", i + 1));
        }
        assert!(
            matches!(&sent[0].follow_up, FollowUp::Publish { queue, .. } if queue == "q-tasks.add")
        );
    }

    #[test]
    fn a_chord_step_sizes_its_chord_and_its_body_carries_the_rest_of_the_chain() {
        let header = json!({"task": "celery.group", "subtask_type": "group",
            "options": {"task_id": "g1"},
            "kwargs": {"tasks": [sig("tasks.add", json!([1]), json!({"task_id": "h0"})),
                                 sig("tasks.add", json!([2]), json!({"task_id": "h1"}))]}});
        let chord = json!({"task": "celery.chord", "subtask_type": "chord", "args": [],
            "options": {"task_id": "g1"},
            "kwargs": {"header": header, "body": sig("tasks.tsum", json!([]), json!({"task_id": "b"}))}});
        let after = sig("tasks.add", json!([5]), json!({"task_id": "last"}));
        let wf = Workflow { chain: vec![after.clone(), chord], ..Workflow::default() };
        let p = parent();
        let from = Origin::of(&p, &|_: &str| "celery".to_string());
        let followed = on_success(&wf, &from, &json!(2)).unwrap();
        assert_eq!(followed.chord_sizes, vec![("g1".to_string(), 2)]);
        let parts: Vec<_> = followed.sent.iter().map(decoded).collect();
        assert_eq!(parts.iter().map(|m| m.args.as_str()).collect::<Vec<_>>(), ["[2,1]", "[2,2]"]);
        for (i, part) in parts.iter().enumerate() {
            assert_eq!((part.group.as_deref(), part.group_index), (Some("g1"), Some(i as u64)));
            let body = part.workflow.as_ref().unwrap().chord.clone().unwrap();
            assert_eq!(body["options"]["group_id"], "g1");
            assert_eq!(body["options"]["chain"], json!([after]));
        }
    }

    #[test]
    fn what_cannot_be_followed_is_an_error_that_says_what() {
        let bad_embed = json!({"callbacks": "tasks.add", "chain": null});
        assert!(Workflow::parse(&bad_embed).unwrap_err().0.contains("callbacks"));
        let nameless = json!({"callbacks": [{"args": []}]});
        assert!(Workflow::parse(&nameless).unwrap_err().0.contains("callbacks[0]"));
        assert_eq!(Workflow::parse(&json!({"callbacks": null, "chain": []})).unwrap(), None);
    }
}
