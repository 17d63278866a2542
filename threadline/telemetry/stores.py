"""Store operations as spans and metrics, without touching the stores.

`instrumented(store, "session", "postgres")` returns the store behind a proxy whose
coroutine methods each run in a `store.<operation>` span (a child of the RPC's
span) and count into `threadline_store_operations_total` and
`threadline_store_operation_seconds`. One wrapper covers every backend of every
store, so a new backend or method is measured without code of its own.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from threadline import errors
from threadline.telemetry import metrics, tracing

T = TypeVar("T")


class _Instrumented:
    def __init__(self, inner: object, store: str, backend: str) -> None:
        self._inner = inner
        self._labels = (store, backend)

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._inner, name)
        if name.startswith("_") or not inspect.iscoroutinefunction(value):
            return value
        wrapped = self._measured(name, value)
        # Cached on the proxy: the next lookup does not reach __getattr__.
        setattr(self, name, wrapped)
        return wrapped

    def _measured(
        self, operation: str, method: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        store, backend = self._labels
        attributes = {"db.system": backend, "db.operation": operation, "threadline.store": store}
        # Label children looked up once per operation, not per call.
        seconds = metrics.STORE_SECONDS.labels(store, backend, operation)
        counted = {
            outcome: metrics.STORE_OPERATIONS.labels(store, backend, operation, outcome)
            for outcome in ("ok", "refused", "error")
        }
        span_name = f"store.{operation}"

        @functools.wraps(method)
        async def call(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            outcome = "error"
            try:
                with tracing.child_span(span_name, attributes):
                    result = await method(*args, **kwargs)
                outcome = "ok"
                return result
            except errors.ThreadlineError:
                # Not found, a stale head, a limit: the store answered, the caller was refused.
                outcome = "refused"
                raise
            finally:
                counted[outcome].inc()
                seconds.observe(time.perf_counter() - started)

        return call


def instrumented(inner: T, store: str, backend: str) -> T:
    """`inner` with every public coroutine method measured (see the module docstring)."""
    return cast(T, _Instrumented(inner, store, backend))


def backend_of(store: object) -> str:
    """The backend's name from its class (SqliteSessionStore -> sqlite), for the labels."""
    name = type(store).__name__.lower()
    for backend in ("sqlite", "postgres", "redis"):
        if name.startswith(backend):
            return backend
    return name
