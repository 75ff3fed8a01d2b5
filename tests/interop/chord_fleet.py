"""Chords across a mixed fleet and through a crash, driven by tests/tests/canvas.rs.

  python chord_fleet.py mixed N   N chords whose parts are split between a Python worker
                                  (`py.add` on queue `py`) and celeriac workers; half finish on
                                  the Python side, half on celeriac's. Prints "ok".
  python chord_fleet.py send      sends chord([add(1,1), add(2,2), sleep(3000)], tsum); prints
                                  {"body": id, "slow": id}
  python chord_fleet.py wait ID   prints {"result": ...} once ID is ready
"""
import json
import sys

from celery import chord

from celery_client import app

TIMEOUT = 60


def sig(name, *args, **options):
    return app.signature(name, args=args, **options)


def main(argv):
    mode = argv[1]
    if mode == "mixed":
        n = int(argv[2])
        sent = []
        for i in range(n):
            # Python's part is slow in even chords (it completes them and sends the body), and
            # celeriac's sleep in odd ones (celeriac completes them).
            python_last = i % 2 == 0
            header = [
                sig("py.add", i, 1, 0.3 if python_last else 0.0, queue="py"),
                sig("diagnostics.add", i, 2, queue="default"),
                sig("diagnostics.sleep", 0 if python_last else 300, queue="default"),
                sig("py.add", i, 3, 0.0, queue="py"),
            ]
            body = sig("diagnostics.tsum", queue="bodies")
            sent.append((i, python_last, chord(header, body).apply_async()))
        for i, python_last, res in sent:
            got = app.AsyncResult(res.id).get(timeout=TIMEOUT)
            slept = got - (3 * i + 6) - 0  # the sleep part returns the milliseconds it slept
            low, high = (0, 200) if python_last else (300, 2000)
            assert low <= slept <= high, (i, got, slept)
        print("ok")
    elif mode == "send":
        header = [sig("diagnostics.add", 1, 1, queue="default"),
                  sig("diagnostics.add", 2, 2, queue="default"),
                  sig("diagnostics.sleep", 3000, queue="default")]
        res = chord(header, sig("diagnostics.tsum", queue="default")).apply_async()
        print(json.dumps({"body": res.id, "slow": res.parent.results[2].id}))
    elif mode == "wait":
        print(json.dumps({"result": app.AsyncResult(argv[2]).get(timeout=TIMEOUT)}))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main(sys.argv)
