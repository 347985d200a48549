"""A throwaway certificate authority for the sandbox.

MSAL refuses a non-HTTPS authority, and the product must verify TLS exactly as it would in Azure.
So the sandbox serves HTTPS with a certificate from a CA made on the spot, and the product is told
to trust that CA through the standard `REQUESTS_CA_BUNDLE` variable, never by turning checks off.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass
class SandboxTls:
    ca_bundle: Path  # PEM file to point REQUESTS_CA_BUNDLE at
    server_context: ssl.SSLContext
    # base64 SHA-256 of the server certificate's public key (SubjectPublicKeyInfo): what Chromium's
    # --ignore-certificate-errors-spki-list takes to trust exactly this certificate and nothing else.
    spki_sha256: str = ""


def make_tls(directory: Path) -> SandboxTls:
    directory.mkdir(parents=True, exist_ok=True)
    ca = trustme.CA(organization_name="BC Contact Sync sandbox CA")
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    bundle = directory / "sandbox-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return SandboxTls(
        ca_bundle=bundle, server_context=ctx, spki_sha256=_spki_sha256(cert.cert_chain_pems[0].bytes())
    )


def _spki_sha256(cert_pem: bytes) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    spki = (
        x509.load_pem_x509_certificate(cert_pem)
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")
