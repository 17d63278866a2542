"""API keys at the gateway: who the caller is, or a message that says what is wrong."""

from __future__ import annotations

import pytest

from services.gateway.auth import ApiKeyAuthenticator, Caller
from threadline.config import ApiKey, hash_api_key
from threadline.errors import Unauthenticated

ACME_KEY = "tl-acme-key"
OPS_KEY = "tl-ops-key"


@pytest.fixture
def auth() -> ApiKeyAuthenticator:
    return ApiKeyAuthenticator(
        [
            ApiKey(sha256=hash_api_key(ACME_KEY), tenant="acme"),
            # Digests pasted in upper case still match.
            ApiKey(sha256=hash_api_key(OPS_KEY).upper(), tenant="ops", admin=True),
        ]
    )


def _rejection(auth: ApiKeyAuthenticator, header: str | None) -> str:
    with pytest.raises(Unauthenticated) as caught:
        auth.authenticate(header)
    return caught.value.message


def test_right_key_gives_tenant(auth: ApiKeyAuthenticator) -> None:
    assert auth.authenticate(f"Bearer {ACME_KEY}") == Caller(tenant="acme", admin=False)


def test_admin_key_gives_admin(auth: ApiKeyAuthenticator) -> None:
    assert auth.authenticate(f"Bearer {OPS_KEY}") == Caller(tenant="ops", admin=True)


@pytest.mark.parametrize("header", [f"bearer {ACME_KEY}", f"BEARER {ACME_KEY}  "])
def test_scheme_is_case_insensitive_and_key_trimmed(auth: ApiKeyAuthenticator, header: str) -> None:
    assert auth.authenticate(header).tenant == "acme"


@pytest.mark.parametrize("header", [None, ""])
def test_missing_header(auth: ApiKeyAuthenticator, header: str | None) -> None:
    message = _rejection(auth, header)

    assert "missing credentials" in message
    assert "Bearer <api key>" in message


@pytest.mark.parametrize(
    "header", [ACME_KEY, f"Basic {ACME_KEY}", f"Token {ACME_KEY}", "Bearer", "Bearer    "]
)
def test_wrong_scheme_or_no_key(auth: ApiKeyAuthenticator, header: str) -> None:
    message = _rejection(auth, header)

    assert "malformed authorization" in message
    assert "Bearer <api key>" in message


@pytest.mark.parametrize(
    "key", ["tl-unknown", ACME_KEY.upper(), ACME_KEY + "x", hash_api_key(ACME_KEY)]
)
def test_wrong_key(auth: ApiKeyAuthenticator, key: str) -> None:
    # The digest itself is not a key: config holds digests so a leaked config is harmless.
    assert _rejection(auth, f"Bearer {key}") == "invalid API key"


def test_the_three_rejections_read_differently(auth: ApiKeyAuthenticator) -> None:
    messages = {
        _rejection(auth, None),
        _rejection(auth, f"Basic {ACME_KEY}"),
        _rejection(auth, "Bearer nope"),
    }

    assert len(messages) == 3


def test_rejection_never_echoes_the_key(auth: ApiKeyAuthenticator) -> None:
    assert "secret-guess" not in _rejection(auth, "Bearer secret-guess")
    assert "secret-guess" not in _rejection(auth, "Basic secret-guess")


def test_no_keys_configured_rejects_everyone() -> None:
    assert _rejection(ApiKeyAuthenticator([]), f"Bearer {ACME_KEY}") == "invalid API key"
