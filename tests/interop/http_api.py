"""celeriac's HTTP API against its own OpenAPI document, and against Celery's client.

Every answer is checked against /openapi.json: its status must be one the document declares for
that route, and its body must match the declared schema (jsonschema, draft 2020-12, which
OpenAPI 3.1 uses). The run fails unless every route and method in the document was called.

Usage (the broker and backend URLs come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND):
  python http_api.py PORT TOKEN NODE
      A celeriac worker named NODE serves the API on 127.0.0.1:PORT with TOKEN and consumes
      only the queue `default`. Prints "ok" when every check passed.
"""
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
import uuid

import jsonschema
import redis
from openapi_spec_validator import validate as validate_spec

from celery_client import app

PORT, TOKEN, NODE = int(sys.argv[1]), sys.argv[2], sys.argv[3]
BASE = f"http://127.0.0.1:{PORT}"


def call(method, path, body=None, token=TOKEN, headers=None, raw=None):
    """(status, headers, decoded body) of one request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(BASE + path, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    for k, v in (headers or {}).items():
        request.add_header(k, v)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            status, head, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, head, text = e.code, e.headers, e.read().decode()
    kind = head.get("Content-Type", "")
    return status, head, json.loads(text) if kind.startswith("application/json") else text


SPEC_STATUS, SPEC_HEAD, SPEC = call("GET", "/openapi.json", token=None)
assert SPEC_STATUS == 200, SPEC_STATUS
validate_spec(SPEC)
SCHEMAS = SPEC["components"]["schemas"]
CALLED = set()


def inline(schema):
    """The schema with every #/components/schemas ref replaced by its target."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            return inline(SCHEMAS[schema["$ref"].rsplit("/", 1)[1]])
        return {k: inline(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [inline(v) for v in schema]
    return schema


def route_of(path):
    """The document's path template that `path` (query removed) matches."""
    bare = path.split("?", 1)[0]
    for template in SPEC["paths"]:
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, bare):
            return template
    raise AssertionError(f"{bare} is not in the OpenAPI document")


def api(method, path, expect, body=None, **kw):
    """Calls the API, checks the answer against the document, and returns (headers, body)."""
    status, head, answer = call(method, path, body, **kw)
    assert status == expect, f"{method} {path}: {status} {answer!r}, wanted {expect}"
    template = route_of(path)
    operation = SPEC["paths"][template][method.lower()]
    declared = operation["responses"].get(str(status))
    assert declared, f"{method} {template} answered {status}, which the document does not declare"
    for kind, media in declared.get("content", {}).items():
        if kind == "application/json":
            assert isinstance(answer, (dict, list)), f"{method} {path}: not JSON: {answer!r}"
            jsonschema.validate(answer, inline(media["schema"]), cls=jsonschema.Draft202012Validator)
    CALLED.add((template, method.lower()))
    return head, answer


def eventually(what, check, secs=30):
    deadline = time.time() + secs
    while time.time() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# Probes and auth.
api("GET", "/healthz", 200, token=None)
api("GET", "/readyz", 200, token=None)
assert api("GET", "/healthcheck", 200, token=None)[1] == "OK"
api("GET", "/openapi.json", 200, token=None)
api("POST", "/tasks/diagnostics.noop", 401, {"args": [1]}, token=None)
api("POST", "/tasks/diagnostics.noop", 403, {"args": [1]}, token="wrong")
api("GET", "/metrics", 401, token=None)
assert "celeriac_worker_up" in api("GET", "/metrics", 200)[1]

# Send, wait, read: the API and Celery's AsyncResult agree.
head, sent = api("POST", "/tasks/diagnostics.noop", 202, {"args": [{"n": 42}]})
assert head["Location"] == sent["status_url"] == f"/tasks/{sent['task_id']}", (head, sent)
_, task = api("GET", f"/tasks/{sent['task_id']}?wait=30", 200)
assert task["state"] == "SUCCESS" and task["result"] == {"n": 42}, task
assert task["error"] is None and task["date_done"], task
assert app.AsyncResult(sent["task_id"]).get(timeout=10) == {"n": 42}

# A task Celery's client sent reads the same through the API.
python_sent = app.send_task("diagnostics.noop", args=["from python"], queue="default")
_, task = api("GET", f"/tasks/{python_sent.id}?wait=30", 200)
assert task["state"] == "SUCCESS" and task["result"] == "from python", task

# A failure shows its type, message and traceback; Flower's route shows its repr.
_, failing = api("POST", "/tasks/diagnostics.fail", 202, {"args": ["boom"]})
_, task = api("GET", f"/tasks/{failing['task_id']}?wait=30", 200)
assert task["state"] == "FAILURE" and task["result"] is None, task
assert task["error"]["type"] == "ValueError" and task["error"]["message"] == "boom", task
assert "ValueError: boom" in task["error"]["traceback"], task
_, flower = api("GET", f"/api/task/result/{failing['task_id']}", 200)
assert flower["state"] == "FAILURE" and flower["result"] == "ValueError('boom')", flower
assert "ValueError: boom" in flower["traceback"], flower

# Ids never seen: 404 here, PENDING in Flower's API as in Flower.
stranger = str(uuid.uuid4())
api("GET", f"/tasks/{stranger}", 404)
api("POST", f"/tasks/{stranger}/revoke", 404)
assert api("GET", f"/api/task/result/{stranger}", 200)[1] == {"task-id": stranger, "state": "PENDING"}
api("GET", "/tasks/" + "x" * 201, 400)
api("GET", f"/tasks/{stranger}?wait=forever", 422)

# Bad requests say what was wrong.
api("POST", "/tasks/made.up.name", 404, {"args": []})
api("POST", "/tasks/diagnostics.noop", 400, raw=b"{not json")
for bad in [{"args": {}}, {"kwargs": []}, {"priority": 12}, {"countdown": -1},
            {"eta": "soon"}, {"eta": "2030-01-01T00:00:00Z", "countdown": 1},
            {"queue": "unacked"}, {"queue": ""}, {"argz": [1]}]:
    _, err = api("POST", "/tasks/diagnostics.noop", 422, bad)
    assert err["error"], err
api("POST", "/tasks/diagnostics.noop", 413, raw=b'{"args": ["' + b"x" * (2 << 20) + b'"]}')

# Progress of a running task, then revoke it with terminate; a finished task is a 409.
_, sleeper = api("POST", "/tasks/diagnostics.sleep", 202, {"args": [60000]})
progress = eventually(
    "PROGRESS",
    lambda: (t := api("GET", f"/tasks/{sleeper['task_id']}", 200)[1])["state"] == "PROGRESS" and t,
)
assert progress["progress"]["total_ms"] == 60000, progress
_, revoked = api("POST", f"/tasks/{sleeper['task_id']}/revoke?terminate=true", 200)
assert revoked == {"task_id": sleeper["task_id"], "state": "REVOKED", "terminate": True}, revoked
_, task = api("GET", f"/tasks/{sleeper['task_id']}?wait=30", 200)
assert task["state"] == "REVOKED" and task["error"]["type"] == "TaskRevokedError", task
api("POST", f"/tasks/{sent['task_id']}/revoke", 409)
api("POST", f"/api/task/revoke/{sent['task_id']}", 409)

# Idempotency-Key: the same request sends once; another request with the key is refused.
r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
parked = {"args": [7], "queue": "parked"}
key = {"Idempotency-Key": f"order-{uuid.uuid4()}"}
head1, first = api("POST", "/tasks/diagnostics.noop", 202, parked, headers=key)
head2, again = api("POST", "/tasks/diagnostics.noop", 202, parked, headers=key)
assert first["task_id"] == again["task_id"] and head2["Idempotent-Replayed"] == "true", (first, again)
assert "Idempotent-Replayed" not in head1
assert r.llen("parked") == 1, r.llen("parked")
api("POST", "/tasks/diagnostics.noop", 422, {"args": [8], "queue": "parked"}, headers=key)
api("POST", "/tasks/diagnostics.noop", 400, parked, headers={"Idempotency-Key": ""})
_, task = api("GET", f"/tasks/{first['task_id']}", 200)
assert task["state"] == "PENDING", task

# Queues: per priority, summed in Flower's answer. Nothing consumes `celery` here.
for priority in (0, 9, 9):
    api("POST", "/tasks/diagnostics.noop", 202, {"args": [], "queue": "celery", "priority": priority})
_, queues = api("GET", "/queues", 200)
celery_queue = next(q for q in queues["queues"] if q["name"] == "celery")
assert celery_queue["messages"] == 3 and celery_queue["by_priority"] == {"0": 1, "3": 0, "6": 0, "9": 2}, queues
_, lengths = api("GET", "/api/queues/length", 200)
assert {"name": "celery", "messages": 3} in lengths["active_queues"], lengths

# Workers, as celeriac and as Flower list them.
_, workers = api("GET", "/workers", 200)
ours = next(w for w in workers["workers"] if w["name"] == NODE)
assert ours["queues"] == ["default"] and ours["stats"]["pool"]["max-concurrency"] >= 1, ours
_, up = api("GET", "/api/workers?status=1", 200)
assert up.get(NODE) is True, up
_, detail = api("GET", "/api/workers", 200)
assert "diagnostics.noop" in detail[NODE]["registered"], detail
api("GET", "/workers?timeout=999", 422)

# Dead letters: the failure above is one (its result is stored just before the
# dead letter, so wait for it); replay it by id and the worker runs it again,
# fails the same way and dead-letters it once more.
def dead_letter_ids():
    _, letters = api("GET", "/dlq/default?limit=10", 200)
    return [d.get("id") for d in letters["dead_letters"]]


eventually("the dead letter", lambda: failing["task_id"] in dead_letter_ids())
_, dlq = api("GET", "/dlq", 200)
assert any(q["name"] == "default" and q["dead_letters"] >= 1 for q in dlq["queues"]), dlq
api("GET", "/dlq/default?limit=0", 422)
_, replayed = api("POST", f"/dlq/default/replay?task_id={failing['task_id']}", 200)
assert replayed == {"queue": "default", "replayed": 1}, replayed
api("POST", f"/dlq/default/replay?task_id={uuid.uuid4()}", 404)
eventually("the replayed task to fail again", lambda: failing["task_id"] in dead_letter_ids())

# Flower's task API, as Flower scripts call it.
_, flower_sent = api("POST", "/api/task/async-apply/diagnostics.noop", 200, {"args": [5]})
_, flower = api("GET", f"/api/task/result/{flower_sent['task-id']}?timeout=30", 200)
assert flower == {"task-id": flower_sent["task-id"], "state": "SUCCESS", "result": 5}, flower
api("POST", "/api/task/async-apply/made.up.name", 404, {})
api("POST", "/api/task/async-apply/diagnostics.noop", 400, {"args": "no"})
api("POST", "/api/task/send-task/made.up.name", 200, {"args": [], "queue": "parked", "retry": True})
_, types = api("GET", "/api/task/types", 200)
assert "diagnostics.sleep" in types["task-types"], types
_, flower_sleeper = api("POST", "/api/task/send-task/diagnostics.sleep", 200, {"args": [60000]})
eventually("STARTED", lambda: app.AsyncResult(flower_sleeper["task-id"]).state in ("STARTED", "PROGRESS"))
_, message = api("POST", f"/api/task/revoke/{flower_sleeper['task-id']}?terminate=true", 200)
assert message == {"message": f"Revoked '{flower_sleeper['task-id']}'"}, message
assert app.AsyncResult(flower_sleeper["task-id"]).state == "REVOKED"

missed = {(t, m) for t, ops in SPEC["paths"].items() for m in ops} - CALLED
assert not missed, f"routes in the document that were never called: {sorted(missed)}"
print("ok")
