"""A certificate authority made on the spot, for a test bed that speaks HTTPS: one CA, one server
certificate for a wildcard name signed by it. Clients trust the CA through SSL_CERT_FILE, which
OpenSSL's default verify paths read (Python's `ssl.create_default_context`, so urllib and aiohttp).
ECDSA P-256 keys: the handshakes cost the server little CPU.
"""

from __future__ import annotations

import datetime
from pathlib import Path


def certificate_authority(common_name: str, days: int = 30):
    """A CA's (private key, certificate), valid from yesterday for `days`."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def issue(ca, subject, *, server_names: list[str] | None = None, client: bool = False, days: int = 30):
    """A (private key, certificate) signed by `ca` (certificate_authority's pair) for `subject` (an
    x509.Name): a server's for `server_names` (DNS names), or a client's."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID

    ca_key, ca_cert = ca
    now = datetime.datetime.now(datetime.timezone.utc)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if server_names:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(n) for n in server_names]), critical=False
        )
    return key, builder.sign(ca_key, hashes.SHA256())


def write_pem(folder: Path, ca, pairs: dict[str, tuple]) -> dict[str, Path]:
    """`ca.pem`, and for each name `<name>.pem` (certificate, then the CA) and `<name>.key` in `folder`."""
    from cryptography.hazmat.primitives import serialization

    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    paths = {"ca": folder / "ca.pem"}
    paths["ca"].write_bytes(ca[1].public_bytes(pem))
    for name, (key, cert) in pairs.items():
        paths[name] = folder / f"{name}.pem"
        paths[name].write_bytes(cert.public_bytes(pem) + ca[1].public_bytes(pem))
        paths[f"{name}.key"] = folder / f"{name}.key"
        paths[f"{name}.key"].write_bytes(
            key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        )
    return paths


def make_ca(folder: Path, wildcard: str) -> tuple[Path, Path, Path]:
    """(CA certificate, server certificate chain, server key) in `folder`, PEM, for `*.{wildcard}`."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    ca = certificate_authority("laion-operator test bed CA")
    name = f"*.{wildcard}"
    server = issue(ca, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]), server_names=[name])
    paths = write_pem(folder, ca, {"server": server})
    return paths["ca"], paths["server"], paths["server.key"]


def server_context(cert_file: str, key_file: str):
    import ssl

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert_file, key_file)
    return ctx
