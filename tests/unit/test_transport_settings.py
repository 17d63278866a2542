"""TLS and service-auth settings an operator gets wrong, and what they are told."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.certificates import CertificateAuthority
from threadline import errors
from threadline.config import ConfigError, load_settings
from threadline.transport import channel_security, listener_security

TOKEN = "a-service-token-of-32-characters"


def test_a_short_service_token_is_refused_naming_its_variable() -> None:
    with pytest.raises(ConfigError, match="THREADLINE_SERVICE_AUTH__TOKEN") as refused:
        load_settings(environ={"THREADLINE_SERVICE_AUTH__TOKEN": "hunter2"})

    assert "hunter2" not in str(refused.value)


def test_the_service_token_never_shows_in_settings_output() -> None:
    settings = load_settings(environ={"THREADLINE_SERVICE_AUTH__TOKEN": TOKEN})

    assert TOKEN not in repr(settings)
    assert TOKEN not in settings.model_dump_json()
    assert channel_security(settings).token == TOKEN


def test_mutual_tls_without_certificates_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"tls \(THREADLINE_TLS\).*mutual needs"):
        load_settings(environ={"THREADLINE_TLS__ENABLED": "true", "THREADLINE_TLS__MUTUAL": "1"})


def test_a_certificate_without_its_key_is_refused() -> None:
    with pytest.raises(ConfigError, match="set both cert_file and key_file"):
        load_settings(environ={"THREADLINE_TLS__CERT_FILE": "/etc/tls/tls.crt"})


def test_a_service_with_tls_but_no_certificate_does_not_start() -> None:
    settings = load_settings(environ={"THREADLINE_TLS__ENABLED": "true"})

    with pytest.raises(errors.FailedPrecondition, match="THREADLINE_TLS__CERT_FILE"):
        listener_security(settings, "session")


def test_a_missing_certificate_file_is_named_with_its_setting(tmp_path: Path) -> None:
    missing = tmp_path / "tls.crt"
    settings = load_settings(
        environ={
            "THREADLINE_TLS__ENABLED": "true",
            "THREADLINE_TLS__CERT_FILE": str(missing),
            "THREADLINE_TLS__KEY_FILE": str(tmp_path / "tls.key"),
        }
    )

    with pytest.raises(errors.FailedPrecondition) as refused:
        listener_security(settings, "session")

    assert "tls.cert_file (THREADLINE_TLS__CERT_FILE)" in refused.value.message
    assert str(missing) in refused.value.message


def test_peer_names_without_mutual_tls_do_not_start() -> None:
    settings = load_settings(environ={"THREADLINE_SERVICE_AUTH__PEER_NAMES": '["executor"]'})

    with pytest.raises(errors.FailedPrecondition, match="THREADLINE_SERVICE_AUTH__PEER_NAMES"):
        listener_security(settings, "session")


def test_the_gateway_public_listener_never_checks_service_auth() -> None:
    settings = load_settings(environ={"THREADLINE_SERVICE_AUTH__TOKEN": TOKEN})

    assert listener_security(settings, "gateway").interceptors == ()
    assert len(listener_security(settings, "session").interceptors) == 1


def test_a_key_that_is_not_the_certificates_does_not_start(tmp_path: Path) -> None:
    ca = CertificateAuthority(tmp_path / "ca", "test CA")
    one, other = ca.issue("one", dns=["one"]), ca.issue("other", dns=["other"])
    settings = load_settings(
        environ={
            "THREADLINE_TLS__ENABLED": "true",
            "THREADLINE_TLS__CERT_FILE": str(one.cert),
            "THREADLINE_TLS__KEY_FILE": str(other.key),
        }
    )

    with pytest.raises(errors.FailedPrecondition, match="are not a certificate and its key"):
        listener_security(settings, "session")
