"""TLS credentials for gRPC listeners and channels, from PEM files.

Servers use grpc's dynamic server credentials: before each TLS handshake grpc
asks `CertificateFiles.fetch` for a new configuration, which looks at the files
(one stat each) and reads them again only when one changed. A rotated
certificate, key or CA bundle (a Kubernetes Secret volume swaps all of them at
once) therefore reaches every new connection without a restart; connections
already open keep the old one until they end (servers end them after 30 s).
Channels read their files once, when they are made.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

from threadline.errors import FailedPrecondition
from threadline.logs import get_logger

log = get_logger("threadline.tls")

#: (inode, mtime, size) of each file: changes whenever a file is replaced or rewritten.
_Signature = tuple[tuple[int, int, int], ...]


@dataclass(frozen=True)
class PemFile:
    """A PEM file and the setting that names it, for errors an operator can act on."""

    path: Path
    setting: str

    def read(self) -> bytes:
        try:
            return self.path.read_bytes()
        except OSError as exc:
            raise FailedPrecondition(
                f"cannot read {self.setting} {self.path}: {exc.strerror or exc}"
            ) from None


class CertificateFiles:
    """A server's certificate chain, key and (for client certificates) CA bundle."""

    def __init__(self, cert: PemFile, key: PemFile, ca: PemFile | None) -> None:
        self._files = (cert, key, *((ca,) if ca else ()))
        self._signature = self._stat()
        self.current = self._load()

    def _stat(self) -> _Signature:
        signature = []
        for pem in self._files:
            try:
                stat = os.stat(pem.path)
            except OSError as exc:
                raise FailedPrecondition(
                    f"cannot read {pem.setting} {pem.path}: {exc.strerror or exc}"
                ) from None
            signature.append((stat.st_ino, stat.st_mtime_ns, stat.st_size))
        return tuple(signature)

    def _load(self) -> grpc.ServerCertificateConfiguration:
        self._check()
        cert, key, *ca = (pem.read() for pem in self._files)
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)], root_certificates=ca[0] if ca else None
        )

    def _check(self) -> None:
        """Refuse files grpc would accept but no handshake could use: a key that is not
        the certificate's (a rotation half done), or text that is not PEM."""
        cert, key, *ca = self._files
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        try:
            context.load_cert_chain(cert.path, key.path)
        except (ssl.SSLError, OSError) as exc:
            raise FailedPrecondition(
                f"{cert.setting} {cert.path} and {key.setting} {key.path} are not a"
                f" certificate and its key: {exc}"
            ) from None
        for bundle in ca:
            try:
                context.load_verify_locations(cafile=bundle.path)
            except (ssl.SSLError, OSError) as exc:
                raise FailedPrecondition(
                    f"{bundle.setting} {bundle.path} holds no usable CA certificate: {exc}"
                ) from None

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration if a file changed since the last look, else None (keep).

        Called by grpc before each handshake. Files that cannot be read or do not fit
        together (caught mid-rotation) keep the configuration in use; the next
        handshake looks again.
        """
        try:
            signature = self._stat()
            if signature == self._signature:
                return None
            self.current = self._load()
        except FailedPrecondition as exc:
            log.warning("tls.reload_failed", error=exc.message)
            return None
        self._signature = signature
        log.info("tls.reloaded", files=[str(pem.path) for pem in self._files])
        return self.current


def server_credentials(
    files: CertificateFiles, *, require_client_cert: bool
) -> grpc.ServerCredentials:
    """Credentials that follow `files`; `require_client_cert` verifies callers against its CA."""
    # The stubs say the fetcher must return a configuration; grpc documents None as
    # "no change", which is what `fetch` returns nearly always.
    fetch: Any = files.fetch
    return grpc.dynamic_ssl_server_credentials(
        files.current, fetch, require_client_authentication=require_client_cert
    )


def channel_credentials(
    ca: PemFile | None, client_cert: tuple[PemFile, PemFile] | None = None
) -> grpc.ChannelCredentials:
    """Credentials verifying servers against `ca` (None: the system's roots), presenting
    `client_cert` (certificate chain, key) when given."""
    cert, key = client_cert if client_cert else (None, None)
    return grpc.ssl_channel_credentials(
        root_certificates=ca.read() if ca else None,
        private_key=key.read() if key else None,
        certificate_chain=cert.read() if cert else None,
    )
