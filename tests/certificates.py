"""Throwaway certificate authorities and certificates for TLS tests, made with `openssl`."""

from __future__ import annotations

import os
import secrets
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

_KEY = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    result = subprocess.run(
        ["openssl", *args], cwd=cwd, capture_output=True, text=True, timeout=30, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {result.stderr.strip()}")


@dataclass(frozen=True)
class Issued:
    """A certificate (PEM, chain of one) and its private key."""

    cert: Path
    key: Path

    def read(self) -> tuple[bytes, bytes]:
        """(certificate chain, private key), as grpc's credentials take them."""
        return self.cert.read_bytes(), self.key.read_bytes()

    def install(self, cert: Path, key: Path) -> None:
        """Replace `cert` and `key` with this pair, each file swapped in whole (rename),
        as a Kubernetes Secret volume or cert-manager would."""
        for source, target in ((self.key, key), (self.cert, cert)):
            staged = target.with_name(f".{target.name}.new")
            staged.write_bytes(source.read_bytes())
            os.replace(staged, target)


class CertificateAuthority:
    """A self-signed CA in `directory` that issues leaf certificates for server and client use."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.cert = directory / "ca.pem"
        self.key = directory / "ca.key"
        _openssl(
            "req", "-x509", *_KEY, "-keyout", self.key.name, "-out", self.cert.name,
            "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            cwd=directory,
        )  # fmt: skip

    def issue(self, name: str, *, dns: Sequence[str] = (), ips: Sequence[str] = ()) -> Issued:
        """A certificate for `name` (its CN) with these DNS and IP subject alternative names."""
        cert, key, csr = (self.directory / f"{name}.{ext}" for ext in ("pem", "key", "csr"))
        extensions = self.directory / f"{name}.ext"
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        extensions.write_text(
            (f"subjectAltName={','.join(sans)}\n" if sans else "")
            + "basicConstraints=CA:FALSE\n"
            + "keyUsage=critical,digitalSignature,keyEncipherment\n"
            + "extendedKeyUsage=serverAuth,clientAuth\n"
        )
        _openssl(
            "req", "-new", *_KEY, "-keyout", key.name, "-out", csr.name, "-subj", f"/CN={name}",
            cwd=self.directory,
        )  # fmt: skip
        _openssl(
            "x509", "-req", "-in", csr.name, "-CA", self.cert.name, "-CAkey", self.key.name,
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", "2",
            "-extfile", extensions.name, "-out", cert.name,
            cwd=self.directory,
        )  # fmt: skip
        return Issued(cert, key)
