"""API keys → tenants. Keys are configured as SHA-256 digests, never in clear."""

from __future__ import annotations

import hmac
from collections.abc import Iterable
from dataclasses import dataclass

from threadline.config import ApiKey, hash_api_key
from threadline.errors import Unauthenticated


@dataclass(frozen=True)
class Caller:
    tenant: str
    admin: bool


class ApiKeyAuthenticator:
    def __init__(self, keys: Iterable[ApiKey]) -> None:
        self._keys = {key.sha256: Caller(key.tenant, key.admin) for key in keys}

    def authenticate(self, authorization: str | None) -> Caller:
        if not authorization:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <api key>'")
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthenticated("malformed authorization: expected 'Bearer <api key>'")
        digest = hash_api_key(key.strip())
        for known, caller in self._keys.items():
            # Constant-time compare: response timing must not reveal a key's prefix.
            if hmac.compare_digest(known, digest):
                return caller
        raise Unauthenticated("invalid API key")
