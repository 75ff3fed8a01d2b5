"""Celery's canvas, sent by the real Python client, run by celeriac workers.

Usage: python canvas.py   (CELERY_BROKER_URL / CELERY_RESULT_BACKEND name the Redis to use;
a celeriac worker consumes `default`). Prints "ok" when every check passed.
"""
import uuid

from celery import chain, chord, group
from celery.exceptions import TimeoutError as CeleryTimeout

from celery_client import app

TIMEOUT = 30
# Tasks the client sends itself go to the workers' queue. The steps the workers send are routed
# by the workers (celeriac sends a task to the queue its module declares).
app.conf.task_routes = {"diagnostics.*": {"queue": "default"}}


def sig(name, *args, immutable=False, **options):
    return app.signature(name, args=args, immutable=immutable, **options)


def add(*args, **options):
    return sig("diagnostics.add", *args, **options)


def got(result):
    """`result.get()`, and on a timeout what Redis holds for it, to tell a lost message from a
    lost result."""
    try:
        return result.get(timeout=TIMEOUT)
    except CeleryTimeout:
        redis = app.connection().default_channel.client
        raise AssertionError(
            f"{result.id}: nothing within {TIMEOUT}s; meta {app.backend.get_task_meta(result.id)}; "
            f"waiting in default {redis.llen('default')}, unacked {redis.hlen('unacked')}, "
            f"dead letters {redis.lrange('celeriac:dlq:default', 0, -1)}"
        ) from None


def raises(result, exc_name, text):
    try:
        got = result.get(timeout=TIMEOUT)
    except CeleryTimeout:
        raise AssertionError(f"{result.id} still waits: a failure did not reach it")
    except Exception as e:  # noqa: BLE001 - the remote exception's class is rebuilt by name
        assert type(e).__name__ == exc_name and text in str(e), repr(e)
        return
    raise AssertionError(f"{result.id} returned {got!r}, wanted {exc_name}")


# chain(a, b, c): each step gets the previous result first; an immutable step keeps its args.
res = chain(add(1, 2), add(3, queue="default"), add(10, 10, immutable=True)).apply_async()
assert got(res) == 20, res.get()
assert got(res.parent) == 6 and got(res.parent.parent) == 3
first = app.AsyncResult(res.parent.parent.id)
assert [c.id for c in first.children] == [res.parent.id], first.children

# A chain's steps carry the root and parent ids Celery sets.
meta = app.backend.get_task_meta(res.id)
assert meta["status"] == "SUCCESS" and meta["result"] == 20, meta

# link: the callback gets the result first and is listed among the task's children.
parent = add(2, 2).apply_async(link=add(10))
assert got(parent) == 4
callbacks = app.AsyncResult(parent.id).children
assert len(callbacks) == 1 and got(callbacks[0]) == 14, callbacks
# Two callbacks, one immutable.
parent = add(1, 1).apply_async(link=[add(1), add(5, 5, immutable=True)])
assert got(parent) == 2
assert sorted(got(c) for c in app.AsyncResult(parent.id).children) == [3, 10]

# link_error: the errback is sent with the failed task's id as its only argument; the link is
# not sent.
errback_id = str(uuid.uuid4())
errback = sig("diagnostics.noop").set(task_id=errback_id)
failing = sig("diagnostics.fail", "boom").apply_async(link=add(1), link_error=errback)
raises(failing, "ValueError", "boom")
assert got(app.AsyncResult(errback_id)) == failing.id
assert app.AsyncResult(failing.id).children in (None, []), app.AsyncResult(failing.id).children

# A failure inside a chain: every later step raises the same error instead of waiting.
res = chain(add(1, 1), sig("diagnostics.fail", "boom", immutable=True), add(1), add(2)).apply_async()
raises(res, "ValueError", "boom")
raises(res.parent, "ValueError", "boom")
assert got(res.parent.parent.parent) == 2

# A group as a chain step: every member gets the result first.
res = chain(add(1, 1), group(add(1), add(2))).apply_async()
assert got(res) == [3, 4], res.get()

# A plain group: nothing for the worker to follow; the client saves and joins it.
res = group(add(1, 1), add(2, 2), add(3, 3)).apply_async()
assert got(res) == [2, 4, 6]

# A chain nested in a chain, with a link on an inner step.
inner = chain(add(2), add(3).set(link=add(100)))
res = chain(add(1, 1), inner).apply_async()
assert got(res) == 7, res.get()
linked = app.AsyncResult(res.id).children
assert [got(c) for c in linked] == [107], linked

# chord(group)(body): the body gets every part's result, in the group's order.
tsum = sig("diagnostics.tsum")
res = chord([add(1, 1), add(2, 2), add(3, 3)], tsum).apply_async()
assert got(res) == 12, res.get()
# An immutable body keeps its own args.
res = chord([add(1, 1), add(2, 2)], add(7, 7, immutable=True)).apply_async()
assert got(res) == 14

# A failing part: the body does not run; its result raises ChordError naming that part. (The
# chord's own result object raises the part's error first: the client checks the header.)
errback_id = str(uuid.uuid4())
body = sig("diagnostics.tsum").set(link_error=sig("diagnostics.noop").set(task_id=errback_id))
failing_part = sig("diagnostics.fail", "boom")
res = chord([add(1, 1), failing_part, add(3, 3)], body).apply_async()
raises(res, "ValueError", "boom")
raises(app.AsyncResult(res.id), "ChordError", "raised ValueError('boom')")
# The body's errback gets the body's id.
assert got(app.AsyncResult(errback_id)) == res.id

# A chain inside a chord: its last step is the part.
res = chord([chain(add(1, 1), add(10)), add(5, 5)], tsum).apply_async()
assert got(res) == 22, res.get()
# A chain inside a chord that fails at its first step fails the chord.
res = chord([chain(sig("diagnostics.fail", "early"), add(10)), add(5, 5)], tsum).apply_async()
raises(app.AsyncResult(res.id), "ChordError", "raised ValueError('early')")

# A chord as a chain step: `group | task` (which the client turns into a chord) and an explicit
# chord with steps after it; its parts get the previous result first, the steps after it go on
# from its body.
res = chain(add(1, 1), group(add(1), add(2)), tsum).apply_async()
assert got(res) == 7, res.get()
res = chain(add(1, 1), chord([add(1), add(2)], tsum), add(5)).apply_async()
assert got(res) == 12, res.get()

# Workflows a celeriac task sends itself, with the SDK's chain, group and chord.
ids = got(sig("diagnostics.fanout", "chain", 4).apply_async())
assert len(ids) == 4 and got(app.AsyncResult(ids[-1])) == 5, ids
ids = got(sig("diagnostics.fanout", "group", 3).apply_async())
assert [got(app.AsyncResult(i)) for i in ids] == [0, 2, 4]
ids = got(sig("diagnostics.fanout", "chord", 4).apply_async())
assert len(ids) == 5 and got(app.AsyncResult(ids[-1])) == 12, ids

print("ok")
