"""Transport security as callers and attackers see it: TLS and mutual TLS on every
listener, the service token on the internal ports, the plaintext probe listener, and
certificates rotated under a running server."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from tests.certificates import CertificateAuthority, Issued
from tests.conftest import ACME_KEY, make_settings
from tests.ports import free_ports
from tests.processes import start_service, threadline_environ, wait_healthy
from tests.waiting import eventually
from threadline import errors
from threadline.channels import ChannelSecurity, connect, unary
from threadline.client import GatewayClient
from threadline.config import SERVICE_NAMES, ServiceName, Settings
from threadline.peers import ExecutorClient, LlmClient, MemoryClient, SessionClient
from threadline.stack import Stack, start_stack
from threadline.testing.fake_upstream import FakeUpstream, Script
from threadline.v1 import common_pb2, llm_pb2, session_pb2, session_pb2_grpc

#: The name the stack's own certificate carries (every service in one process shares it).
INTERNAL = "threadline-internal"
TOKEN = "service-token-" + "x" * 24
OLD_TOKEN = "service-token-" + "o" * 24
SERVING: int = health_pb2.HealthCheckResponse.SERVING


@dataclass(frozen=True)
class Pki:
    ca: CertificateAuthority
    #: The stack's certificate: served, and presented as a client under mutual TLS.
    internal: Issued
    #: Signed by the same CA for a program that is not a threadline service.
    outsider: Issued
    #: A CA the stack does not trust, and a certificate it signed.
    other_ca: CertificateAuthority
    stranger: Issued


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = CertificateAuthority(tmp_path_factory.mktemp("ca"), "threadline test CA")
    other = CertificateAuthority(tmp_path_factory.mktemp("other-ca"), "someone else's CA")
    return Pki(
        ca=ca,
        internal=ca.issue(INTERNAL, dns=[INTERNAL, "localhost"], ips=["127.0.0.1"]),
        outsider=ca.issue("reports-app", dns=["reports-app"]),
        other_ca=other,
        stranger=other.issue(INTERNAL, dns=[INTERNAL, "localhost"], ips=["127.0.0.1"]),
    )


def tls(pki: Pki, *, mutual: bool = False, **files: Path) -> dict[str, Any]:
    """The `tls` settings section for the stack's own certificate (or `files`)."""
    section: dict[str, Any] = {
        "enabled": True,
        "cert_file": str(pki.internal.cert),
        "key_file": str(pki.internal.key),
        "ca_file": str(pki.ca.cert),
        "mutual": mutual,
    }
    section.update({name: str(path) for name, path in files.items()})
    return section


def client_tls(
    ca: Path, cert: Issued | None = None, *, token: str | None = None
) -> ChannelSecurity:
    """A test client's channel: trusts `ca`, presents `cert` when given."""
    chain, key = cert.read() if cert else (None, None)
    credentials = grpc.ssl_channel_credentials(ca.read_bytes(), key, chain)
    return ChannelSecurity(credentials, token=token)


@contextlib.asynccontextmanager
async def running(
    settings: Settings, services: Sequence[ServiceName] = SERVICE_NAMES
) -> AsyncIterator[Stack]:
    stack = await start_stack(settings, services=services, ephemeral_ports=True)
    try:
        yield stack
    finally:
        await stack.stop(1.0)


async def health(address: str, security: ChannelSecurity | None = None, service: str = "") -> int:
    """The health status a probe gets (raises the domain error when the call fails)."""
    channel = connect(address, security)
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        reply = await unary(stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5))
        return int(reply.status)
    finally:
        await channel.close()


async def session_list(address: str, security: ChannelSecurity | None = None) -> list[str]:
    """What a caller of the session port learns about tenant acme's sessions."""
    client = SessionClient(address, security)
    try:
        return [s.id for s in (await client.list("acme")).sessions]
    finally:
        await client.close()


async def converse(gateway: GatewayClient, text: str) -> tuple[str, str]:
    """A new session with one turn: its id and the answer."""
    session = await gateway.create_session()
    events = [e async for e in gateway.converse(session.id, text)]
    return session.id, "".join(e.delta for e in events if e.WhichOneof("event") == "delta")


def gateway_client(stack: Stack, pki: Pki) -> GatewayClient:
    """A client of the public API: it trusts the CA and shows only its API key."""
    credentials = grpc.ssl_channel_credentials(pki.ca.cert.read_bytes())
    return GatewayClient(stack.address("gateway"), api_key=ACME_KEY, credentials=credentials)


@pytest.mark.parametrize("mutual", [False, True], ids=["tls", "mutual-tls"])
async def test_a_turn_crosses_every_service_over_tls(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki, mutual: bool
) -> None:
    fake_upstream.default = Script(text="Hello over TLS.")
    settings = make_settings(tmp_path, fake_upstream.base_url, tls=tls(pki, mutual=mutual))

    async with running(settings) as stack, gateway_client(stack, pki) as gateway:
        session_id, answer = await converse(gateway, "Hi!")
        detail = await gateway.get_session(session_id, verify_chain=True)

    assert answer == "Hello over TLS."
    assert detail.chain_verified
    assert [(m.role, m.content) for m in detail.messages] == [
        (common_pb2.ROLE_USER, "Hi!"),
        (common_pb2.ROLE_ASSISTANT, "Hello over TLS."),
    ]


async def test_plaintext_and_untrusting_callers_get_nothing_from_tls_ports(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    settings = make_settings(tmp_path, fake_upstream.base_url, tls=tls(pki))
    async with running(settings) as stack:
        async with gateway_client(stack, pki) as gateway:
            await gateway.create_session()
        for service in SERVICE_NAMES:
            with pytest.raises(errors.Unavailable):
                await health(stack.address(service))
        with pytest.raises(errors.Unavailable):
            await session_list(stack.address("session"))
        # A client checks the server's certificate: one signed by a CA it does not
        # trust (here: the stack's, to a client trusting another CA) is refused.
        with pytest.raises(errors.Unavailable):
            await session_list(stack.address("session"), client_tls(pki.other_ca.cert))
        assert len(await session_list(stack.address("session"), client_tls(pki.ca.cert))) == 1


async def test_mutual_tls_admits_only_certificates_the_ca_signed(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    settings = make_settings(tmp_path, fake_upstream.base_url, tls=tls(pki, mutual=True))
    async with running(settings) as stack:
        async with gateway_client(stack, pki) as gateway:
            created = (await gateway.create_session()).id
        session = stack.address("session")

        with pytest.raises(errors.Unavailable):
            await session_list(session, client_tls(pki.ca.cert))
        with pytest.raises(errors.Unavailable):
            await session_list(session, client_tls(pki.ca.cert, pki.stranger))
        # Without peer_names, the CA is the identity: any certificate it signed gets in.
        assert await session_list(session, client_tls(pki.ca.cert, pki.outsider)) == [created]


async def test_peer_names_keep_other_certificates_of_the_ca_out(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    fake_upstream.default = Script(text="Still here.")
    settings = make_settings(
        tmp_path,
        fake_upstream.base_url,
        tls=tls(pki, mutual=True),
        service_auth={"peer_names": [INTERNAL]},
    )
    async with running(settings) as stack:
        async with gateway_client(stack, pki) as gateway:
            session_id, answer = await converse(gateway, "Hi!")
        session = stack.address("session")

        with pytest.raises(errors.PermissionDenied) as refused:
            await session_list(session, client_tls(pki.ca.cert, pki.outsider))
        assert await session_list(session, client_tls(pki.ca.cert, pki.internal)) == [session_id]

    assert answer == "Still here."
    assert "reports-app" in refused.value.message
    assert "service_auth.peer_names" in refused.value.message


async def _refusal(call: Any) -> errors.ThreadlineError:
    with pytest.raises(errors.ThreadlineError) as refused:
        await call
    return refused.value


async def test_the_service_token_guards_every_internal_port(
    tmp_path: Path, fake_upstream: FakeUpstream
) -> None:
    fake_upstream.default = Script(text="Authenticated.")
    settings = make_settings(
        tmp_path,
        fake_upstream.base_url,
        service_auth={"token": TOKEN, "accepted_token": OLD_TOKEN},
    )
    async with running(settings) as stack:
        # The public API is unchanged: an API key, no service token.
        async with GatewayClient(stack.address("gateway"), api_key=ACME_KEY) as gateway:
            session_id, answer = await converse(gateway, "Hi!")
        clients = (
            SessionClient(stack.address("session")),
            MemoryClient(stack.address("memory")),
            ExecutorClient(stack.address("executor")),
            LlmClient(stack.address("llm_proxy")),
        )
        sessions, memory, executor, llm = clients
        chat = llm_pb2.ChatRequest(
            messages=[common_pb2.Message(role=common_pb2.ROLE_USER, content="leak?")]
        )
        refusals = [
            await _refusal(sessions.list("acme")),
            await _refusal(memory.recall("acme", session_id)),
            await _refusal(executor.list_tasks("acme")),
            await _refusal(llm.chat(chat)),
        ]
        for client in clients:
            await client.close()
        wrong = await _refusal(
            session_list(stack.address("session"), ChannelSecurity(token="x" * len(TOKEN)))
        )
        current = await session_list(stack.address("session"), ChannelSecurity(token=TOKEN))
        accepted = await session_list(stack.address("session"), ChannelSecurity(token=OLD_TOKEN))
        probe = await health(stack.address("session"), service="threadline.v1.Sessions")

    assert answer == "Authenticated."
    for refusal in refusals:
        assert isinstance(refusal, errors.Unauthenticated)
        assert "missing service token" in refusal.message
        assert "x-threadline-service-token" in refusal.message
    assert isinstance(wrong, errors.Unauthenticated) and "wrong service token" in wrong.message
    assert current == accepted == [session_id]
    assert probe == SERVING
    # The refused model call never reached the model.
    assert len(fake_upstream.chat_requests()) == 1


async def test_probes_get_health_on_a_plaintext_port_and_nothing_else(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    (health_port,) = free_ports(1)
    settings = make_settings(
        tmp_path,
        fake_upstream.base_url,
        tls=tls(pki, mutual=True),
        service_auth={"token": TOKEN},
        health_port=health_port,
    )
    probe_address = f"127.0.0.1:{health_port}"
    async with running(settings, services=["session"]) as stack:
        session = stack.address("session")
        on_probe_port = await health(probe_address, service="threadline.v1.Sessions")
        async with grpc.aio.insecure_channel(probe_address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as not_there:
                request = session_pb2.SessionsListRequest(tenant="acme")
                await session_pb2_grpc.SessionsStub(channel).List(request, timeout=5)
        # On the service's own port, health needs the client certificate (TLS) but no token.
        on_service_port = await health(session, client_tls(pki.ca.cert, pki.internal))
        without_token = await _refusal(session_list(session, client_tls(pki.ca.cert, pki.internal)))

    assert on_probe_port == SERVING
    assert not_there.value.code() == grpc.StatusCode.UNIMPLEMENTED
    assert on_service_port == SERVING
    assert isinstance(without_token, errors.Unauthenticated)
    with pytest.raises(errors.Unavailable):
        await health(probe_address)


async def test_a_rotated_server_certificate_reaches_new_connections(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    pki.internal.install(cert, key)
    new_ca = CertificateAuthority(tmp_path / "new-ca", "the next CA")
    renewed = new_ca.issue(INTERNAL, dns=["localhost"], ips=["127.0.0.1"])
    settings = make_settings(
        tmp_path, fake_upstream.base_url, tls=tls(pki, cert_file=cert, key_file=key)
    )
    async with running(settings, services=["session"]) as stack:
        address = stack.address("session")
        held = SessionClient(address, client_tls(pki.ca.cert))
        await held.list("acme")
        with pytest.raises(errors.Unavailable):
            await health(address, client_tls(new_ca.cert))

        # Half a rotation (the new certificate beside the old key) is not served.
        Issued(renewed.cert, pki.internal.key).install(cert, key)
        assert await health(address, client_tls(pki.ca.cert)) == SERVING

        renewed.install(cert, key)

        async def trusted_by_the_new_ca() -> bool:
            with contextlib.suppress(errors.Unavailable):
                return await health(address, client_tls(new_ca.cert)) == SERVING
            return False

        assert await eventually(trusted_by_the_new_ca)
        with pytest.raises(errors.Unavailable):
            await health(address, client_tls(pki.ca.cert))
        # A connection made before the rotation goes on with the certificate it checked.
        await held.list("acme")
        await held.close()


async def test_a_rotated_ca_bundle_admits_the_new_client_certificates(
    tmp_path: Path, fake_upstream: FakeUpstream, pki: Pki
) -> None:
    bundle = tmp_path / "ca-bundle.pem"
    bundle.write_bytes(pki.ca.cert.read_bytes())
    new_ca = CertificateAuthority(tmp_path / "new-ca", "the next CA")
    newcomer = new_ca.issue("executor", dns=["executor"])
    settings = make_settings(
        tmp_path, fake_upstream.base_url, tls=tls(pki, mutual=True, ca_file=bundle)
    )
    async with running(settings, services=["session"]) as stack:
        address = stack.address("session")
        # The client still checks the server against the old CA; it presents a new one's.
        with pytest.raises(errors.Unavailable):
            await session_list(address, client_tls(pki.ca.cert, newcomer))

        staged = tmp_path / "ca-bundle.new"
        staged.write_bytes(pki.ca.cert.read_bytes() + new_ca.cert.read_bytes())
        staged.replace(bundle)

        async def admitted() -> bool:
            with contextlib.suppress(errors.Unavailable):
                return await session_list(address, client_tls(pki.ca.cert, newcomer)) == []
            return False

        assert await eventually(admitted)


async def test_a_pod_configured_like_the_tls_component_serves_mtls_and_probes(
    tmp_path: Path, pki: Pki
) -> None:
    """`threadline serve session` with the variables deploy/k8s/components/tls and
    base/config.env set: the probe port answers in plaintext, the service port only
    to a certificate and the token."""
    port, health_port = free_ports(2)
    env = threadline_environ(
        THREADLINE_DATA_DIR=str(tmp_path / "data"),
        THREADLINE_LOG_LEVEL="warning",
        THREADLINE_ADDRESSES__SESSION=f"127.0.0.1:{port}",
        THREADLINE_HEALTH_PORT=str(health_port),
        THREADLINE_SERVICE_AUTH__TOKEN=TOKEN,
        THREADLINE_TLS__ENABLED="true",
        THREADLINE_TLS__MUTUAL="true",
        THREADLINE_TLS__CERT_FILE=str(pki.internal.cert),
        THREADLINE_TLS__KEY_FILE=str(pki.internal.key),
        THREADLINE_TLS__CA_FILE=str(pki.ca.cert),
    )
    proc = await start_service("session", env)
    try:
        await wait_healthy(f"127.0.0.1:{health_port}")
        address = f"127.0.0.1:{port}"
        ours = await session_list(address, client_tls(pki.ca.cert, pki.internal, token=TOKEN))
        without_token = await _refusal(session_list(address, client_tls(pki.ca.cert, pki.internal)))
        with pytest.raises(errors.Unavailable):
            await session_list(address, ChannelSecurity(token=TOKEN))
    finally:
        proc.terminate()
        await proc.wait()

    assert ours == []
    assert isinstance(without_token, errors.Unauthenticated)
    assert proc.returncode == 0
