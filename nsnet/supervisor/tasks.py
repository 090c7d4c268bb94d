"""Requests to children without blocking the supervisor's loop.

A request to a child (forwarder, relay, interface helper) returns a Future
at once; the child's reply, its death or the request's deadline settles it
later, from the poll loop.  An API request that needs such replies is a
generator (a task) that yields Futures; run_task resumes it when each one
is settled, and hands its result to a callback.  Meanwhile the loop serves
signals, the exit-fd and other API clients.
"""

from __future__ import annotations

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Generator


class Future:
    __slots__ = ("done", "value", "error", "_callbacks")

    def __init__(self) -> None:
        self.done = False
        self.value: Any = None
        self.error: BaseException | None = None
        self._callbacks: list[Callable[[Future], None]] = []

    def resolve(self, value: Any = None) -> None:
        self._settle(value, None)

    def fail(self, error: BaseException) -> None:
        self._settle(None, error)

    def _settle(self, value: Any, error: BaseException | None) -> None:
        if self.done:
            return
        self.done, self.value, self.error = True, value, error
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            fn(self)

    def then(self, fn: Callable[[Future], None]) -> None:
        """fn(self) once settled (at once if it is)."""
        if self.done:
            fn(self)
        else:
            self._callbacks.append(fn)


def resolved(value: Any) -> Future:
    f = Future()
    f.resolve(value)
    return f


def wait(x: Any) -> Generator[Any, Any, Any]:
    """In a task: `v = yield from wait(x)`: x may be a plain value, a
    Future or another task (a generator)."""
    if isinstance(x, Future):
        return (yield x)
    if hasattr(x, "send") and hasattr(x, "throw"):
        return (yield from x)
    return x


def run_task(gen: Generator[Any, Any, Any], done: Callable[[Any, BaseException | None], None]) -> None:
    """Drive gen: resume it with each yielded Future's value (or throw its
    error into it); done(result, None) or done(None, error) at the end."""

    def step(value: Any, error: BaseException | None) -> None:
        while True:
            try:
                fut = gen.throw(error) if error is not None else gen.send(value)
            except StopIteration as stop:
                done(stop.value, None)
                return
            except Exception as e:  # noqa: BLE001 (the callback decides)
                done(None, e)
                return
            if not isinstance(fut, Future):
                value, error = None, TypeError(f"task yielded {fut!r}, not a Future")
                continue
            if not fut.done:
                fut.then(lambda f: step(f.value, f.error))
                return
            value, error = fut.value, fut.error

    step(None, None)


def run_sync(gen: Generator[Any, Any, Any]) -> Any:
    """Run a task whose Futures are all settled when yielded (a backend
    without children, e.g. the unit tier's fake one)."""
    out: list[Any] = []
    run_task(gen, lambda v, e: out.append((v, e)))
    if not out:
        raise RuntimeError("task waits for a Future: run it with run_task")
    value, error = out[0]
    if error is not None:
        raise error
    return value
