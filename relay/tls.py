"""DICOM TLS contexts (PS3.15 Annex B) built from the config: the embedded engine uses them
directly; the toolkit adapters pass the same files to their tools."""

from __future__ import annotations

import ssl

from relay.config import TLSConfig


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
