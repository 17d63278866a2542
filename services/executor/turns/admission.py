"""What a turn is checked for before anything of it is stored.

The user's message is appended before the model is asked, and the log is
append-only: a turn refused after that append leaves the message behind with
no answer, and every retry adds another. So whatever a turn can be refused for
up front is checked first: its options' ranges (`check_options`), its model
against what llm_proxy serves (`ModelCatalog`), the session's owner (by the
turn itself, with the session read).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from typing import Protocol

from threadline import errors
from threadline.logs import get_logger
from threadline.v1 import executor_pb2, llm_pb2

log = get_logger(__name__)

#: The range OpenAI-compatible servers accept.
MAX_TEMPERATURE = 2.0
#: Names of the default route: llm_proxy resolves them without a lookup.
_DEFAULT_MODELS = frozenset({"", "default"})
#: How many known names a refusal lists.
_LISTED = 20


def check_input(request: executor_pb2.RunTurnRequest) -> None:
    if not request.tenant:
        raise errors.InvalidArgument("tenant is required")
    if not request.input.strip():
        raise errors.InvalidArgument("input is empty: send the user's message")


def check_options(options: executor_pb2.TurnOptions, *, context_budget_tokens: int) -> None:
    """The options' ranges. max_tokens is reserved out of the context budget, so it
    must leave room for a prompt (session's BuildContext refuses it otherwise)."""
    if not 0 <= options.max_tokens < context_budget_tokens:
        raise errors.InvalidArgument(
            f"options.max_tokens must be between 0 (the default) and "
            f"{context_budget_tokens - 1} (below the context budget), got {options.max_tokens}"
        )
    if options.HasField("temperature"):
        temperature = options.temperature
        # NaN compares false both ways: refused with the out-of-range values.
        if not (math.isfinite(temperature) and 0.0 <= temperature <= MAX_TEMPERATURE):
            raise errors.InvalidArgument(
                f"options.temperature must be between 0 and {MAX_TEMPERATURE:g}, "
                f"got {temperature:g}"
            )


class ModelLister(Protocol):
    async def list_models(self, *, timeout: float | None = ...) -> llm_pb2.ListModelsResponse: ...


class ModelCatalog:
    """The models and route aliases llm_proxy serves, as its ListModels tells.

    Asked at most every `ttl_s`, and again (at most every `recheck_s`) before a
    model is refused: llm_proxy may have been restarted with new routes. When
    llm_proxy cannot be asked, no model is refused here: the model call decides,
    as it always has.
    """

    def __init__(
        self,
        llm: ModelLister,
        *,
        ttl_s: float = 30.0,
        recheck_s: float = 1.0,
        timeout_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._llm = llm
        self._ttl_s = ttl_s
        self._recheck_s = recheck_s
        self._timeout_s = timeout_s
        self._clock = clock
        self._known: frozenset[str] | None = None
        self._fetched_at = -math.inf

    async def check(self, model: str, *, field: str) -> None:
        """InvalidArgument naming `field` when llm_proxy would refuse `model`."""
        if model in _DEFAULT_MODELS:
            return
        known = await self._models(max_age_s=self._ttl_s)
        if known is not None and model not in known:
            known = await self._models(max_age_s=self._recheck_s)
        if known is None or model in known:
            return
        raise errors.InvalidArgument(
            f"{field}: unknown model {_shown(model)}; known models and routes are "
            f"{_listing(known)}",
            details={"field": field},
        )

    async def _models(self, *, max_age_s: float) -> Collection[str] | None:
        if self._known is not None and self._clock() - self._fetched_at <= max_age_s:
            return self._known
        try:
            listed = await self._llm.list_models(timeout=self._timeout_s)
        except errors.ThreadlineError as exc:
            log.warning("turn.models_unknown", error=exc.message)
            return None
        self._known = frozenset(m.id for m in listed.models)
        self._fetched_at = self._clock()
        return self._known


def _shown(model: str) -> str:
    # The name is the caller's: quoted when short, never echoed whole when long.
    return repr(model) if len(model) <= 64 else f"{model[:32]!r}... ({len(model)} characters)"


def _listing(known: Collection[str]) -> str:
    names = sorted(known)
    shown = ", ".join(names[:_LISTED])
    return shown + (f" and {len(names) - _LISTED} more" if len(names) > _LISTED else "")
