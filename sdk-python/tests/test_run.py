"""The SDK's plain-Python part under CPython: how a run binds arguments and reports how it
ended. The host calls themselves are tested through the worker (tests/tests/languages.rs)."""

import contextlib
import io
import json
import unittest

import celeriac_task
from celeriac_task import Retry, current, task


@task(name="t.add")
def add(x: int, y: int = 10, *more: int, scale: int = 1):
    return (x + y + sum(more)) * scale


@task(name="t.bound", bind=True, max_retries=2, soft_time_limit=1.5, rate_limit="5/s")
def bound(self, n):
    """Reports its own id.

    More text that is not the description."""
    if n < 0:
        raise self.retry(countdown=2.5, reason="negative")
    return [self.request.id, self.request.retries, current() is self]


@task
def plain():
    return {"ok": True}


class Custom(Exception):
    pass


@task(name="t.custom")
def custom():
    raise Custom("own class")


def run(name, args=(), kwargs=None, retries=0):
    # A failure's traceback goes to stderr, which the worker keeps; here it is noise.
    with contextlib.redirect_stderr(io.StringIO()):
        return celeriac_task._run(name, "id-1", json.dumps(list(args)),
                                  json.dumps(kwargs or {}), retries, None)


class RunTest(unittest.TestCase):
    def test_binds_args_and_kwargs_as_python_does(self):
        self.assertEqual(run("t.add", [1, 2, 3], {"scale": 2}), ("ok", "12"))
        self.assertEqual(run("t.add", [5]), ("ok", "15"))
        kind, exc, message = run("t.add", [], {"y": 1})
        self.assertEqual((kind, exc), ("fail", "TypeError"))
        self.assertIn("'x'", message)
        self.assertEqual(run("t.add", [1], {"x": 2})[1], "TypeError")

    def test_malformed_arguments_are_a_type_error(self):
        with contextlib.redirect_stderr(io.StringIO()):
            self.assertEqual(celeriac_task._run("t.add", "i", "{", "{}", 0, None)[1], "TypeError")
            self.assertEqual(celeriac_task._run("t.add", "i", "{}", "[]", 0, None)[1], "TypeError")

    def test_exceptions_keep_their_class_name(self):
        self.assertEqual(run("t.custom"), ("fail", "Custom", "own class"))
        self.assertEqual(run("t.unknown")[1], "NotRegistered")

    def test_bind_passes_the_context_and_retry_asks_for_a_retry(self):
        self.assertEqual(run("t.bound", [1], retries=1), ("ok", '["id-1", 1, true]'))
        self.assertEqual(run("t.bound", [-1]), ("retry", "negative", 2500))

    def test_describe_info_uses_celery_names_in_host_units(self):
        info = celeriac_task._TASKS["t.bound"].info
        self.assertEqual(info["soft_time_limit_ms"], 1500)
        self.assertEqual(info["max_retries"], 2)
        self.assertEqual(info["rate_limit"], "5/s")
        self.assertEqual(info["description"], "Reports its own id.")
        self.assertIn("test_run.plain", celeriac_task._TASKS)

    def test_a_result_that_is_not_json_is_an_encode_error(self):
        @task(name="t.set")
        def as_set():
            return {1}
        self.assertEqual(run("t.set")[1], "EncodeError")

    def test_host_calls_outside_a_component_say_so(self):
        with self.assertRaises(RuntimeError):
            celeriac_task.Context(celeriac_task.Request("t", "i", 0, None)).kv.get("k")
        with self.assertRaises(RuntimeError):
            current()

    def test_a_task_name_registered_twice_is_refused(self):
        with self.assertRaises(ValueError):
            task(name="t.add")(lambda: None)


if __name__ == "__main__":
    unittest.main()
