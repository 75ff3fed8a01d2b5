"""The Python side of celeriac's interop tests: a real Celery client (and worker app).

Usage (the broker and backend URLs come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND):
  python celery_client.py get TASK ARGS_JSON KWARGS_JSON [QUEUE] [PRIORITY] [COUNTDOWN]
      send_task, then AsyncResult.get(); prints {"result": ...} or {"exc_type", "message"}
  python celery_client.py states TASK ARGS_JSON QUEUE TIMEOUT
      send_task, then polls AsyncResult.state until ready; prints the distinct states seen
  python celery_client.py ping | revoked
      the workers' replies to `control ping` / `inspect revoked`
  python celery_client.py send_many TASK ARGS_JSON N
      send_task N times; prints {"ids": [...]}
  python celery_client.py collect TIMEOUT < ids.json
      AsyncResult(id).get() for each id read from stdin; prints {"results": {id: value}}
Transport options (Sentinel's master_name) come as JSON from CELERY_BROKER_TRANSPORT_OPTIONS and
CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS, as celeriac reads them.
As a worker app: celery -A celery_client worker -Q default
"""
import json
import os
import sys
import time

from celery import Celery

app = Celery(
    "interop",
    broker=os.environ["CELERY_BROKER_URL"],
    backend=os.environ["CELERY_RESULT_BACKEND"],
)
app.conf.update(task_track_started=True, broker_connection_retry_on_startup=True)
for var, setting in (("CELERY_BROKER_TRANSPORT_OPTIONS", "broker_transport_options"),
                     ("CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS", "result_backend_transport_options")):
    if os.environ.get(var):
        app.conf[setting] = json.loads(os.environ[var])


@app.task(name="diagnostics.noop")
def noop(x):
    return x


@app.task(name="py.add")
def py_add(x, y, delay=0.0):
    """A chord part only the Python worker serves (its own queue, `py`)."""
    time.sleep(delay)
    return x + y


def send(task, args, kwargs, queue="default", priority=None, countdown=None):
    options = {"queue": queue}
    if priority is not None:
        options["priority"] = priority
    if countdown is not None:
        options["countdown"] = countdown
    return app.send_task(task, args=args, kwargs=kwargs, **options)


def main(argv):
    command = argv[1]
    if command == "get":
        task, args, kwargs = argv[2], json.loads(argv[3]), json.loads(argv[4])
        queue = argv[5] if len(argv) > 5 else "default"
        priority = int(argv[6]) if len(argv) > 6 and argv[6] != "-" else None
        countdown = float(argv[7]) if len(argv) > 7 else None
        sent = time.time()
        result = send(task, args, kwargs, queue, priority, countdown)
        try:
            value = result.get(timeout=30)
            print(json.dumps({"id": result.id, "result": value, "elapsed": time.time() - sent}))
        except Exception as e:  # the task's own exception, re-raised by Celery
            print(json.dumps({"id": result.id, "exc_type": type(e).__name__,
                              "exc_module": type(e).__module__, "message": str(e),
                              "is_exception": isinstance(e, Exception)}))
    elif command == "states":
        task, args, queue, timeout = argv[2], json.loads(argv[3]), argv[4], float(argv[5])
        result = send(task, args, {}, queue)
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = result.state
            if not seen or seen[-1] != state:
                seen.append(state)
            if state in ("SUCCESS", "FAILURE", "REVOKED"):
                break
            time.sleep(0.005)
        print(json.dumps({"id": result.id, "states": seen}))
    elif command == "spin_then_revoke":
        # Start a long task, wait for STARTED, revoke it by broadcast with terminate.
        result = send("diagnostics.spin", [30000], {}, "default")
        deadline = time.time() + 20
        while result.state != "STARTED" and time.time() < deadline:
            time.sleep(0.01)
        app.control.revoke(result.id, terminate=True)
        try:
            result.get(timeout=20)
            print(json.dumps({"id": result.id, "state": result.state}))
        except Exception as e:
            print(json.dumps({"id": result.id, "state": result.state, "exc_type": type(e).__name__}))
    elif command == "ping":
        print(json.dumps({"replies": app.control.ping(timeout=2.0)}))
    elif command == "revoked":
        # Each worker's in-memory revoked ids (Celery's `inspect revoked`).
        print(json.dumps({"replies": app.control.inspect(timeout=2.0).revoked() or {}}))
    elif command == "send_many":
        task, args, n = argv[2], json.loads(argv[3]), int(argv[4])
        print(json.dumps({"ids": [send(task, args, {}).id for _ in range(n)]}))
    elif command == "collect":
        timeout, ids = float(argv[2]), json.load(sys.stdin)
        results = {}
        for task_id in ids:
            results[task_id] = app.AsyncResult(task_id).get(timeout=timeout)
        print(json.dumps({"results": results}))
    else:
        raise SystemExit(f"unknown command {command}")


if __name__ == "__main__":
    main(sys.argv)
