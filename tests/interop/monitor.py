"""Celery's own monitoring tools pointed at one worker: the event receiver and state Flower is
built on, `celery events --dump`, `app.control.inspect()`, `celery inspect` and control
commands. Prints one JSON document with what each of them saw.

Usage (the broker and backend URLs come from CELERY_BROKER_URL / CELERY_RESULT_BACKEND):
  python monitor.py watch NODE
      Prints "listening" once its event receiver is subscribed; the caller then starts worker
      NODE. Waits for it to come online, runs tasks, inspects it, shuts it down and waits for
      it to go offline.
"""
import json
import os
import subprocess
import sys
import threading
import time

import redis
from celery.events.state import State
from celery.utils.time import utcoffset

from celery_client import app

CELERY = os.path.join(os.path.dirname(sys.executable), "celery")
HERE = os.path.dirname(os.path.abspath(__file__))


class Watcher:
    """Every event on the broker, as Flower receives them, fed into Celery's State."""

    def __init__(self):
        self.events = []
        self.state = State()
        self.lock = threading.Lock()
        self.receiver = None

    def on_event(self, event):
        with self.lock:
            self.events.append(event)
            self.state.event(event)

    def run(self):
        with app.connection() as conn:
            self.receiver = app.events.Receiver(conn, handlers={"*": self.on_event})
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def wait_for(self, what, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            with self.lock:
                for e in self.events:
                    if what(e):
                        return e
            time.sleep(0.02)
        return None


def patterns(r):
    return r.execute_command("PUBSUB", "NUMPAT")


def celery_cli(*args, timeout=20):
    out = subprocess.run([CELERY, "-A", "celery_client", *args], cwd=HERE, capture_output=True,
                         text=True, timeout=timeout)
    return {"code": out.returncode, "stdout": out.stdout, "stderr": out.stderr[-2000:]}


def watch(node):
    r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    watcher = Watcher()
    threading.Thread(target=watcher.run, daemon=True).start()
    while patterns(r) < 1:
        time.sleep(0.02)
    print("listening", flush=True)
    out = {}
    online = watcher.wait_for(lambda e: e["type"] == "worker-online" and e["hostname"] == node, 60)
    out["online"] = online
    out["celery_utcoffset"] = utcoffset()

    # `celery events --dump`, subscribed before the tasks are sent.
    dump = subprocess.Popen([CELERY, "-A", "celery_client", "events", "--dump"], cwd=HERE,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 20
    while patterns(r) < 2 and time.time() < deadline:
        time.sleep(0.02)

    ok = app.send_task("diagnostics.noop", args=[{"n": 1, "s": "it's"}], kwargs={}, queue="default")
    bad = app.send_task("diagnostics.fail", args=["boom"], queue="default")
    out["ok_result"] = ok.get(timeout=30)
    try:
        bad.get(timeout=30)
    except Exception as e:  # the task's failure, re-raised by Celery
        out["bad_error"] = [type(e).__name__, str(e)]
    out["ids"] = {"ok": ok.id, "bad": bad.id}
    watcher.wait_for(lambda e: e["type"] == "task-failed" and e.get("uuid") == bad.id, 10)
    time.sleep(0.5)
    dump.terminate()
    out["dump"] = dump.communicate(timeout=10)[0]

    # One task left running, for `active`, until it is revoked below: long enough to outlast
    # every inspect (the CLI ones wait out their timeout).
    slow = app.send_task("diagnostics.sleep", args=[60000], queue="default")
    deadline = time.time() + 20
    while slow.state != "STARTED" and time.time() < deadline:
        time.sleep(0.01)
    out["ids"]["slow"] = slow.id

    inspect = app.control.inspect(destination=[node], timeout=1.0)
    out["inspect"], out["inspect_seconds"] = {}, {}
    for method in ("stats", "active_queues", "registered", "conf", "active", "reserved",
                   "scheduled", "revoked"):
        started = time.time()
        reply = getattr(inspect, method)()
        out["inspect_seconds"][method] = time.time() - started
        out["inspect"][method] = (reply or {}).get(node)
    # The cluster-wide refresh Flower does at start, with no destination.
    out["broadcast_stats"] = list((app.control.inspect(timeout=1.0).stats() or {}).keys())
    out["cli_inspect"] = {
        m: celery_cli("inspect", m, "-d", node, "--json", "--timeout", "2")
        for m in ("stats", "active", "registered")
    }
    out["control"] = {}
    for method in ("disable_events", "enable_events", "enable_events", "pool_restart"):
        replies = app.control.broadcast(method, destination=[node], reply=True, timeout=1.0)
        out["control"].setdefault(method, []).append(replies)
    app.control.revoke(slow.id, terminate=True)
    watcher.wait_for(lambda e: e["type"] == "task-revoked" and e.get("uuid") == slow.id, 10)

    # What Flower's state machine makes of it all, while the worker is up.
    with watcher.lock:
        worker = watcher.state.workers.get(node)
        out["state_worker"] = {
            "alive": bool(worker and worker.alive),
            "active": worker.active if worker else None,
            "processed": worker.processed if worker else None,
            "sw_ident": worker.sw_ident if worker else None,
            "freq": worker.freq if worker else None,
        }
        out["state_tasks"] = {
            tid: {"name": t.name, "state": t.state, "args": t.args, "kwargs": t.kwargs,
                  "result": t.result, "runtime": t.runtime, "exception": t.exception,
                  "worker": t.worker.hostname if t.worker else None, "retries": t.retries,
                  "root_id": t.root_id}
            for tid, t in watcher.state.tasks.items()
        }

    stopped = time.time()
    app.control.shutdown(destination=[node])
    offline = watcher.wait_for(lambda e: e["type"] == "worker-offline" and e["hostname"] == node, 15)
    out["offline_after"] = (time.time() - stopped) if offline else None
    with watcher.lock:
        out["events"] = list(watcher.events)
        worker = watcher.state.workers.get(node)
        out["alive_after_offline"] = bool(worker and worker.alive)
    print(json.dumps(out, default=repr))


def control(node):
    """The control commands that change a running worker, and what each change does."""
    r = redis.Redis.from_url(os.environ["CELERY_BROKER_URL"])
    c = app.control
    out = {}
    deadline = time.time() + 60
    while not c.ping(destination=[node], timeout=0.5) and time.time() < deadline:
        pass
    dest = {"destination": [node], "reply": True, "timeout": 1.0}

    def one(replies):
        return replies[0][node] if replies else None

    def run(task, args, n, queue="default"):
        started = time.time()
        results = [app.send_task(task, args=args, queue=queue) for _ in range(n)]
        states = []
        for res in results:
            try:
                res.get(timeout=30)
            except Exception as e:  # the task's failure, re-raised by Celery
                states.append(type(e).__name__)
            else:
                states.append(res.state)
        return {"seconds": time.time() - started, "states": states}

    out["rate_unknown"] = one(c.rate_limit("no.such.task", "1/s", **dest))
    out["rate_set"] = one(c.rate_limit("diagnostics.noop", "2/s", **dest))
    out["rate_limited"] = run("diagnostics.noop", [1], 6)
    out["rate_off"] = one(c.rate_limit("diagnostics.noop", "0", **dest))
    out["rate_unlimited"] = run("diagnostics.noop", [1], 6)

    out["time_set"] = one(c.time_limit("diagnostics.sleep", hard=0.5, **dest))
    out["time_limited"] = run("diagnostics.sleep", [5000], 1)
    out["time_unknown"] = one(c.time_limit("no.such.task", hard=1, **dest))

    out["grow"] = one(c.pool_grow(2, **dest))
    sleeps = [app.send_task("diagnostics.sleep", args=[1500], queue="default") for _ in range(3)]
    deadline = time.time() + 20
    most = 0
    while time.time() < deadline and not all(s.ready() for s in sleeps):
        active = (c.inspect(destination=[node], timeout=1.0).active() or {}).get(node) or []
        most = max(most, len(active))
        time.sleep(0.1)
    out["grown_active"] = most
    out["grown_stats"] = len(c.inspect(destination=[node], timeout=1.0).stats()[node]["pool"]["processes"])
    out["shrink"] = one(c.pool_shrink(1, **dest))
    out["autoscale"] = one(c.autoscale(4, 1, **dest))
    out["autoscaled_stats"] = len(c.inspect(destination=[node], timeout=1.0).stats()[node]["pool"]["processes"])
    out["shrink_more"] = [one(c.pool_shrink(1, **dest)) for _ in range(3)]
    out["shrink_last"] = one(c.pool_shrink(1, **dest))

    out["add"] = one(c.add_consumer("extra", **dest))
    out["add_again"] = one(c.add_consumer("extra", **dest))
    out["queues_added"] = [q["name"] for q in c.inspect(destination=[node], timeout=1.0).active_queues()[node]]
    out["extra_run"] = run("diagnostics.noop", [2], 1, queue="extra")
    out["cancel"] = one(c.cancel_consumer("extra", **dest))
    out["queues_cancelled"] = [q["name"] for q in c.inspect(destination=[node], timeout=1.0).active_queues()[node]]
    app.send_task("diagnostics.noop", args=[3], queue="extra")
    time.sleep(1.5)
    out["extra_waiting"] = r.llen("extra")
    print(json.dumps(out, default=repr))


if __name__ == "__main__":
    if sys.argv[1] == "watch":
        watch(sys.argv[2])
    elif sys.argv[1] == "control":
        control(sys.argv[2])
    else:
        raise SystemExit(f"unknown command {sys.argv[1]}")
