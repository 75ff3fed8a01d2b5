"""Write celeriac tasks in Python.

A task is a plain function under ``@task``, as in Celery::

    from celeriac_task import task

    @task(name="summarize.summarize_session", queue="default", max_retries=3)
    def summarize_session(text: str, max_chars: int = 400):
        ...

``python -m celeriac_task build app -o app.wasm`` turns the module ``app`` (and everything it
imports) into a WebAssembly component that ``celeriac worker`` runs, each call in a fresh
sandbox. Producers call it as they call any Celery task.

What a run sees:

- arguments bind as Python binds them; a mismatch is a ``TypeError`` failure;
- any exception fails the task with the exception's class name and message, so a Celery client
  re-raises ``ZeroDivisionError`` (or the task's own class name);
- ``retry(countdown=...)`` (or ``self.retry`` with ``bind=True``) runs it again later;
- ``current()`` is the running task: its id, retries, ``kv``, ``enqueue``, ``update_state``,
  ``cancelled()`` and ``log``. Each host capability works only if the worker's configuration
  grants it to the task; otherwise the call raises ``PermissionError``.

This module is plain Python, so tasks can be unit-tested with CPython; the host calls
themselves exist only inside the component (``celeriac_task._world`` binds them).
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import traceback
from typing import Any, Callable, Iterable, Optional

__all__ = [
    "task",
    "Task",
    "Context",
    "Retry",
    "SoftTimeLimitExceeded",
    "HostUnavailable",
    "current",
    "retry",
    "signature",
    "Signature",
    "logger",
    "tasks",
]

__version__ = "0.1.0"

# The tasks this component serves, by name, in the order they were declared.
_TASKS: dict[str, "Task"] = {}

# The host's imports, set by `celeriac_task._world` inside a component; `None` under CPython.
_host: Any = None

# The context of the run in progress (a component runs one task at a time).
_current: Optional["Context"] = None


class Retry(Exception):
    """Raise (or call :func:`retry`) to run the task again later.

    The retry spends one of the task's ``max_retries``; when none are left the task is
    dead-lettered. ``countdown`` is in seconds; without it the task's backoff policy decides.
    """

    def __init__(self, reason: str = "retry requested", countdown: Optional[float] = None):
        super().__init__(reason)
        self.reason = reason
        self.countdown = countdown


class SoftTimeLimitExceeded(Exception):
    """The soft time limit has passed or the task was revoked: clean up and return.

    Host calls raise it once that happens; a task that lets it escape fails with this name, as a
    Celery task would.
    """


class HostUnavailable(Exception):
    """The host could not complete a call right now (its store is unreachable).

    A task that lets it escape is retried under its retry policy.
    """


class Task:
    """A function registered with :func:`task`; calling it calls the function directly."""

    def __init__(self, fn: Callable[..., Any], name: str, bind: bool, info: dict[str, Any]):
        self.fn = fn
        self.name = name
        self.bind = bind
        self.info = info
        self.signature = inspect.signature(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", name)
        self.__wrapped__ = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<celeriac task {self.name}>"


def _ms(seconds: Optional[float], what: str) -> Optional[int]:
    if seconds is None:
        return None
    if not isinstance(seconds, (int, float)) or seconds < 0:
        raise ValueError(f"{what} must be a number of seconds >= 0, got {seconds!r}")
    return int(round(seconds * 1000))


def task(
    fn: Optional[Callable[..., Any]] = None,
    *,
    name: Optional[str] = None,
    queue: Optional[str] = None,
    max_retries: Optional[int] = None,
    soft_time_limit: Optional[float] = None,
    time_limit: Optional[float] = None,
    default_retry_delay: Optional[float] = None,
    retry_backoff_max: Optional[float] = None,
    rate_limit: Optional[str] = None,
    memory_limit: Optional[int] = None,
    fuel: Optional[int] = None,
    bind: bool = False,
    description: Optional[str] = None,
) -> Any:
    """Registers a function as a task, with Celery's option names and units (seconds).

    - ``name``: what producers send; defaults to ``module.function`` as in Celery.
    - ``queue``, ``max_retries``, ``rate_limit`` (``"10/s"``, ``"100/m"``), ``soft_time_limit``
      and ``time_limit`` (seconds), ``default_retry_delay`` (the first retry's delay, seconds;
      later ones back off exponentially) and ``retry_backoff_max`` (seconds).
    - ``memory_limit`` (bytes) and ``fuel`` are celeriac's own; Python tasks rarely want fuel,
      since the interpreter burns it fast.
    - ``bind=True`` passes the running :class:`Context` as the first argument, like Celery's
      ``self``.

    The worker's configuration file overrides every one of these.
    """

    def register(fn: Callable[..., Any]) -> Task:
        task_name = name or f"{fn.__module__}.{fn.__name__}"
        if task_name in _TASKS:
            raise ValueError(f"task {task_name!r} is registered twice")
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError(f"max_retries must be an int >= 0, got {max_retries!r}")
        doc = description if description is not None else (inspect.getdoc(fn) or "")
        info = {
            "name": task_name,
            "description": doc.strip().splitlines()[0] if doc.strip() else "",
            "queue": queue,
            "soft_time_limit_ms": _ms(soft_time_limit, "soft_time_limit"),
            "hard_time_limit_ms": _ms(time_limit, "time_limit"),
            "memory_limit_bytes": memory_limit,
            "fuel": fuel,
            "max_retries": max_retries,
            "retry_backoff_ms": _ms(default_retry_delay, "default_retry_delay"),
            "retry_backoff_max_ms": _ms(retry_backoff_max, "retry_backoff_max"),
            "rate_limit": rate_limit,
        }
        registered = Task(fn, task_name, bind, info)
        _TASKS[task_name] = registered
        return registered

    return register(fn) if fn is not None else register


def tasks() -> list[Task]:
    """Every registered task, in the order it was declared."""
    return list(_TASKS.values())


class Request:
    """What Celery calls ``self.request``: the id and retry count of this run."""

    def __init__(self, task: str, id: str, retries: int, soft_deadline_ms: Optional[int]):
        self.task = task
        self.id = id
        self.retries = retries
        self.soft_deadline_ms = soft_deadline_ms

    def __repr__(self) -> str:
        return f"<Request {self.task}[{self.id}] retries={self.retries}>"


class Signature:
    """A task call to send as a step of a chain, group or chord (Celery's ``signature``)."""

    def __init__(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: Optional[dict[str, Any]] = None,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        countdown: Optional[float] = None,
        immutable: bool = False,
    ):
        self.name = name
        self.args = list(args)
        self.kwargs = dict(kwargs or {})
        self.queue = queue
        self.priority = priority
        self.countdown = countdown
        self.immutable = immutable

    def si(self) -> "Signature":
        """This step, keeping its own arguments (not given the result before it)."""
        self.immutable = True
        return self


def signature(name: str, *args: Any, **kwargs: Any) -> Signature:
    """``signature("add", 1, 2)``: a step for :meth:`Context.chain` and friends."""
    return Signature(name, args, kwargs)


class KV:
    """The task's key-value namespace (needs the ``kv`` grant). Values are bytes."""

    def get(self, key: str) -> Optional[bytes]:
        return _call("get", key)

    def set(self, key: str, value: bytes | str) -> None:
        _call("set", key, value.encode() if isinstance(value, str) else bytes(value))

    def delete(self, *keys: str) -> int:
        return _call("delete", list(keys))

    def set_add(self, key: str, *members: str) -> int:
        return _call("set_add", key, list(members))

    def set_remove(self, key: str, *members: str) -> int:
        return _call("set_remove", key, list(members))

    def set_members(self, key: str) -> set[str]:
        return set(_call("set_members", key))

    def get_json(self, key: str, default: Any = None) -> Any:
        """The value at ``key`` read as JSON, or ``default`` when absent."""
        raw = self.get(key)
        return default if raw is None else json.loads(raw)

    def set_json(self, key: str, value: Any) -> None:
        self.set(key, json.dumps(value, separators=(",", ":")))


class Context:
    """The running task, as Celery's bound ``self``: ``current()`` or the first argument of a
    ``bind=True`` task."""

    def __init__(self, request: Request):
        self.request = request
        self.kv = KV()

    @property
    def id(self) -> str:
        return self.request.id

    @property
    def retries(self) -> int:
        return self.request.retries

    def retry(
        self,
        countdown: Optional[float] = None,
        exc: Optional[BaseException] = None,
        reason: Optional[str] = None,
    ) -> "Retry":
        """Raises :class:`Retry`, as Celery's ``self.retry``: ``raise self.retry(...)`` also
        reads right."""
        raise Retry(reason or (f"{type(exc).__name__}: {exc}" if exc else "retry requested"),
                    countdown)

    def update_state(self, state: str = "PROGRESS", meta: Any = None) -> None:
        """Publishes a custom state with JSON ``meta`` (needs the ``progress`` grant)."""
        _call("progress", state, json.dumps(meta))

    progress = update_state

    def cancelled(self) -> bool:
        """True once the soft time limit passed or the task was revoked: return soon."""
        return bool(_call("cancelled"))

    def log(self, level: str, message: str) -> None:
        """Writes a line into the host's log for this task (needs the ``log`` grant;
        without it the line is dropped)."""
        _call("log", level, str(message))

    def enqueue(
        self,
        name: str,
        args: Iterable[Any] = (),
        kwargs: Optional[dict[str, Any]] = None,
        *,
        queue: Optional[str] = None,
        priority: Optional[int] = None,
        countdown: Optional[float] = None,
    ) -> str:
        """Sends a child task (the configuration must allow its name); returns its id. Children
        are sent only if this run succeeds."""
        step = Signature(name, args, kwargs, queue=queue, priority=priority, countdown=countdown)
        return _call("enqueue", step)

    def chain(self, *steps: Signature) -> list[str]:
        """Sends a chain: each step gets the result before it. Returns the ids in order."""
        return _call("chain", list(steps))

    def group(self, *steps: Signature) -> list[str]:
        """Sends every step at once. Returns their ids."""
        return _call("group", list(steps))

    def chord(self, header: Iterable[Signature], body: Signature) -> list[str]:
        """Sends ``header`` at once, then ``body`` with the list of their results. Returns the
        header's ids, then the body's."""
        return _call("chord", list(header), body)


def current() -> Context:
    """The task running now; raises ``RuntimeError`` outside a run."""
    if _current is None:
        raise RuntimeError("no celeriac task is running")
    return _current


def retry(countdown: Optional[float] = None, reason: Optional[str] = None) -> "Retry":
    """Runs the current task again later: raises :class:`Retry`."""
    raise Retry(reason or "retry requested", countdown)


def _call(op: str, *args: Any) -> Any:
    if _host is None:
        raise RuntimeError(
            f"celeriac host call {op!r} is only available inside a component run by celeriac"
        )
    return getattr(_host, op)(*args)


class _HostLog(logging.Handler):
    """Sends ``logging`` records of the ``celeriac`` logger to the host's log."""

    LEVELS = [(logging.ERROR, "error"), (logging.WARNING, "warn"), (logging.INFO, "info"),
              (logging.DEBUG, "debug")]

    def emit(self, record: logging.LogRecord) -> None:
        level = next((name for at, name in self.LEVELS if record.levelno >= at), "trace")
        try:
            message = self.format(record)
            if _host is None:
                print(f"[{level}] {message}", file=sys.stderr)
            else:
                _host.log(level, message)
        except Exception:
            self.handleError(record)


#: A ``logging`` logger whose records reach the worker's log, tagged with the task.
logger = logging.getLogger("celeriac")
logger.setLevel(logging.INFO)
logger.addHandler(_HostLog())
logger.propagate = False


def _decode(raw: str, kind: type, what: str) -> Any:
    try:
        value = json.loads(raw) if raw else None
    except ValueError as e:
        raise TypeError(f"{what} are not valid JSON: {e}") from None
    if value is None:
        return kind()
    if not isinstance(value, kind):
        raise TypeError(f"{what} must be a JSON {'list' if kind is list else 'object'}, "
                        f"got {type(value).__name__}")
    return value


def _run(
    name: str, id: str, args: str, kwargs: str, retries: int, soft_deadline_ms: Optional[int]
) -> tuple:
    """Runs one task and says how it ended, for the component's ``run`` export:
    ``("ok", json)``, ``("retry", reason, countdown_ms)`` or ``("fail", exc_type, message)``.
    Never raises: any exception of the task becomes a failure named for its class."""
    global _current
    registered = _TASKS.get(name)
    if registered is None:
        return ("fail", "NotRegistered", f"{name!r}: this component serves "
                f"{', '.join(sorted(_TASKS)) or 'no tasks'}")
    context = Context(Request(name, id, retries, soft_deadline_ms))
    _current = context
    try:
        positional = _decode(args, list, "args")
        named = _decode(kwargs, dict, "kwargs")
        if registered.bind:
            positional = [context, *positional]
        try:
            bound = registered.signature.bind(*positional, **named)
        except TypeError as e:
            raise TypeError(f"{registered.__name__}() {e}") from None
        value = registered.fn(*bound.args, **bound.kwargs)
        try:
            return ("ok", json.dumps(value))
        except (TypeError, ValueError) as e:
            return ("fail", "EncodeError", f"the result is not JSON: {e}")
    except Retry as r:
        countdown = None if r.countdown is None else max(0, int(round(r.countdown * 1000)))
        return ("retry", r.reason, countdown)
    except HostUnavailable as e:
        return ("retry", f"HostUnavailable: {e}", None)
    except RecursionError as e:
        return ("fail", "RecursionError", str(e))
    except MemoryError as e:
        # The interpreter could not grow its memory: the host reports the cap it hit.
        return ("fail", "MemoryError", str(e) or "out of memory")
    except BaseException as e:  # noqa: BLE001 - every exception is the task's failure
        # The traceback goes to stderr, which the worker keeps the tail of.
        traceback.print_exc()
        return ("fail", type(e).__name__, str(e))
    finally:
        _current = None
