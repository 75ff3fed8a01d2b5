// celeriac-task: write celeriac tasks in JavaScript.
//
//   import { task } from 'celeriac-task';
//   task({ name: 'webhooks.validate', queue: 'webhooks', params: ['payload', 'schema'] },
//     function validate(payload, schema = 'v1') { ... });
//   export { describe, run } from 'celeriac-task';
//
// `npx celeriac-task-build app.js -o app.wasm` bundles the module (and the npm packages it
// imports) and builds it into a component with componentize-js. Each call runs in a fresh
// sandbox; a Python Celery client calls it as it calls any task.
//
// What a run sees:
// - positional args as the function's arguments; kwargs bind by the names in `params`, as
//   Python binds them (a mismatch fails with TypeError);
// - a thrown error fails the task with its class name and message, so a Celery client re-raises
//   `TypeError` or the task's own class name;
// - `retry({ countdown })` runs it again later;
// - `current()` is the running task: id, retries, kv, enqueue, chain/group/chord,
//   updateState, cancelled() and log. Each works only when the worker's configuration grants
//   it to the task; otherwise the call throws a PermissionError.

import { log as hostLog } from 'celeriac:task/log@0.1.0';
import { progress, cancelled } from 'celeriac:task/control@0.1.0';
import * as kv from 'celeriac:task/kv@0.1.0';
import * as children from 'celeriac:task/enqueue@0.1.0';

const TASKS = new Map();
let running = null;

/** Thrown (or made by `retry()`) to run the task again later; spends one retry. */
export class Retry extends Error {
  constructor(reason = 'retry requested', countdown = undefined) {
    super(reason);
    this.name = 'Retry';
    this.countdown = countdown;
  }
}

/** A capability the worker's configuration does not grant to this task. */
export class PermissionError extends Error {
  constructor(message) { super(message); this.name = 'PermissionError'; }
}

/** The soft time limit passed or the task was revoked: clean up and return. */
export class SoftTimeLimitExceeded extends Error {
  constructor(message = 'soft time limit exceeded or task revoked') {
    super(message); this.name = 'SoftTimeLimitExceeded';
  }
}

/** The host could not complete a call now (its store is unreachable); retried if it escapes. */
export class HostUnavailable extends Error {
  constructor(message) { super(message); this.name = 'HostUnavailable'; }
}

/** An argument the host refused (too large, malformed). */
export class ValueError extends Error {
  constructor(message) { super(message); this.name = 'ValueError'; }
}

const ms = (seconds, what) => {
  if (seconds === undefined || seconds === null) return undefined;
  if (typeof seconds !== 'number' || !(seconds >= 0)) {
    throw new TypeError(`${what} must be a number of seconds >= 0, got ${seconds}`);
  }
  return BigInt(Math.round(seconds * 1000));
};
const big = (n) => (n === undefined || n === null ? undefined : BigInt(n));

/**
 * Registers `fn` as the task `options.name`, with Celery's option names and units (seconds):
 * queue, maxRetries, softTimeLimit, timeLimit, defaultRetryDelay, retryBackoffMax, rateLimit;
 * celeriac's own memoryLimit (bytes) and fuel; `params`, the names kwargs bind to; `bind: true`
 * passes the running context first, like Celery's `self`.
 */
export function task(options, fn) {
  if (typeof options === 'string') options = { name: options };
  if (!options || typeof options.name !== 'string' || !options.name) {
    throw new TypeError('task() needs a name: task({ name: "app.add" }, fn)');
  }
  if (typeof fn !== 'function') throw new TypeError(`task ${options.name}: not a function`);
  if (TASKS.has(options.name)) throw new Error(`task ${options.name} is registered twice`);
  const info = {
    name: options.name,
    description: options.description ?? '',
    queue: options.queue,
    softTimeLimitMs: ms(options.softTimeLimit, 'softTimeLimit'),
    hardTimeLimitMs: ms(options.timeLimit, 'timeLimit'),
    memoryLimitBytes: big(options.memoryLimit),
    fuel: big(options.fuel),
    maxRetries: options.maxRetries,
    retryBackoffMs: ms(options.defaultRetryDelay, 'defaultRetryDelay'),
    retryBackoffMaxMs: ms(options.retryBackoffMax, 'retryBackoffMax'),
    rateLimit: options.rateLimit,
  };
  TASKS.set(options.name, { fn, info, params: options.params, bind: !!options.bind });
  return fn;
}

/** Raises a Retry: `throw retry({ countdown: 5 })` or plain `retry()`. */
export function retry({ countdown, reason } = {}) {
  throw new Retry(reason ?? 'retry requested', countdown);
}

/** A workflow step (Celery's signature). */
export function signature(name, args = [], kwargs = {}, options = {}) {
  return { name, args, kwargs, ...options };
}

function hostCall(f, ...args) {
  try {
    return f(...args);
  } catch (e) {
    const err = e && e.payload !== undefined ? e.payload : e;
    switch (err && err.tag) {
      case 'denied': throw new PermissionError(err.val);
      case 'cancelled': throw new SoftTimeLimitExceeded();
      case 'invalid': throw new ValueError(err.val);
      case 'unavailable': throw new HostUnavailable(err.val);
      default: throw e;
    }
  }
}

const encoder = new TextEncoder();
const decoder = new TextDecoder();

function childOptions(o) {
  return {
    queue: o.queue,
    priority: o.priority,
    countdownMs: ms(o.countdown, 'countdown'),
  };
}

function step(s) {
  if (!s || typeof s.name !== 'string') throw new TypeError('a workflow step needs a name');
  return {
    name: s.name,
    args: JSON.stringify(s.args ?? []),
    kwargs: JSON.stringify(s.kwargs ?? {}),
    options: childOptions(s),
    immutable: !!s.immutable,
  };
}

/** The task's key-value namespace (needs the kv grant). Values are bytes or strings. */
export const store = {
  get: (key) => hostCall(kv.get, key),
  getText: (key) => {
    const v = hostCall(kv.get, key);
    return v === undefined || v === null ? undefined : decoder.decode(v);
  },
  getJson: (key, fallback = undefined) => {
    const v = store.getText(key);
    return v === undefined ? fallback : JSON.parse(v);
  },
  set: (key, value) => hostCall(kv.set, key, typeof value === 'string' ? encoder.encode(value) : value),
  setJson: (key, value) => store.set(key, JSON.stringify(value)),
  delete: (...keys) => hostCall(kv.delete, keys),
  setAdd: (key, ...members) => hostCall(kv.setAdd, key, members),
  setRemove: (key, ...members) => hostCall(kv.setRemove, key, members),
  setMembers: (key) => hostCall(kv.setMembers, key),
};

class Context {
  constructor(name, call) {
    this.request = {
      task: name,
      id: call.id,
      retries: call.retries,
      softDeadlineMs: call.softDeadlineMs === undefined ? undefined : Number(call.softDeadlineMs),
    };
    this.kv = store;
  }
  get id() { return this.request.id; }
  get retries() { return this.request.retries; }
  retry(options) { return retry(options); }
  /** Publishes a custom state with JSON meta (needs the progress grant). */
  updateState(state = 'PROGRESS', meta = null) {
    hostCall(progress, state, JSON.stringify(meta));
  }
  cancelled() { return cancelled(); }
  /** Writes a line to the worker's log for this task (needs the log grant). */
  log(level, message) { hostLog(level === 'warning' ? 'warn' : level, String(message)); }
  info(message) { this.log('info', message); }
  /** Sends a child task (its name must be granted); returns its id. Sent only on success. */
  enqueue(name, args = [], kwargs = {}, options = {}) {
    return hostCall(children.enqueue, name, JSON.stringify(args), JSON.stringify(kwargs),
      childOptions(options));
  }
  chain(...steps) { return hostCall(children.enqueueChain, steps.map(step)); }
  group(...steps) { return hostCall(children.enqueueGroup, steps.map(step)); }
  chord(header, body) { return hostCall(children.enqueueChord, header.map(step), step(body)); }
}

/** The task running now. */
export function current() {
  if (!running) throw new Error('no celeriac task is running');
  return running;
}

function decode(raw, wantArray, what) {
  let value;
  try {
    value = raw ? JSON.parse(raw) : null;
  } catch (e) {
    throw new TypeError(`${what} are not valid JSON: ${e.message}`);
  }
  if (value === null) return wantArray ? [] : {};
  if (Array.isArray(value) !== wantArray || typeof value !== 'object') {
    throw new TypeError(`${what} must be a JSON ${wantArray ? 'list' : 'object'}`);
  }
  return value;
}

function bindArguments(registered, name, args, kwargs) {
  const names = Object.keys(kwargs);
  if (!registered.params) {
    if (names.length) {
      throw new TypeError(`${name}() got keyword arguments (${names.join(', ')}); declare ` +
        `params in task() to accept them`);
    }
    return args;
  }
  const params = registered.params;
  if (args.length > params.length) {
    throw new TypeError(`${name}() takes ${params.length} positional arguments but ` +
      `${args.length} were given`);
  }
  const bound = args.slice();
  for (const key of names) {
    const at = params.indexOf(key);
    if (at < 0) throw new TypeError(`${name}() got an unexpected keyword argument '${key}'`);
    if (at < args.length) throw new TypeError(`${name}() got multiple values for argument '${key}'`);
    bound[at] = kwargs[key];
  }
  // A parameter neither passed nor defaulted in the function reads `undefined`, as in JS.
  return bound;
}

function excType(e) {
  // SpiderMonkey reports a refused memory grow as a bare "out of memory" error; name it as
  // Python does, so the worker reports the memory cap.
  if (e === 'out of memory' || (e instanceof Error && e.message === 'out of memory')) {
    return 'MemoryError';
  }
  if (e instanceof Error) {
    const ctor = e.constructor && e.constructor.name;
    return ctor && ctor !== 'Error' ? ctor : (e.name || 'Error');
  }
  return 'Error';
}

/** The component's `describe` export. */
export function describe() {
  return [...TASKS.values()].map((t) => t.info);
}

/** The component's `run` export: never lets a JS error out as anything but a task error. */
export function run(name, call) {
  const registered = TASKS.get(name);
  if (!registered) {
    throw { tag: 'fail', val: { excType: 'NotRegistered', message: `${name}: this component serves ${[...TASKS.keys()].sort().join(', ')}` } };
  }
  running = new Context(name, call);
  try {
    let args = bindArguments(registered, name, decode(call.args, true, 'args'),
      decode(call.kwargs, false, 'kwargs'));
    if (registered.bind) args = [running, ...args];
    const value = registered.fn(...args);
    if (value && typeof value.then === 'function') {
      throw new TypeError(`${name}: async tasks are not supported; return a value`);
    }
    const json = JSON.stringify(value === undefined ? null : value);
    return json;
  } catch (e) {
    if (e instanceof Retry) {
      const countdownMs = e.countdown === undefined ? undefined : ms(e.countdown, 'countdown');
      throw { tag: 'retry', val: { reason: e.message, countdownMs } };
    }
    if (e instanceof HostUnavailable) {
      throw { tag: 'retry', val: { reason: `HostUnavailable: ${e.message}` } };
    }
    throw { tag: 'fail', val: { excType: excType(e), message: e instanceof Error ? e.message : String(e) } };
  } finally {
    running = null;
  }
}
