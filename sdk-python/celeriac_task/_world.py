"""The component's side of the ``celeriac:task@0.1.0`` world: the ``describe`` and ``run`` exports
over the registered tasks, and the host's imports behind :mod:`celeriac_task`'s helpers.

componentize-py generates ``wit_world`` from the vendored WIT when it builds the component, so
this module imports only there; ``python -m celeriac_task build`` wires it in.
"""

from __future__ import annotations

import json
from typing import Any, Optional

import wit_world
from componentize_py_types import Err
from wit_world.imports import control, enqueue, kv, log, types

import celeriac_task

_LEVELS = {
    "trace": log.Level.TRACE,
    "debug": log.Level.DEBUG,
    "info": log.Level.INFO,
    "warn": log.Level.WARN,
    "warning": log.Level.WARN,
    "error": log.Level.ERROR,
}


def _raise_host_error(e: Err) -> None:
    """Turns a failed host call into the exception a Python task expects."""
    value = e.value
    if isinstance(value, types.HostError_Denied):
        raise PermissionError(value.value) from None
    if isinstance(value, types.HostError_Cancelled):
        raise celeriac_task.SoftTimeLimitExceeded(
            "soft time limit exceeded or task revoked") from None
    if isinstance(value, types.HostError_Invalid):
        raise ValueError(value.value) from None
    if isinstance(value, types.HostError_Unavailable):
        raise celeriac_task.HostUnavailable(value.value) from None
    raise e


def _options(step: celeriac_task.Signature) -> enqueue.Options:
    countdown = None if step.countdown is None else max(0, int(round(step.countdown * 1000)))
    return enqueue.Options(queue=step.queue, priority=step.priority, countdown_ms=countdown)


def _step(step: celeriac_task.Signature) -> enqueue.Step:
    if not isinstance(step, celeriac_task.Signature):
        raise TypeError(f"a workflow step must be a Signature, got {type(step).__name__}")
    return enqueue.Step(
        name=step.name,
        args=json.dumps(step.args),
        kwargs=json.dumps(step.kwargs),
        options=_options(step),
        immutable=step.immutable,
    )


class _Host:
    """What :func:`celeriac_task._call` reaches: one method per host import."""

    def _guard(self, fn: Any, *args: Any) -> Any:
        try:
            return fn(*args)
        except Err as e:
            _raise_host_error(e)

    def get(self, key: str) -> Optional[bytes]:
        return self._guard(kv.get, key)

    def set(self, key: str, value: bytes) -> None:
        self._guard(kv.set, key, value)

    def delete(self, keys: list[str]) -> int:
        return self._guard(kv.delete, keys)

    def set_add(self, key: str, members: list[str]) -> int:
        return self._guard(kv.set_add, key, members)

    def set_remove(self, key: str, members: list[str]) -> int:
        return self._guard(kv.set_remove, key, members)

    def set_members(self, key: str) -> list[str]:
        return self._guard(kv.set_members, key)

    def progress(self, state: str, meta: str) -> None:
        self._guard(control.progress, state, meta)

    def cancelled(self) -> bool:
        return control.cancelled()

    def log(self, level: str, message: str) -> None:
        log.log(_LEVELS.get(level.lower(), log.Level.INFO), message)

    def enqueue(self, step: celeriac_task.Signature) -> str:
        s = _step(step)
        return self._guard(enqueue.enqueue, s.name, s.args, s.kwargs, s.options)

    def chain(self, steps: list[celeriac_task.Signature]) -> list[str]:
        return self._guard(enqueue.enqueue_chain, [_step(s) for s in steps])

    def group(self, steps: list[celeriac_task.Signature]) -> list[str]:
        return self._guard(enqueue.enqueue_group, [_step(s) for s in steps])

    def chord(self, header: list[celeriac_task.Signature],
              body: celeriac_task.Signature) -> list[str]:
        return self._guard(enqueue.enqueue_chord, [_step(s) for s in header], _step(body))


celeriac_task._host = _Host()


class WitWorld(wit_world.WitWorld):
    """The exports componentize-py binds: the tasks this component serves, and one run."""

    def describe(self) -> list[types.TaskInfo]:
        return [types.TaskInfo(**t.info) for t in celeriac_task.tasks()]

    def run(self, name: str, call: types.Call) -> str:
        outcome = celeriac_task._run(
            name, call.id, call.args, call.kwargs, call.retries, call.soft_deadline_ms
        )
        if outcome[0] == "ok":
            return outcome[1]
        if outcome[0] == "retry":
            raise Err(types.TaskError_Retry(types.RetryRequest(outcome[1], outcome[2])))
        raise Err(types.TaskError_Fail(types.Failure(outcome[1], outcome[2])))
