"""Which upstream models a request may go to, in order: routes and fallbacks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from services.llm_proxy.breaker import CircuitBreaker
from services.llm_proxy.limits import UpstreamLimiter
from services.llm_proxy.upstream import Upstream
from threadline import errors
from threadline.config import LlmSettings, OnCut, UpstreamSettings
from threadline.v1 import llm_pb2


@dataclass
class UpstreamRuntime:
    """One upstream with the state the proxy keeps about it."""

    client: Upstream
    limiter: UpstreamLimiter
    breaker: CircuitBreaker

    @property
    def name(self) -> str:
        return self.client.name

    @property
    def settings(self) -> UpstreamSettings:
        return self.client.settings


@dataclass(frozen=True)
class Target:
    upstream: UpstreamRuntime
    model: str


@dataclass(frozen=True)
class ResolvedRoute:
    name: str
    targets: tuple[Target, ...]
    context_fallback: str = ""
    #: What a stream cut after output becomes (see `threadline.config.OnCut`).
    on_cut: OnCut = "continue"


class Router:
    def __init__(self, settings: LlmSettings, upstreams: Mapping[str, UpstreamRuntime]) -> None:
        self.settings = settings
        self.upstreams = dict(upstreams)

    def route(self, alias: str) -> ResolvedRoute:
        route = self.settings.routes[alias]
        return ResolvedRoute(
            alias,
            tuple(Target(self.upstreams[t.upstream], t.model) for t in route.targets),
            route.context_fallback,
            route.on_cut or self.settings.on_cut,
        )

    def resolve(self, requested: str) -> ResolvedRoute:
        """A route alias, a model some upstream serves, or "" for the default."""
        if requested in ("", "default"):
            if self.settings.default_route:
                return self.route(self.settings.default_route)
            first = next(iter(self.upstreams.values()))
            target = Target(first, first.settings.served_models[0])
            return ResolvedRoute("default", (target,), on_cut=self.settings.on_cut)
        if requested in self.settings.routes:
            return self.route(requested)
        targets = tuple(
            Target(upstream, requested)
            for upstream in self.upstreams.values()
            if requested in upstream.settings.served_models
        )
        if targets:
            return ResolvedRoute(requested, targets, on_cut=self.settings.on_cut)
        known = sorted({*self.settings.routes, *(m.id for m in self.models())})
        raise errors.InvalidArgument(
            f"unknown model {requested!r}: known models and routes are {', '.join(known)}",
            details={"model": requested},
        )

    def models(self) -> list[llm_pb2.ModelInfo]:
        served = [
            llm_pb2.ModelInfo(id=model, upstream=upstream.name)
            for upstream in self.upstreams.values()
            for model in upstream.settings.served_models
        ]
        routes = [
            llm_pb2.ModelInfo(id=alias, upstream=route.targets[0].upstream)
            for alias, route in self.settings.routes.items()
        ]
        return routes + served
