"""The `threadline` command: run the stack or one service, chat, tail events."""

from __future__ import annotations

import asyncio
import importlib.metadata
import json
import os
import secrets
import shlex
import shutil
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, NamedTuple

import grpc
import typer
from google.protobuf import json_format
from pydantic import SecretStr
from rich.console import Console

from threadline import errors
from threadline.answer_display import AnswerDisplay
from threadline.client import GatewayClient
from threadline.config import (
    SERVICE_NAMES,
    ApiKey,
    ConfigError,
    ServiceName,
    Settings,
    hash_api_key,
    load_settings,
    unknown_variables,
)
from threadline.events import attributes_of
from threadline.events import to_json as events_json
from threadline.logs import configure_logging, get_logger
from threadline.server import on_signal_during, wait_for_shutdown_signal
from threadline.startup_errors import describe
from threadline.tls import PemFile, channel_credentials
from threadline.v1 import executor_pb2

app = typer.Typer(
    help="threadline: LLM agent conversations on self-hosted model servers.", no_args_is_help=True
)
events_app = typer.Typer(help="Lifecycle events.", no_args_is_help=True)
keys_app = typer.Typer(help="API keys.", no_args_is_help=True)
tasks_app = typer.Typer(help="Background tasks.", no_args_is_help=True)
app.add_typer(tasks_app, name="tasks")
app.add_typer(events_app, name="events")
app.add_typer(keys_app, name="keys")
# soft_wrap: printed commands and paths must stay on one line to be copied as they are.
err = Console(stderr=True, soft_wrap=True)
log = get_logger("threadline.cli")

ConfigOption = Annotated[
    Path | None, typer.Option("--config", "-c", help="YAML config file (or THREADLINE_CONFIG).")
]
DEV_KEY_FILE = "dev-api-key"
SERVICE_TOKEN_FILE = "service-token"


def _print_version(value: bool) -> None:
    if value:
        print(f"threadline {importlib.metadata.version('threadline')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """threadline: LLM agent conversations on self-hosted model servers."""


DEV_TENANT = "dev"


def fail(message: str) -> None:
    """Print an error as plain text: user input in it must never be read as markup."""
    err.print(message, style="red", markup=False, highlight=False)


def _settings(config: Path | None, overrides: dict[str, Any] | None = None) -> Settings:
    try:
        return load_settings(config_file=config, overrides=overrides)
    except ConfigError as exc:
        fail(f"{exc}")
        raise typer.Exit(2) from None


def _local_secret(path: Path, prefix: str) -> str:
    """A random secret kept in `path` (owner-only), made on first use."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    secret = prefix + secrets.token_urlsafe(24)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(secret + "\n")
    return secret


def _dev_api_key(data_dir: Path) -> str:
    """A key for the local tenant 'dev', kept in the data dir so `chat` finds it."""
    return _local_secret(data_dir / DEV_KEY_FILE, "tl-dev-")


def _with_service_token(settings: Settings) -> Settings:
    """`settings` with a service token: the configured one, or one kept in the data dir.

    Other users of this machine can reach the internal ports on localhost; the token
    keeps them from reading every tenant's sessions there.
    """
    if settings.service_auth.token is not None:
        return settings
    token = SecretStr(_local_secret(settings.data_dir / SERVICE_TOKEN_FILE, "tl-svc-"))
    auth = settings.service_auth.model_copy(update={"token": token})
    return settings.model_copy(update={"service_auth": auth})


@app.command()
def up(
    config: ConfigOption = None,
    data_dir: Annotated[Path | None, typer.Option(help="Where SQLite files and logs live.")] = None,
    redis_url: Annotated[
        str | None, typer.Option(help="Redis for events and leases (default: in-process).")
    ] = None,
    local_model: Annotated[
        str | None,
        typer.Option(help="Bundled model to serve with no upstream: smollm2-135m, gemma-3-270m."),
    ] = None,
    needs_local_model: Annotated[
        bool,
        typer.Option(
            "--needs-local-model",
            help="Start nothing; exit 0 if this configuration would start the bundled "
            "local model (no upstream configured), 1 if not.",
        ),
    ] = False,
) -> None:
    """Run all five services in one process; start the bundled local model if no upstream."""
    overrides: dict[str, Any] = {}
    if data_dir is not None:
        overrides["data_dir"] = str(data_dir)
    if redis_url is not None:
        overrides["redis_url"] = redis_url
    if local_model is not None:
        overrides["local_model"] = {"name": local_model}
    settings = _settings(config, overrides)
    if needs_local_model:
        raise typer.Exit(1 if settings.llm.all_upstreams else 0)
    configure_logging(settings.log_level)
    _warn_unknown_variables(settings)
    _run(_up(settings), settings, "up")


def _warn_unknown_variables(settings: Settings) -> None:
    for name in unknown_variables(settings):
        log.warning(
            "config.unknown_variable",
            variable=name,
            note="sets nothing: a misspelt setting? (docs/configuration.md lists them)",
        )


def _run(main: Coroutine[Any, Any, None], settings: Settings, command: str) -> None:
    """Run `main`; a failure to start (a port taken, a data dir not writable, a domain
    error) is one JSON line naming the problem and exit status 1, not a traceback."""
    try:
        asyncio.run(main)
    except Exception as exc:
        fields = describe(exc, settings.data_dir)
        if fields is None:
            raise
        log.error("startup.failed", command=command, **fields)
        raise typer.Exit(1) from None


async def _up(settings: Settings) -> None:
    from threadline.local_model import LOCAL_MODELS, LocalModelServer
    from threadline.stack import start_stack

    began = time.perf_counter()
    local: LocalModelServer | None = None
    if not settings.llm.all_upstreams:
        model = LOCAL_MODELS[settings.local_model.name]
        local = LocalModelServer(
            settings.data_dir,
            model=model,
            port=settings.local_model.port,
            n_ctx=settings.local_model.n_ctx,
        )
        err.print(f"no upstream configured: starting the bundled local model ({model.title})...")
        await local.start()
        settings = settings.model_copy(
            update={"llm": settings.llm.model_copy(update={"upstream": local.upstream()})}
        )
    key_note = ""
    if not settings.gateway.api_keys:
        key = _dev_api_key(settings.data_dir)
        dev = ApiKey(sha256=hash_api_key(key), tenant=DEV_TENANT)
        settings = settings.model_copy(
            update={"gateway": settings.gateway.model_copy(update={"api_keys": (dev,)})}
        )
        key_note = f" (dev API key in {settings.data_dir / DEV_KEY_FILE})"
    settings = _with_service_token(settings)
    try:
        stack = await start_stack(settings)
        err.print(
            f"[green]threadline is up[/green] in {time.perf_counter() - began:.1f}s: "
            f"gateway at {settings.addresses.gateway}{key_note}\n"
            f"chat with:  {_chat_hint(settings)}\n"
            "stop with Ctrl-C",
            highlight=False,
        )
        await wait_for_shutdown_signal()
        with on_signal_during(stack.hurry):
            await stack.stop()
    finally:
        if local is not None:
            await local.stop()


def _chat_hint(settings: Settings) -> str:
    """A `chat` command that works as printed, from any directory."""
    program = Path(sys.argv[0])
    on_path = shutil.which(program.name)
    if on_path is not None and Path(on_path).resolve() == program.resolve():
        command = program.name
    else:
        command = str(program.resolve())
    data_dir = settings.data_dir.resolve()
    # `chat` reads TLS settings from the environment only: name them on its command line.
    tls = settings.tls
    env = ["env", "THREADLINE_TLS__ENABLED=true"] if tls.enabled else []
    if tls.enabled and tls.ca_file:
        env.append(f"THREADLINE_TLS__CA_FILE={tls.ca_file.resolve()}")
    return shlex.join(
        [
            *env,
            command,
            "chat",
            "--address",
            settings.addresses.gateway,
            "--data-dir",
            str(data_dir),
        ]
    )


@app.command()
def serve(
    service: Annotated[str, typer.Argument(help=f"One of: {', '.join(SERVICE_NAMES)}")],
    config: ConfigOption = None,
) -> None:
    """Run one service in this process (peers' addresses come from config)."""
    if service not in SERVICE_NAMES:
        fail(f"unknown service {service!r}: expected one of {', '.join(SERVICE_NAMES)}")
        raise typer.Exit(2)
    settings = _settings(config)
    configure_logging(settings.log_level)
    _warn_unknown_variables(settings)
    name: ServiceName = service
    _run(_serve(settings, name), settings, f"serve {service}")


async def _serve(settings: Settings, service: ServiceName) -> None:
    from threadline.stack import start_stack

    stack = await start_stack(settings, services=[service])
    await wait_for_shutdown_signal()
    with on_signal_during(stack.hurry):
        await stack.stop()


class _Target(NamedTuple):
    """A gateway and how to call it."""

    address: str
    api_key: str
    #: TLS credentials when the settings enable TLS (tls.ca_file verifies the gateway).
    credentials: grpc.ChannelCredentials | None


def _client(target: _Target) -> GatewayClient:
    return GatewayClient(target.address, api_key=target.api_key, credentials=target.credentials)


def _credentials(settings: Settings) -> grpc.ChannelCredentials | None:
    if not settings.tls.enabled:
        return None
    ca = PemFile(settings.tls.ca_file, "tls.ca_file") if settings.tls.ca_file else None
    try:
        return channel_credentials(ca)
    except errors.ThreadlineError as exc:
        fail(exc.message)
        raise typer.Exit(2) from None


def _gateway(address: str | None, api_key: str | None, data_dir: Path | None) -> _Target:
    """Gateway address, API key and TLS credentials from flags, environment or the dev key file."""
    settings = _settings(None)
    key = api_key or os.environ.get("THREADLINE_API_KEY")
    if not key:
        path = (data_dir or settings.data_dir) / DEV_KEY_FILE
        if not path.exists():
            fail(
                "no API key: pass --api-key, set THREADLINE_API_KEY, or run `threadline up` "
                "(it writes a dev key)"
            )
            raise typer.Exit(2)
        key = path.read_text().strip()
    return _Target(address or settings.addresses.gateway, key, _credentials(settings))


AddressOption = Annotated[str | None, typer.Option(help="Gateway host:port.")]
ApiKeyOption = Annotated[str | None, typer.Option(help="API key (or THREADLINE_API_KEY).")]
DataDirOption = Annotated[Path | None, typer.Option(help="Data dir holding the dev API key.")]


@app.command()
def chat(
    session: Annotated[str | None, typer.Option(help="Continue this session.")] = None,
    message: Annotated[
        str | None, typer.Option("--message", "-m", help="Send one message and exit.")
    ] = None,
    system: Annotated[str, typer.Option(help="System prompt for a new session.")] = "",
    max_tokens: Annotated[int, typer.Option(help="Answer length limit (0: server default).")] = 0,
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Talk to a session through the gateway; answers stream as they arrive."""
    target = _gateway(address, api_key, data_dir)
    try:
        asyncio.run(_chat(target, session, message, system, max_tokens))
    except errors.ThreadlineError as exc:
        fail(f"{exc.code}: {exc.message}")
        raise typer.Exit(1) from None


async def _chat(
    target: _Target,
    session_id: str | None,
    message: str | None,
    system: str,
    max_tokens: int,
) -> None:
    # The channel must be made inside the running loop it will be used on.
    async with _client(target) as client:
        if session_id is None:
            session_id = (await client.create_session(system_prompt=system)).id
        err.print(f"session {session_id}")
        while True:
            if message is not None:
                text = message
            else:
                try:
                    text = await asyncio.to_thread(input, "you> ")
                except EOFError:
                    return
                if not text.strip():
                    continue
            await _turn(client, session_id, text, max_tokens)
            if message is not None:
                return


async def _turn(client: GatewayClient, session_id: str, text: str, max_tokens: int) -> None:
    answer = AnswerDisplay(sys.stdout)
    async for event in client.converse(session_id, text, max_tokens=max_tokens):
        kind = event.WhichOneof("event")
        if kind == "delta":
            answer.write(event.delta)
        elif kind == "rollback":
            # The answer restarts on another model server: redraw it from the start.
            answer.rollback()
            rollback = event.rollback
            err.print(
                f"[answer restarted on {rollback.upstream}: {rollback.error}]",
                style="dim",
                markup=False,
            )
        elif kind == "done":
            answer.end()
            done = event.done
            note = f"[{done.latency_ms} ms, {done.usage.completion_tokens} tokens, {done.model}]"
            if done.error:
                note += f" interrupted: {done.error}"
            err.print(note, style="dim", markup=False)


@events_app.command("tail")
def events_tail(
    type_: Annotated[
        list[str] | None, typer.Option("--type", help="Glob on the event type, e.g. 'turn.*'.")
    ] = None,
    session: Annotated[str | None, typer.Option(help="Only this session's events.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Print lifecycle events live, as they happen."""
    target = _gateway(address, api_key, data_dir)
    try:
        asyncio.run(_tail(target, type_ or [], session or "", as_json))
    except errors.ThreadlineError as exc:
        fail(f"{exc.code}: {exc.message}")
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        pass


async def _tail(target: _Target, types: list[str], session_id: str, as_json: bool) -> None:
    out = Console()
    async with _client(target) as client:
        async for event in client.watch_events(types=types, session_id=session_id):
            if as_json:
                # Integer attributes as integers, as on the Redis stream.
                print(events_json(event), flush=True)
                continue
            attrs = attributes_of(event)
            when = event.time.ToDatetime().strftime("%H:%M:%S.%f")[:-3]
            out.print(
                f"{when} [bold]{event.type}[/bold] {event.service} "
                f"{event.session_id or '-'} {json.dumps(attrs, separators=(',', ':'))}",
                highlight=False,
            )


def _task_line(task: executor_pb2.Task) -> str:
    cost = f" ${task.cost:.4f}" if task.cost else ""
    return (
        f"{task.id}  {task.status:<9} {task.agent_type:<12} {task.runner:<7} "
        f"in={task.tokens_in} out={task.tokens_out}{cost} {task.duration_ms} ms  "
        f"{task.reason[:60]}"
    )


def _tasks(action: Callable[[GatewayClient], Awaitable[None]], target: _Target) -> None:
    async def run() -> None:
        async with _client(target) as client:
            await action(client)

    try:
        asyncio.run(run())
    except errors.ThreadlineError as exc:
        fail(f"{exc.code}: {exc.message}")
        raise typer.Exit(1) from None


@tasks_app.command("submit")
def tasks_submit(
    prompt: Annotated[str, typer.Argument(help="What the task should do.")],
    agent_type: Annotated[str, typer.Option(help="Empty: the classifier chooses.")] = "",
    workspace: Annotated[str, typer.Option(help="Workspace directory name.")] = "",
    budget: Annotated[int, typer.Option(help="Token budget (0: unlimited).")] = 0,
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Queue a background task and print its id."""

    async def action(client: GatewayClient) -> None:
        task = await client.submit_task(
            prompt, agent_type=agent_type, workspace=workspace, budget_tokens=budget
        )
        print(_task_line(task))

    _tasks(action, _gateway(address, api_key, data_dir))


@tasks_app.command("list")
def tasks_list(
    status: Annotated[str, typer.Option(help="Only tasks in this status.")] = "",
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Your tenant's tasks, newest first."""

    async def action(client: GatewayClient) -> None:
        for task in (await client.list_tasks(status=status)).tasks:
            print(_task_line(task))

    _tasks(action, _gateway(address, api_key, data_dir))


@tasks_app.command("get")
def tasks_get(
    task_id: Annotated[str, typer.Argument()],
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """One task's record as JSON."""

    async def action(client: GatewayClient) -> None:
        task = await client.get_task(task_id)
        print(json_format.MessageToJson(task, preserving_proto_field_name=True))

    _tasks(action, _gateway(address, api_key, data_dir))


@tasks_app.command("cancel")
def tasks_cancel(
    task_id: Annotated[str, typer.Argument()],
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Cancel a queued or running task (a command runner's whole process group is stopped)."""

    async def action(client: GatewayClient) -> None:
        print(_task_line(await client.cancel_task(task_id)))

    _tasks(action, _gateway(address, api_key, data_dir))


@tasks_app.command("delete")
def tasks_delete(
    task_id: Annotated[str, typer.Argument()],
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Delete a task: its record, output log and workspace (a running task is cancelled
    first)."""

    async def action(client: GatewayClient) -> None:
        deleted = await client.delete_task(task_id)
        print(
            f"{task_id} deleted: {deleted.log_lines} log lines, "
            f"{deleted.workspaces} workspace directories"
        )

    _tasks(action, _gateway(address, api_key, data_dir))


@tasks_app.command("logs")
def tasks_logs(
    task_id: Annotated[str, typer.Argument()],
    address: AddressOption = None,
    api_key: ApiKeyOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """The task's output log as stream-json lines; follows a running task to its end."""

    async def action(client: GatewayClient) -> None:
        async for entry in client.watch_task(task_id):
            print(entry.json, flush=True)

    _tasks(action, _gateway(address, api_key, data_dir))


@keys_app.command("hash")
def keys_hash(key: Annotated[str, typer.Argument(help="The API key to hash.")]) -> None:
    """Print the SHA-256 digest to put in gateway.api_keys (config never holds the key)."""
    print(hash_api_key(key))


@keys_app.command("new")
def keys_new(tenant: Annotated[str, typer.Argument(help="Tenant the key belongs to.")]) -> None:
    """Make a new random key and print it with its config entry."""
    try:
        entry = ApiKey(sha256=hash_api_key("probe"), tenant=tenant)
    except ValueError as exc:
        fail(f"invalid tenant {tenant!r}: {exc}")
        raise typer.Exit(2) from None
    key = "tl-" + secrets.token_urlsafe(32)
    entry = entry.model_copy(update={"sha256": hash_api_key(key)})
    # JSON is also YAML: the entry pastes into a config file or THREADLINE_GATEWAY__API_KEYS.
    print(f"key:    {key}")
    print(f"config: {json.dumps(entry.model_dump())}")


if __name__ == "__main__":
    app()
