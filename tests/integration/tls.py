"""Certificates for the secured broker, made at test time with openssl: a test CA, the broker's certificate for
127.0.0.1 and localhost, a client certificate for mTLS, and a second CA that signed none of them."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the test CA's certificate
    broker_keystore: Path  # the broker's key (PKCS#8) and certificate, one PEM file
    client_cert: Path
    client_key: Path
    other_ca: Path  # a CA the broker's certificate does not chain to


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(name: str, cwd: Path) -> None:
    _openssl(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=rerank test {name}",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def _signed(name: str, subject: str, extensions: str, cwd: Path) -> None:
    _openssl(
        "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", f"{name}.ext", "-out", f"{name}.pem", cwd=cwd,
    )  # fmt: skip


def make_certificates(directory: Path) -> Certificates:
    directory.mkdir(parents=True, exist_ok=True)
    _ca("ca", directory)
    _ca("other-ca", directory)
    _signed("broker", "/CN=localhost", "subjectAltName=IP:127.0.0.1,DNS:localhost\n", directory)
    _signed("client", "/CN=rerank-worker", "extendedKeyUsage=clientAuth\n", directory)
    keystore = directory / "broker-keystore.pem"
    keystore.write_text((directory / "broker.key").read_text() + (directory / "broker.pem").read_text())
    return Certificates(
        ca=directory / "ca.pem",
        broker_keystore=keystore,
        client_cert=directory / "client.pem",
        client_key=directory / "client.key",
        other_ca=directory / "other-ca.pem",
    )
