"""Self-signed certificates for development and tests: a CA, a server and a client certificate.

Production deployments bring their own certificates; this only makes TLS easy to try and test.
"""
from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CertificateSet:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def make_certificates(out_dir: Path, hostname: str = "localhost", days: int = 30) -> CertificateSet:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def name(common: str):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])

    ca_key = key()
    ca = (x509.CertificateBuilder().subject_name(name("mmfuse test CA")).issuer_name(name("mmfuse test CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(common: str, server: bool):
        k = key()
        builder = (x509.CertificateBuilder().subject_name(name(common)).issuer_name(ca.subject)
                   .public_key(k.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName(hostname), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), k

    server_cert, server_key = leaf(hostname, True)
    client_cert, client_key = leaf("mmfuse client", False)
    pem = serialization.Encoding.PEM
    return CertificateSet(
        ca=_write(out_dir / "ca.crt", ca.public_bytes(pem)),
        server_cert=_write(out_dir / "server.crt", server_cert.public_bytes(pem)),
        server_key=_write(out_dir / "server.key", pem_key(server_key)),
        client_cert=_write(out_dir / "client.crt", client_cert.public_bytes(pem)),
        client_key=_write(out_dir / "client.key", pem_key(client_key)),
    )
