"""DICOM TLS contexts (PS3.15 Annex B) built from the config: the embedded engine uses them
directly; the toolkit adapters pass the same files to their tools."""

from __future__ import annotations

import os
import secrets
import shutil
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from relay.config.model import TLSConfig


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """For the receiver: our certificate; peers must present one chaining to `ca`."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                     cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert tls.certificate is not None and tls.private_key is not None
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_peer_certificate else ssl.CERT_NONE
    return ctx


def client_context(tls: TLSConfig) -> ssl.SSLContext:
    """For a destination: its certificate must chain to `ca` and name the host we dial."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.require_peer_certificate:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.certificate is not None and tls.private_key is not None:
        ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    return ctx


# --- Java key stores, for the dcm4che tools ----------------------------------------------

# What dcm4che is told to speak: TLS 1.3 and 1.2 with forward-secret AEAD suites only (as
# DCMTK's default BCP 195 profile and Python's defaults do). dcm4che's own `--tls` would
# enable NULL, 3DES and plain-RSA suites that current Java refuses or should.
JAVA_TLS_PROTOCOLS = ("TLSv1.3", "TLSv1.2")
JAVA_TLS_CIPHERS = (
    "TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384",  # TLS 1.3
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384", "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
)


@dataclass(frozen=True)
class JavaStores:
    """PKCS12 stores made from the PEM files of a [tls] table, for Java tools."""

    key_store: Path
    key_store_pass: str
    trust_store: Path | None  # None: no `ca` was given
    trust_store_pass: str


def find_keytool() -> Path:
    """keytool of the Java runtime the dcm4che tools run on ($JAVA_HOME, else PATH)."""
    home = os.environ.get("JAVA_HOME")
    candidates = [Path(home) / "bin" / "keytool"] if home else []
    found = shutil.which("keytool")
    candidates += [Path(found)] if found else []
    for path in candidates:
        if os.access(path, os.X_OK):
            return path
    raise FileNotFoundError("keytool (part of the Java runtime dcm4che runs on) not found in "
                            "$JAVA_HOME/bin or PATH: it makes the trust store")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fp:
        fp.write(data)


def java_stores(tls: TLSConfig, folder: Path, keytool: Path | None = None) -> JavaStores:
    """Write the key store (our certificate and key; without them, none is presented) and the
    trust store (the certificates of `ca`) into `folder` (made 0700, files 0600).

    The key store is written with `cryptography` (keytool cannot import a PEM key); the trust
    store with keytool, because Java takes a certificate in a PKCS12 file as trusted only with
    an Oracle-specific attribute that keytool writes and other tools do not."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.serialization import pkcs12

    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    # Hex: a password starting with '-' would be read as an option by the tools' parser.
    key_pass, trust_pass = secrets.token_hex(24), secrets.token_hex(24)
    cas = x509.load_pem_x509_certificates(tls.ca.read_bytes()) if tls.ca else []
    encryption = serialization.BestAvailableEncryption(key_pass.encode())
    if tls.certificate is not None and tls.private_key is not None:
        chain = x509.load_pem_x509_certificates(tls.certificate.read_bytes())
        key = serialization.load_pem_private_key(tls.private_key.read_bytes(), password=None)
        data = pkcs12.serialize_key_and_certificates(
            b"dicom-relay", key, chain[0], chain[1:] or None, encryption)  # type: ignore[arg-type]
    elif cas:
        # A store with no key entry: Java then presents no client certificate (dcm4che's
        # default would be its own sample key). Certificates without a key are not entries.
        data = pkcs12.serialize_key_and_certificates(None, None, None, cas, encryption)
    else:
        raise ValueError("TLS for a Java tool needs a certificate and key, or a ca")
    key_store = folder / "key.p12"
    _write_private(key_store, data)
    trust_store = None
    if cas:
        trust_store = folder / "trust.p12"
        keytool = keytool or find_keytool()
        for i, cert in enumerate(cas):
            pem = folder / f"ca{i}.pem"
            _write_private(pem, cert.public_bytes(serialization.Encoding.PEM))
            proc = subprocess.run(  # noqa: S603 - argv list; the password goes by environment
                [str(keytool), "-importcert", "-noprompt", "-alias", f"ca{i}",
                 "-file", str(pem), "-keystore", str(trust_store), "-storetype", "PKCS12",
                 "-storepass:env", "DICOM_RELAY_STORE_PASS"],
                env={**os.environ, "DICOM_RELAY_STORE_PASS": trust_pass},
                capture_output=True, text=True, timeout=120, check=False)
            pem.unlink()
            if proc.returncode != 0:
                raise ValueError(f"keytool could not make the trust store from {tls.ca}: "
                                 f"{(proc.stdout + proc.stderr).strip()[-300:]}")
        os.chmod(trust_store, 0o600)
    return JavaStores(key_store, key_pass, trust_store, trust_pass)
