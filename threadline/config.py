"""Configuration: `THREADLINE_*` environment variables over an optional YAML file.

Nested settings use `__` in variable names (`THREADLINE_LLM__UPSTREAM__BASE_URL`);
lists and maps take JSON (`THREADLINE_GATEWAY__API_KEYS='[...]'`). The loader takes
the environment as a parameter so tests never patch `os.environ`. Invalid config
raises `ConfigError` naming each bad setting and the variable that sets it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from threadline.store_urls import (
    PostgresUrl,
    SqliteUrl,
    StoreUrl,
    check_store_url,
    parse_store_url,
)

ENV_PREFIX = "THREADLINE_"
ServiceName = Literal["gateway", "executor", "llm_proxy", "session", "memory"]
SERVICE_NAMES: tuple[ServiceName, ...] = ("gateway", "executor", "llm_proxy", "session", "memory")
#: The models `threadline up` can serve itself (threadline.local_model.catalogue).
LocalModelName = Literal["smollm2-135m", "gemma-3-270m"]


class ConfigError(Exception):
    """Configuration that cannot be used; the message names every bad setting."""


class _Section(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _endpoints(target: str) -> list[str]:
    """The host:port endpoints of a gRPC target, in the forms threadline accepts."""
    if target.startswith("dns:///"):
        return [target.removeprefix("dns:///")]
    for scheme in ("ipv4:", "ipv6:"):
        if target.startswith(scheme):
            return target.removeprefix(scheme).split(",")
    return [target]


def _port(endpoint: str) -> int | None:
    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        return None
    return int(port)


class Addresses(_Section):
    """Where each service listens (its port) and where its peers reach it.

    A peer's address is a gRPC target: `host:port`, `dns:///host:port` (every
    address the name resolves to, e.g. a headless Service's pods) or
    `ipv4:host:port,host:port` (a fixed list of replicas). Callers spread their
    calls round robin over whatever the target names.
    """

    gateway: str = "127.0.0.1:50051"
    executor: str = "127.0.0.1:50052"
    llm_proxy: str = "127.0.0.1:50053"
    session: str = "127.0.0.1:50054"
    memory: str = "127.0.0.1:50055"

    @field_validator("*")
    @classmethod
    def _target(cls, value: str) -> str:
        if len(value) > 1024 or not all(_port(e) is not None for e in _endpoints(value)):
            shown = value if len(value) <= 80 else value[:80] + "..."
            raise ValueError(
                f"expected host:port, dns:///host:port or ipv4:host:port,host:port, got {shown!r}"
            )
        return value

    def of(self, service: ServiceName) -> str:
        return str(getattr(self, service))

    def port_of(self, service: ServiceName) -> int | None:
        """The port every endpoint of the service's target shares, or None if they differ."""
        ports = {_port(endpoint) for endpoint in _endpoints(self.of(service))}
        return ports.pop() if len(ports) == 1 else None


class RetrySettings(_Section):
    """Full-jitter exponential backoff for attempts before the first token."""

    max_attempts: int = Field(default=3, ge=1, le=20)
    base_delay_s: float = Field(default=0.2, gt=0)
    max_delay_s: float = Field(default=5.0, gt=0)
    budget_s: float = Field(default=30.0, gt=0)


#: An upstream's connection pool when neither max_connections nor max_concurrency is
#: set: room for 1,000 streamed answers at once with some to spare for memory's jobs.
DEFAULT_MAX_CONNECTIONS = 1024


class TimeoutSettings(_Section):
    #: The TCP/TLS connect alone; the wait for a free pooled connection is `pool_wait_s`.
    connect_s: float = Field(default=5.0, gt=0)
    #: How long a request waits for a free connection of the upstream's pool (a local
    #: wait: never counted against the upstream's circuit) before failing over.
    pool_wait_s: float = Field(default=60.0, gt=0)
    first_token_s: float = Field(default=60.0, gt=0)
    idle_between_chunks_s: float = Field(default=30.0, gt=0)
    total_s: float = Field(default=600.0, gt=0)


class Capabilities(_Section):
    """What an upstream supports beyond plain chat."""

    #: False folds system messages into the first user message: some chat templates
    #: (llama.cpp's `gemma` format) silently drop system messages.
    system_role: bool = True
    #: Continues a trailing assistant message (vLLM `continue_final_message`): lets a
    #: stream cut on another upstream be finished here, seamlessly.
    prefill: bool = False
    #: Reports cumulative usage in every streamed chunk (vLLM
    #: `stream_options.continuous_usage_stats`): a cut stream is then billed with the
    #: upstream's own count instead of an estimate.
    usage_per_chunk: bool = False
    tools: bool = True
    json_mode: bool = True


class UpstreamSettings(_Section):
    name: str = "default"
    base_url: str
    #: Name of the environment variable holding the API key (never the key itself).
    api_key_env: str = ""
    #: The key, read by `load_settings` from the variable `api_key_env` names (None when
    #: that is unset or empty). Not a setting: never configured, never dumped.
    api_key: SecretStr | None = Field(default=None, exclude=True)
    #: The model it serves (shorthand for a one-element `models`).
    model: str = ""
    models: tuple[str, ...] = ()
    #: Requests in flight at once from one llm_proxy replica; 0 = unlimited.
    max_concurrency: int = Field(default=0, ge=0)
    #: Connections one llm_proxy replica opens to this upstream (one per request being
    #: answered); 0 = `max_concurrency` when that is set, else DEFAULT_MAX_CONNECTIONS.
    max_connections: int = Field(default=0, ge=0)
    #: Requests and tokens per minute, shared by all replicas through Redis; 0 = unlimited.
    rpm: int = Field(default=0, ge=0)
    tpm: int = Field(default=0, ge=0)
    timeouts: TimeoutSettings = TimeoutSettings()
    capabilities: Capabilities = Capabilities()

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _not_configured(cls, value: object) -> object:
        # Config files and THREADLINE_* variables give strings; only load_settings puts
        # a SecretStr here. The value is not echoed: it may be the key itself.
        if value is not None and not isinstance(value, SecretStr):
            raise ValueError("not a setting: set api_key_env to the name of a variable holding it")
        return value

    @model_validator(mode="after")
    def _some_model(self) -> UpstreamSettings:
        if not self.model and not self.models:
            raise ValueError(f"upstream {self.name!r} serves no model: set model or models")
        return self

    @property
    def pool_size(self) -> int:
        """The connection pool's size, defaults applied."""
        return self.max_connections or self.max_concurrency or DEFAULT_MAX_CONNECTIONS

    @property
    def served_models(self) -> tuple[str, ...]:
        if self.model and self.model not in self.models:
            return (self.model, *self.models)
        return self.models


#: What a route does with a stream cut after output (docs/llm-proxy.md, "Cut streams"):
#: end it INTERRUPTED; continue it on a prefill-capable fallback; restart it on the
#: next target after a rollback; or try continuing first, then restart.
OnCut = Literal["interrupt", "continue", "restart", "continue_then_restart"]


class RouteTarget(_Section):
    upstream: str
    model: str


class Route(_Section):
    """A model alias: targets tried in order (the first that answers wins)."""

    targets: tuple[RouteTarget, ...] = Field(min_length=1)
    #: Route to use when the prompt is too long for these targets' context window.
    context_fallback: str = ""
    #: What a stream cut after output becomes; empty = `llm.on_cut`.
    on_cut: OnCut | None = None


class CircuitSettings(_Section):
    failure_threshold: int = Field(default=5, ge=1)
    cooldown_s: float = Field(default=30.0, gt=0)


class LlmSettings(_Section):
    #: One upstream (shorthand); `upstreams` lists several. With neither, `threadline up`
    #: starts the bundled local model and a lone llm_proxy refuses to start.
    upstream: UpstreamSettings | None = None
    upstreams: tuple[UpstreamSettings, ...] = ()
    routes: dict[str, Route] = {}
    #: Route for requests that name no model; empty = the first upstream's first model.
    default_route: str = ""
    retry: RetrySettings = RetrySettings()
    circuit: CircuitSettings = CircuitSettings()
    #: How long a request may wait for rate-limit capacity before failing over.
    rate_limit_wait_s: float = Field(default=5.0, ge=0)
    #: What a stream cut after output becomes on routes that do not say (and on
    #: requests that name a model rather than a route).
    on_cut: OnCut = "continue"

    @property
    def all_upstreams(self) -> tuple[UpstreamSettings, ...]:
        return ((self.upstream,) if self.upstream else ()) + self.upstreams

    @model_validator(mode="after")
    def _consistent(self) -> LlmSettings:
        names = [u.name for u in self.all_upstreams]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"upstream names must be unique, repeated: {', '.join(duplicates)}")
        served = {u.name: u.served_models for u in self.all_upstreams}
        for alias, route in self.routes.items():
            for target in route.targets:
                if target.upstream not in served:
                    raise ValueError(f"route {alias!r} names unknown upstream {target.upstream!r}")
                if target.model not in served[target.upstream]:
                    raise ValueError(
                        f"route {alias!r}: upstream {target.upstream!r} does not serve "
                        f"{target.model!r} (it serves {', '.join(served[target.upstream])})"
                    )
            if route.context_fallback and route.context_fallback not in self.routes:
                raise ValueError(
                    f"route {alias!r}: context_fallback {route.context_fallback!r} is not a route"
                )
        if self.default_route and self.default_route not in self.routes:
            raise ValueError(f"default_route {self.default_route!r} is not a route")
        return self


class SessionSettings(_Section):
    #: Where sessions live (threadline.store_urls): empty = `<data_dir>/sessions.db`;
    #: `sqlite:///path/file.db` (or a plain path); `redis://host:port/db` or
    #: `postgresql://user@host:port/db` for several session replicas.
    database: str = ""
    max_message_chars: int = Field(default=32_000, gt=0)
    max_messages_per_append: int = Field(default=64, gt=0)
    #: Sessions idle longer than this are deleted (session.expired); 0 = kept forever.
    ttl_s: float = Field(default=0, ge=0)
    #: Sessions a tenant may keep; creating one more deletes its least recently used.
    max_sessions_per_tenant: int = Field(default=0, ge=0)
    #: How often expiry and orphan cleanup run.
    cleanup_interval_s: float = Field(default=300, gt=0)

    @field_validator("database")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return check_store_url(value, kinds=["sqlite", "redis", "postgresql"])


class MemorySettings(_Section):
    #: `sqlite:///path/file.db` or a plain path (empty means `<data_dir>/memory.db`),
    #: or `postgresql://user@host:port/db`, which replicas share.
    database: str = ""
    #: Model route for summaries and extraction; empty uses the default route.
    model: str = ""
    max_summary_tokens: int = Field(default=256, gt=0)
    #: The window the summarising model's prompt must fit (instructions, summary,
    #: messages and the answer); longer spans are summarised in chunks.
    summary_window_tokens: int = Field(default=4096, gt=0)
    #: Consolidate when a session's unconsolidated tokens pass this fraction of the
    #: context window its turns use; 0 disables.
    consolidate_fraction: float = Field(default=0.5, ge=0, le=1)
    #: Consolidate a session idle this long with new messages since the last run; 0 disables.
    idle_consolidate_s: float = Field(default=600, ge=0)
    #: Extract when the tokens since the extract pointer pass this; 0 disables.
    extract_threshold: int = Field(default=2000, ge=0)
    #: Compact before a turn when the last turn's reported prompt tokens passed this
    #: fraction of the context window; 0 disables.
    compact_threshold: float = Field(default=0.8, ge=0, le=1)
    #: Newest tokens the compacted session keeps verbatim (from at least the last user message).
    compact_retained_tokens: int = Field(default=1024, ge=0)
    #: A job running longer than this fails (and counts towards the failure limit).
    job_timeout_s: float = Field(default=120, gt=0)
    #: Consecutive failures after which consolidation archives the raw text and
    #: compaction is disabled for the session until it changes.
    max_failures: int = Field(default=3, ge=1)
    #: After a consolidation or extraction of a session fails, turns start that kind
    #: for the session again only this much later: a model that cannot write the
    #: summary or the JSON is not asked again (and the span not read again) on every
    #: turn. Explicit requests (Consolidate, Extract) are not held back; 0 = no pause.
    failed_job_pause_s: float = Field(default=300, ge=0)
    #: Consolidation and extraction jobs one replica runs at once (each on a different session).
    workers: int = Field(default=2, ge=1)
    #: Compaction jobs one replica runs at once: workers of their own, so a turn waiting
    #: for a compaction never queues behind background jobs.
    compaction_workers: int = Field(default=2, ge=1)
    #: While turns run (a Recall in the last 5 s), consolidation and extraction rest
    #: after each chunk (1/duty_cycle - 1) times as long as it took (at most 1 s a
    #: rest), so background work gives way to turns. 1 never rests; compaction never rests.
    duty_cycle: float = Field(default=0.1, gt=0, le=1)
    #: How often idle sessions are looked for.
    scan_interval_s: float = Field(default=30, gt=0)
    #: How often a replica asks the session service for deleted sessions whose memory
    #: it has not erased yet (docs/sessions.md, Erasure).
    erasure_poll_s: float = Field(default=5.0, gt=0)
    #: Per-session lease (Redis) while a replica works on it; renewed at a third of this.
    lease_ttl_s: float = Field(default=30, gt=0)
    #: A job delivered to a replica that has not touched it for this long is taken
    #: over by another (the first one died).
    claim_idle_s: float = Field(default=60, gt=0)
    #: Tokens Recall may return (summary plus extracted items) when the caller names none.
    recall_budget_tokens: int = Field(default=512, gt=0)

    @field_validator("database")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return check_store_url(value, kinds=["sqlite", "postgresql"])


class ToolRule(_Section):
    """What the model's tools may do under a path of the session's workspace."""

    #: Relative to the workspace root; "" is the whole workspace.
    path: str = ""
    permission: Literal["read", "write"] = "read"

    @field_validator("path")
    @classmethod
    def _inside(cls, value: str) -> str:
        if value.startswith("/") or ".." in Path(value).parts:
            raise ValueError(f"a rule's path is relative to the workspace, got {value!r}")
        return value


class AgentTypeSettings(_Section):
    """A kind of background task and the runner that does it."""

    #: What it is for: the classifier reads this to choose.
    description: str
    runner: Literal["local", "command"] = "local"
    #: The `command` runner's argv; `{prompt}`, `{workspace}`, `{task_id}` are filled in.
    argv: tuple[str, ...] = ()
    #: Model route for the `local` runner; empty uses the default route.
    model: str = ""
    timeout_s: float = Field(default=600, gt=0)

    @model_validator(mode="after")
    def _argv_for_commands(self) -> AgentTypeSettings:
        if self.runner == "command" and not self.argv:
            raise ValueError("a command agent type needs argv")
        return self


class Price(_Section):
    input_per_1k: float = Field(default=0, ge=0)
    output_per_1k: float = Field(default=0, ge=0)


class TaskSettings(_Section):
    #: Task records: empty = `<data_dir>/tasks.db`; `sqlite:///path/file.db` (or a
    #: plain path), `redis://host:port/db` or `postgresql://user@host:port/db`.
    database: str = ""
    max_concurrency: int = Field(default=2, ge=1)
    max_queue: int = Field(default=100, ge=1)
    agent_types: dict[str, AgentTypeSettings] = {
        "general": AgentTypeSettings(description="An agent that works on files with tools.")
    }
    default_agent_type: str = "general"
    #: Model route for the classifier's one call; empty uses the default route.
    classifier_model: str = ""
    #: Ended tasks (record, output log, workspace) are removed this many seconds after
    #: they ended; 0 keeps them until deleted.
    retention_s: float = Field(default=0, ge=0)
    #: How often each replica sweeps: expired tasks, then task workspaces no stored
    #: task names (deleted through another replica).
    sweep_s: float = Field(default=60, gt=0)

    @field_validator("database")
    @classmethod
    def _store_url(cls, value: str) -> str:
        return check_store_url(value, kinds=["sqlite", "redis", "postgresql"])

    @model_validator(mode="after")
    def _default_known(self) -> TaskSettings:
        if self.default_agent_type not in self.agent_types:
            raise ValueError(
                f"default_agent_type {self.default_agent_type!r} is not one of the agent_types"
            )
        return self


class ExecutorSettings(_Section):
    #: Token budget for the prompt sent to the model (context window minus headroom).
    context_budget_tokens: int = Field(default=4096, gt=0)
    max_output_tokens: int = Field(default=512, gt=0)
    #: Expiry of a turn's session lease (Redis), renewed at a third of it while the
    #: turn runs: a crashed executor's sessions take new turns after at most this long.
    turn_lease_ttl_s: float = Field(default=15.0, ge=3)
    #: Turns one executor replica runs at once; more wait to start, first come first
    #: served, up to `max_queued_turns`; past that a turn is refused RESOURCE_EXHAUSTED.
    #: A streamed turn costs `threadline up` about 1.5 ms of CPU a second
    #: (bench/capacity): 1000 keep one and a half cores busy without starving the
    #: calls still to be accepted, which an overloaded process lets wait until their
    #: connection ages out (CANCELLED). An executor in a process of its own, its
    #: deltas going out over gRPC, spends more per turn: lower it there.
    max_running_turns: int = Field(default=1000, ge=1)
    max_queued_turns: int = Field(default=2000, ge=0)
    #: Offer the built-in tools (read_file, write_file, list_dir, search_text) to the
    #: model. Off by default: the upstream must support tool calls.
    tools_enabled: bool = False
    #: Model requests per turn, tool rounds included.
    max_iterations: int = Field(default=8, ge=1, le=100)
    #: Per-session workspaces live under this directory; empty = `<data_dir>/workspaces`.
    workspace_root: str = ""
    #: How often a replica asks the session service for deleted sessions and removes
    #: their workspaces (docs/sessions.md, Erasure).
    erasure_poll_s: float = Field(default=5.0, gt=0)
    tool_rules: tuple[ToolRule, ...] = (ToolRule(path="", permission="write"),)
    max_file_bytes: int = Field(default=1_000_000, gt=0)
    max_tool_output_chars: int = Field(default=16_000, gt=0)
    tasks: TaskSettings = TaskSettings()
    #: Before each model request inside a tool loop, compact the session (through
    #: memory) when the prompt would pass this fraction of context_budget_tokens; 0
    #: disables. The turn then goes on in the new session.
    compact_request_threshold: float = Field(default=0.0, ge=0, le=1)
    #: Per-model prices for turns and tasks; models not listed cost 0 (local models).
    prices: dict[str, Price] = {}


class ApiKey(_Section):
    """An API key, stored as the SHA-256 hex of the key: config never holds the secret."""

    sha256: str
    tenant: str
    #: Admins see every tenant's lifecycle events.
    admin: bool = False

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str) -> str:
        value = value.lower()
        if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
            raise ValueError("expected the 64-character SHA-256 hex digest of the key")
        return value

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if not value or len(value) > 64 or not value.replace("-", "").replace("_", "").isalnum():
            raise ValueError(f"tenant must be 1-64 letters, digits, - or _: {value!r}")
        return value


def hash_api_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class GatewaySettings(_Section):
    api_keys: tuple[ApiKey, ...] = ()
    max_input_chars: int = Field(default=32_000, gt=0)


class EventSettings(_Section):
    #: Events kept in the Redis stream `<namespace>.events` for replay (approximate cap).
    stream_maxlen: int = Field(default=10_000, gt=0)
    #: Events older than this leave the stream, also on a quiet deployment where the
    #: length cap never trims (an event names its tenant and session); 0 = no age cap.
    stream_max_age_s: float = Field(default=86_400.0, ge=0)
    #: Events buffered while Redis is unreachable; beyond this they are dropped and counted.
    buffer_size: int = Field(default=10_000, gt=0)
    #: Prefix of the event channels and stream on Redis; empty = `threadline` on
    #: database 0, `threadline.db<N>` on database N (channels are server-wide).
    namespace: str = Field(default="", pattern=r"^[A-Za-z0-9_.:-]{0,64}$")


class TracingSettings(_Section):
    """OpenTelemetry tracing (docs/operations.md). Spans are always made, so every log
    line and event carries a trace id and a caller's W3C trace context is joined;
    they leave the process only when an OTLP endpoint is set."""

    #: false: no spans at all (no trace ids in logs and events, a caller's trace is not
    #: joined), for the last bit of per-call CPU (bench/telemetry_overhead.py).
    enabled: bool = True
    #: OTLP/gRPC collector, e.g. http://otel-collector:4317; empty = export nothing.
    otlp_endpoint: str = Field(default="", max_length=512)
    #: Plaintext to the collector (a sidecar or in-cluster collector); false = TLS.
    otlp_insecure: bool = True
    #: Share of new traces kept; a caller's sampling decision is always followed.
    sample_ratio: float = Field(default=1.0, ge=0, le=1)
    #: service.name of the spans; empty = threadline-<service>, or threadline for `up`.
    service_name: str = Field(default="", max_length=128)


class LocalModelSettings(_Section):
    """The model `threadline up` serves itself when no upstream is configured."""

    #: smollm2-135m (instruction-tuned, the default) or gemma-3-270m (a base model).
    name: LocalModelName = "smollm2-135m"
    #: Port of its llama.cpp server on 127.0.0.1; 0 picks a free one.
    port: int = Field(default=0, ge=0, lt=65536)
    #: Context window the server allocates (tokens).
    n_ctx: int = Field(default=8192, ge=512)


class TlsSettings(_Section):
    """TLS on every gRPC listener and channel (docs/security.md), from PEM files.

    Off by default: `threadline up` serves on localhost. Servers read the files
    again when they change (new connections get the new certificate); clients
    read theirs at start.
    """

    enabled: bool = False
    #: The certificate chain and key this process serves, and presents as a client
    #: under `mutual`.
    cert_file: Path | None = None
    key_file: Path | None = None
    #: CA bundle: clients verify the services' certificates against it (unset: the
    #: system's roots), and under `mutual` internal services verify their callers'.
    ca_file: Path | None = None
    #: Internal services (not the gateway's public listener) require a client
    #: certificate signed by `ca_file`, and clients present `cert_file`.
    mutual: bool = False
    #: The gateway's public listener's own certificate and key; unset = cert_file, key_file.
    gateway_cert_file: Path | None = None
    gateway_key_file: Path | None = None
    #: Name clients check the services' certificates against, instead of each
    #: address's host (for addresses given as IPs).
    server_name: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> TlsSettings:
        for cert, key in (("cert_file", "key_file"), ("gateway_cert_file", "gateway_key_file")):
            if (getattr(self, cert) is None) != (getattr(self, key) is None):
                raise ValueError(f"set both {cert} and {key}, or neither")
        if self.mutual and not (self.enabled and self.ca_file and self.cert_file):
            raise ValueError("mutual needs enabled, ca_file, cert_file and key_file")
        return self


class ServiceAuthSettings(_Section):
    """Who may call the internal services: executor, llm_proxy, session, memory."""

    #: Shared secret every internal call carries and every internal service
    #: requires; unset = none required. Production sets it (docs/security.md);
    #: `threadline up` makes one per data dir.
    token: SecretStr | None = None
    #: A second token accepted (never sent), for rotation without refusals: the new
    #: token until every replica sends it, then the old one until none does.
    accepted_token: SecretStr | None = None
    #: The client certificate names (DNS SAN, else CN) allowed to call this process's
    #: services; empty = any certificate `tls.ca_file` signed. Needs tls.mutual.
    peer_names: tuple[str, ...] = ()

    @field_validator("token", "accepted_token")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("a service token needs at least 16 characters (openssl rand -hex 32)")
        return value


class Settings(BaseSettings):
    """All of threadline's settings. Build with `load_settings`, not `Settings()`."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_nested_delimiter="__", frozen=True, extra="forbid"
    )

    data_dir: Path = Path(".threadline")
    #: Redis for the event bus and cross-replica leases; None means in-process only.
    redis_url: str | None = None
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    #: Interface every service binds; each binds the port of its own address.
    listen_host: str = "127.0.0.1"
    #: Port this process listens on; 0 = the port of its own service's address.
    #: Replicas on one machine each set their own.
    listen_port: int = Field(default=0, ge=0, lt=65536)
    addresses: Addresses = Addresses()
    #: Calls between services this process runs together (`threadline up`) are
    #: served in process, not over loopback gRPC (threadline/in_process.py). Only
    #: with TLS off: with TLS on every call goes over TLS as configured.
    in_process_calls: bool = True
    grace_period_s: float = Field(default=10.0, ge=0)
    #: Connections a process opens at most to PostgreSQL, per store it keeps there.
    postgres_pool_size: int = Field(default=10, ge=1, le=1000)
    #: Port of the Prometheus /metrics endpoint for this process; 0 = none.
    metrics_port: int = Field(default=0, ge=0, lt=65536)
    #: Port of a plaintext listener serving only grpc.health.v1, for probes that
    #: cannot speak TLS (Kubernetes gRPC probes); 0 = none. One service per process.
    health_port: int = Field(default=0, ge=0, lt=65536)
    llm: LlmSettings = LlmSettings()
    session: SessionSettings = SessionSettings()
    memory: MemorySettings = MemorySettings()
    executor: ExecutorSettings = ExecutorSettings()
    gateway: GatewaySettings = GatewaySettings()
    events: EventSettings = EventSettings()
    local_model: LocalModelSettings = LocalModelSettings()
    tls: TlsSettings = TlsSettings()
    service_auth: ServiceAuthSettings = ServiceAuthSettings()
    tracing: TracingSettings = TracingSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # load_settings reads the environment it is given (_EnvSource); the class itself
        # reads none, so load_settings(environ={}) never sees the process's variables.
        return (init_settings,)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value in (None, ""):
            return None
        if not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"expected redis://host:port/db, got {value!r}")
        return value

    def bind_address(self, service: ServiceName) -> str:
        """What `service` listens on: the listen host and listen_port or its address's port."""
        port = self.listen_port or self.addresses.port_of(service)
        if port is None:
            raise ConfigError(
                f"addresses.{service} names replicas on different ports;"
                " set listen_port (THREADLINE_LISTEN_PORT) to the one this process uses"
            )
        return f"{self.listen_host}:{port}"

    def store_url(self, store: Literal["session", "memory", "tasks"]) -> StoreUrl:
        """Where a store lives: its setting, parsed, or its default file under data_dir."""
        configured, default = {
            "session": (self.session.database, "sessions.db"),
            "memory": (self.memory.database, "memory.db"),
            "tasks": (self.executor.tasks.database, "tasks.db"),
        }[store]
        if not configured:
            return SqliteUrl(self.data_dir / default)
        url = parse_store_url(configured)
        if isinstance(url, PostgresUrl):
            return dataclasses.replace(url, pool_size=self.postgres_pool_size)
        return url

    def sqlite_path(self, store: Literal["session", "memory", "tasks"]) -> Path:
        """The file of a store configured for SQLite (ValueError for another backend)."""
        url = self.store_url(store)
        if not isinstance(url, SqliteUrl):
            raise ValueError(f"the {store} store is not configured for SQLite: {url}")
        return url.path


class _EnvSource(EnvSettingsSource):
    """Reads a given mapping instead of `os.environ`."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(Settings, case_sensitive=False)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return {k.lower(): v for k, v in self._environ.items()}


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _deep_merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _env_name(loc: tuple[int | str, ...]) -> str:
    """The variable that sets `loc`; inside a list that is the list's own (JSON) variable."""
    parts: list[str] = []
    for part in loc:
        if not isinstance(part, str):
            break
        parts.append(part.upper())
    return ENV_PREFIX + "__".join(parts)


def _unparseable_json(environ: Mapping[str, str]) -> list[str]:
    names = []
    for name, value in environ.items():
        if name.upper().startswith(ENV_PREFIX) and value.lstrip()[:1] in ("[", "{"):
            try:
                json.loads(value)
            except ValueError:
                names.append(name)
    return sorted(names)


def _with_upstream_keys(data: dict[str, Any], environ: Mapping[str, str]) -> dict[str, Any]:
    """`data` with each upstream's API key, read from the variable its `api_key_env` names.

    A missing variable is not an error here: every service loads the same settings
    and only llm_proxy is given the key (it refuses to start without it). A variable
    set to the empty string is a key of "": the upstream needs none.
    """
    llm = data.get("llm")
    if not isinstance(llm, Mapping):
        return data

    def keyed(upstream: object) -> object:
        if not isinstance(upstream, Mapping) or "api_key" in upstream:
            return upstream  # left for validation to reject
        name = upstream.get("api_key_env")
        key = environ.get(name) if isinstance(name, str) and name else None
        return {**upstream, "api_key": SecretStr(key)} if key is not None else upstream

    llm = dict(llm)
    if "upstream" in llm:
        llm["upstream"] = keyed(llm["upstream"])
    if isinstance(llm.get("upstreams"), list | tuple):
        llm["upstreams"] = [keyed(u) for u in llm["upstreams"]]
    return {**data, "llm": llm}


#: THREADLINE_ variables that are not settings but are read by name.
_NOT_SETTINGS = frozenset({"THREADLINE_CONFIG"})


def unknown_variables(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """THREADLINE_* variables that set nothing (a misspelt top-level name is otherwise
    ignored silently; a misspelt nested one is already an error), sorted.

    Variables an upstream's `api_key_env` names are known: they hold its key.
    """
    environ = os.environ if environ is None else environ
    keys = {u.api_key_env.upper() for u in settings.llm.all_upstreams if u.api_key_env}
    unknown = []
    for name in environ:
        upper = name.upper()
        if not upper.startswith(ENV_PREFIX) or upper in _NOT_SETTINGS or upper in keys:
            continue
        field = upper[len(ENV_PREFIX) :].split("__", 1)[0].lower()
        if field not in Settings.model_fields:
            unknown.append(name)
    return sorted(unknown)


def load_settings(
    environ: Mapping[str, str] | None = None,
    config_file: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Environment over YAML file over defaults; `overrides` (CLI flags) win over all."""
    environ = os.environ if environ is None else environ
    path = config_file or (
        Path(environ["THREADLINE_CONFIG"]) if environ.get("THREADLINE_CONFIG") else None
    )
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path} must hold a mapping at the top level")
        data = loaded
    try:
        env_data = {k: v for k, v in _EnvSource(environ)().items() if v is not None}
    except Exception as exc:  # pydantic-settings raises SettingsError on bad JSON values
        bad = _unparseable_json(environ)
        if bad:
            raise ConfigError(
                f"invalid configuration: {', '.join(bad)} must hold valid JSON"
            ) from None
        raise ConfigError(f"invalid configuration in the environment: {exc}") from exc
    data = _with_upstream_keys(_deep_merge(_deep_merge(data, env_data), overrides or {}), environ)
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = [
            f"  {'.'.join(str(p) for p in err['loc'])} ({_env_name(err['loc'])}): {err['msg']}"
            for err in exc.errors()
        ]
        raise ConfigError("invalid configuration:\n" + "\n".join(problems)) from None
