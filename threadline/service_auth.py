"""Service-to-service authentication: only threadline's own services call the internal ports.

The internal services (executor, llm_proxy, session, memory) trust the tenant a
request names, so whoever may call them may read any tenant's data. Two proofs
that a caller is one of ours, either or both:

- a shared service token, sent by every internal client as the metadata
  `x-threadline-service-token` and compared in constant time;
- under mutual TLS, the client certificate, verified against the internal CA
  during the handshake (a caller without one never gets a connection), and
  optionally its name checked against the services allowed to call.

A call that fails a check ends UNAUTHENTICATED (nothing proves who it is) or
PERMISSION_DENIED (a certificate names a caller that is not allowed), with a
message naming what is missing. The health service is exempt, so probes need
neither; the gateway's public API does not use this (it checks API keys).
"""

from __future__ import annotations

import hmac
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeAlias

import grpc
import grpc.aio

from threadline import errors
from threadline.logs import get_logger
from threadline.status import abort_with

TOKEN_KEY = "x-threadline-service-token"
#: Methods every caller may use: probes carry neither a token nor a certificate.
_EXEMPT_PREFIX = "/grpc.health.v1.Health/"

log = get_logger("threadline.service_auth")

# Strings: grpc's classes are generic only in its type stubs.
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"


class ServiceAuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses calls that do not prove they come from a threadline service."""

    def __init__(self, tokens: Sequence[str], peer_names: Sequence[str] = ()) -> None:
        self._tokens = [token.encode() for token in tokens]
        self._peer_names = frozenset(peer_names)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(_EXEMPT_PREFIX):
            return handler
        return _guarded(handler, self._check)

    async def _check(self, context: Context) -> None:
        refusal = self.refusal(dict(context.invocation_metadata() or ()), context.auth_context())
        if refusal is not None:
            log.warning("service_auth.refused", reason=refusal.message, peer=context.peer())
            await abort_with(context, refusal)

    def refusal(
        self, metadata: Mapping[str, str | bytes], auth: Mapping[str, Iterable[bytes]]
    ) -> errors.ThreadlineError | None:
        """Why a call with this metadata and TLS peer may not proceed, or None."""
        if self._tokens:
            presented = metadata.get(TOKEN_KEY)
            if presented is None:
                return errors.Unauthenticated(
                    f"missing service token: internal services require the {TOKEN_KEY}"
                    " metadata (service_auth.token)"
                )
            given = presented.encode() if isinstance(presented, str) else presented
            # Every token is compared, each in constant time: the answer's timing
            # tells nothing about how much of a guess was right.
            if not any([hmac.compare_digest(given, token) for token in self._tokens]):
                return errors.Unauthenticated(f"wrong service token in {TOKEN_KEY}")
        if self._peer_names:
            names = _certificate_names(auth)
            if not names:
                return errors.Unauthenticated(
                    "missing client certificate: internal services require mutual TLS"
                )
            if not names & self._peer_names:
                return errors.PermissionDenied(
                    f"client certificate for {', '.join(sorted(names))} is not allowed here"
                    f" (service_auth.peer_names: {', '.join(sorted(self._peer_names))})"
                )
        return None


def _certificate_names(auth: Mapping[str, Iterable[bytes]]) -> set[str]:
    """The verified client certificate's DNS names, or its common name when it has none."""
    names = auth.get("x509_subject_alternative_name") or auth.get("x509_common_name") or []
    return {name.decode(errors="replace") for name in names}


def _guarded(handler: Handler, check: Callable[[Context], Awaitable[None]]) -> Handler:
    """`handler` with `check` (which aborts the call) run before its behaviour."""
    kinds = [(kind, make) for kind, make in _HANDLER_KINDS if getattr(handler, kind) is not None]
    if not kinds:
        return handler
    kind, make = kinds[0]
    inner: Any = getattr(handler, kind)
    guarded: Any
    if inspect.isasyncgenfunction(inner):

        async def stream(request: Any, context: Context) -> AsyncIterator[Any]:
            await check(context)
            async for item in inner(request, context):
                yield item

        guarded = stream
    else:

        async def call(request: Any, context: Context) -> Any:
            await check(context)
            return await inner(request, context)

        guarded = call
    return make(
        guarded,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


_HANDLER_KINDS: tuple[tuple[str, Callable[..., Handler]], ...] = (
    ("unary_unary", grpc.unary_unary_rpc_method_handler),
    ("unary_stream", grpc.unary_stream_rpc_method_handler),
    ("stream_unary", grpc.stream_unary_rpc_method_handler),
    ("stream_stream", grpc.stream_stream_rpc_method_handler),
)
