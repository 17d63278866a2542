"""How a service's listener and its channels to peers are secured, from settings.

The one place that reads `tls`, `service_auth` and `health_port`: a service's
wiring passes `listener_security(settings, SERVICE)` to `build_server` and
`channel_security(settings)` to its peers' clients. docs/security.md explains
each control.
"""

from __future__ import annotations

from pathlib import Path

import grpc.aio

from threadline.channels import ChannelSecurity
from threadline.config import ENV_PREFIX, ServiceName, Settings
from threadline.errors import FailedPrecondition
from threadline.logs import get_logger
from threadline.server import ListenerSecurity
from threadline.service_auth import ServiceAuthInterceptor
from threadline.tls import CertificateFiles, PemFile, channel_credentials, server_credentials

log = get_logger("threadline.transport")

#: The service whose listener is the public API: API keys, not service auth, guard it.
PUBLIC: ServiceName = "gateway"


def _pem(path: Path, setting: str) -> PemFile:
    variable = ENV_PREFIX + setting.upper().replace(".", "__")
    return PemFile(path, f"{setting} ({variable})")


def channel_security(settings: Settings) -> ChannelSecurity:
    """What this process's channels to other threadline services use."""
    tls, auth = settings.tls, settings.service_auth
    token = auth.token.get_secret_value() if auth.token else None
    if not tls.enabled:
        return ChannelSecurity(token=token, in_process=settings.in_process_calls)
    ca = _pem(tls.ca_file, "tls.ca_file") if tls.ca_file else None
    client_cert = None
    if tls.mutual:
        assert tls.cert_file and tls.key_file, "config requires them under mutual"
        client_cert = (_pem(tls.cert_file, "tls.cert_file"), _pem(tls.key_file, "tls.key_file"))
    credentials = channel_credentials(ca, client_cert)
    return ChannelSecurity(credentials=credentials, token=token, server_name=tls.server_name)


def listener_security(settings: Settings, service: ServiceName) -> ListenerSecurity:
    """TLS, caller checks and the probe listener for `service`'s server."""
    credentials = _server_credentials(settings, service) if settings.tls.enabled else None
    interceptors = () if service == PUBLIC else _caller_checks(settings, service)
    health = f"{settings.listen_host}:{settings.health_port}" if settings.health_port else None
    return ListenerSecurity(credentials, interceptors, health)


def _server_credentials(settings: Settings, service: ServiceName) -> grpc.ServerCredentials:
    tls = settings.tls
    if service == PUBLIC and tls.gateway_cert_file and tls.gateway_key_file:
        cert = _pem(tls.gateway_cert_file, "tls.gateway_cert_file")
        key = _pem(tls.gateway_key_file, "tls.gateway_key_file")
    elif tls.cert_file and tls.key_file:
        cert, key = _pem(tls.cert_file, "tls.cert_file"), _pem(tls.key_file, "tls.key_file")
    else:
        raise FailedPrecondition(
            f"tls.enabled: {service} needs a certificate to serve: set tls.cert_file and"
            " tls.key_file (THREADLINE_TLS__CERT_FILE, THREADLINE_TLS__KEY_FILE)"
        )
    # The public listener never asks for client certificates: its callers show API keys.
    mutual = tls.mutual and service != PUBLIC
    ca = _pem(tls.ca_file, "tls.ca_file") if mutual and tls.ca_file else None
    return server_credentials(CertificateFiles(cert, key, ca), require_client_cert=mutual)


def _caller_checks(
    settings: Settings, service: ServiceName
) -> tuple[grpc.aio.ServerInterceptor, ...]:
    auth, mutual = settings.service_auth, settings.tls.mutual
    if auth.peer_names and not mutual:
        raise FailedPrecondition(
            "service_auth.peer_names (THREADLINE_SERVICE_AUTH__PEER_NAMES) names client"
            " certificates: it needs tls.mutual"
        )
    tokens = [t.get_secret_value() for t in (auth.token, auth.accepted_token) if t is not None]
    if not tokens and not mutual:
        log.warning(
            "service_auth.open",
            service=service,
            note="any caller that reaches this port is trusted with every tenant's data:"
            " set service_auth.token or tls.mutual (docs/security.md)",
        )
    if not tokens and not auth.peer_names:
        return ()
    return (ServiceAuthInterceptor(tokens, auth.peer_names),)
