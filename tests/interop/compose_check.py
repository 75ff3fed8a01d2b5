"""The host's side of scripts/compose-test: a real Celery client against the compose stack.

Usage (CELERY_BROKER_URL / CELERY_RESULT_BACKEND point at the stack's Redis, published on the
host's loopback):
  python compose_check.py send N            sends N tasks over the three queue classes and
                                            waits for every result; prints {"ok": N}
  python compose_check.py long N MS         sends N diagnostics.sleep(MS) to `default`;
                                            prints their ids as JSON
  python compose_check.py wait IDS TIMEOUT  waits for every id (JSON list); prints the states
  python compose_check.py workers           the workers answering `control ping`
"""
import json
import os
import sys

from celery import Celery

app = Celery(
    "compose-check",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
app.conf.update(broker_connection_retry_on_startup=True)

# (task, args, queue): the compose config routes index work to `high` and cleanup to `low`.
WORK = [
    ("diagnostics.add", [2, 3], {}, "default", 5),
    ("indexing.search", [], {"query": "celeriac"}, "high", []),
    ("cleanup.cleanup_expired", [], {"retention_seconds": 3600}, "low", None),
]


def send(n):
    sent = []
    for i in range(n):
        task, args, kwargs, queue, expected = WORK[i % len(WORK)]
        sent.append((app.send_task(task, args=args, kwargs=kwargs, queue=queue), expected))
    for result, expected in sent:
        value = result.get(timeout=120)
        if expected is not None and value != expected:
            raise SystemExit(f"{result.id}: {value!r} != {expected!r}")
    print(json.dumps({"ok": len(sent)}))


def long(n, ms):
    ids = [app.send_task("diagnostics.sleep", args=[ms], queue="default").id for _ in range(n)]
    print(json.dumps(ids))


def wait(ids, timeout):
    states = {}
    for task_id in ids:
        result = app.AsyncResult(task_id)
        try:
            result.get(timeout=timeout, propagate=False)
        except Exception as e:  # noqa: BLE001 - reported, the caller decides
            states[task_id] = f"no result: {e!r}"
            continue
        states[task_id] = result.state
    print(json.dumps(states))


def workers():
    replies = app.control.ping(timeout=2.0)
    print(json.dumps(sorted(name for reply in replies for name in reply)))


if __name__ == "__main__":
    command = sys.argv[1]
    if command == "send":
        send(int(sys.argv[2]))
    elif command == "long":
        long(int(sys.argv[2]), int(sys.argv[3]))
    elif command == "wait":
        wait(json.loads(sys.argv[2]), float(sys.argv[3]))
    elif command == "workers":
        workers()
    else:
        raise SystemExit(f"unknown command {command}")
