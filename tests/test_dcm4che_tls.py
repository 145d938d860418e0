"""DICOM TLS for the dcm4che engine, piece by piece: the options exist in the real tools' help
(tests/data/dcm4che/), and the key stores, protocols and cipher suites work in Java's own TLS
(JSSE, which dcm4che uses) against Python's TLS with the test's certificates, both ways, and
fail where they must. These need only Java; the end-to-end TLS tests with the real toolkit are
in tests/security/test_tls.py and tests/test_sender_statuses.py."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pytest
from security.pki import Pki, make_pki
from test_dcm4che import HOME, options_in_help

from peers import free_port
from relay.config.load import load_config
from relay.config.model import ConfigError, TLSConfig
from relay.toolkits.dcm4che import java_tls, storescp_argv, tls_args
from relay.toolkits.select import select_engine
from relay.toolkits.tls import (
    JAVA_TLS_CIPHERS,
    JAVA_TLS_PROTOCOLS,
    JavaStores,
    client_context,
    java_stores,
    server_context,
)

PROBE = Path(__file__).parent / "data" / "java" / "TlsProbe.java"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path / "pki")


def _java() -> str:
    java = shutil.which("java")
    if java is None:  # tests/run installs a Java runtime: missing means a broken set-up
        pytest.fail("java is not installed: run the suite with tests/run")
    return java


def _probe(mode: str, port: int, stores: JavaStores, need_client_auth: bool = True
           ) -> subprocess.Popen[str]:
    argv = [_java(), str(PROBE), mode, "127.0.0.1", str(port), str(stores.key_store),
            stores.key_store_pass, str(stores.trust_store or "-"), stores.trust_store_pass,
            ",".join(JAVA_TLS_PROTOCOLS), ",".join(JAVA_TLS_CIPHERS),
            "need" if need_client_auth else "noauth"]
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _python_server(ctx: ssl.SSLContext, port: int) -> tuple[threading.Thread, list[str]]:
    """A TLS server (Python's ssl, as the embedded engine and pynetdicom peers use) that
    answers one connection with the common name of the client's certificate."""
    said: list[str] = []
    listener = socket.create_server(("127.0.0.1", port))

    def serve() -> None:
        with listener:
            listener.settimeout(30)
            conn, _ = listener.accept()
            try:
                with ctx.wrap_socket(conn, server_side=True) as tls:
                    cert = tls.getpeercert() or {}
                    subject = dict(x[0] for x in cert.get("subject", ()))
                    said.append(tls.recv(100).decode())
                    tls.sendall(f"client is {subject.get('commonName', 'nobody')}\n".encode())
            except (OSError, ssl.SSLError) as exc:
                said.append(f"refused: {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return thread, said


def test_destination_stores_reach_a_tls_pacs(tmp_path: Path, pki: Pki) -> None:
    # The relay as dcm4che's storescu would be: our client certificate, the PACS's CA.
    stores = java_stores(TLSConfig(ca=pki.ca, certificate=pki.client_cert,
                                   private_key=pki.client_key), tmp_path / "stores")
    port = free_port()
    thread, said = _python_server(server_context(TLSConfig(
        ca=pki.ca, certificate=pki.server_cert, private_key=pki.server_key)), port)
    out, _ = _probe("client", port, stores).communicate(timeout=120)
    thread.join(30)
    assert "peer said: client is client.test" in out, out
    assert said == ["hello\n"]
    assert "protocol=TLSv1.3" in out


def test_destination_stores_refuse_a_pacs_of_another_ca(tmp_path: Path, pki: Pki) -> None:
    other = make_pki(tmp_path / "other")
    stores = java_stores(TLSConfig(ca=other.ca), tmp_path / "stores")  # no client cert either
    port = free_port()
    thread, said = _python_server(server_context(TLSConfig(
        ca=pki.ca, certificate=pki.server_cert, private_key=pki.server_key,
        require_peer_certificate=False)), port)
    proc = _probe("client", port, stores)
    out, _ = proc.communicate(timeout=120)
    thread.join(30)
    assert proc.returncode != 0 and "peer said" not in out
    assert "PKIX path" in out or "certificate" in out.lower(), out


@pytest.mark.parametrize("client", ["ours", "rogue"])
def test_receiver_stores_take_only_our_cas_modalities(tmp_path: Path, pki: Pki,
                                                      client: str) -> None:
    # The relay as dcm4che's storescp would be: our server certificate; modalities' CA.
    stores = java_stores(TLSConfig(ca=pki.ca, certificate=pki.server_cert,
                                   private_key=pki.server_key), tmp_path / "stores")
    port = free_port()
    proc = _probe("server", port, stores)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "listening"
    cert, key = ((pki.client_cert, pki.client_key) if client == "ours"
                 else (pki.rogue_cert, pki.rogue_key))
    ctx = client_context(TLSConfig(ca=pki.ca, certificate=cert, private_key=key))
    reply = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
                ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"hi\n")
            reply = tls.recv(100)
    except (OSError, ssl.SSLError):
        pass
    out, _ = proc.communicate(timeout=120)
    if client == "ours":
        assert reply == b"hello\n" and "client=CN=client.test" in out, out
    else:
        assert reply == b"" and proc.returncode != 0, out


def test_tls_options_are_dcm4che_options(tmp_path: Path, pki: Pki) -> None:
    stores = java_stores(TLSConfig(ca=pki.ca, certificate=pki.server_cert,
                                   private_key=pki.server_key), tmp_path / "stores")
    tls = tls_args(stores, require_peer_certificate=False)
    scp = storescp_argv(HOME / "bin", "DICOMRELAY", "0.0.0.0", 11112, tmp_path, tls)  # noqa: S104
    assert {a for a in scp if a.startswith("-")} <= options_in_help("storescp")
    assert "--tls-noauth" in scp
    # The sender (dcm4che's Association API in the JVM helper) gets the same stores, suites
    # and protocols, and always the trust store.
    scu = java_tls(stores)
    assert scu is not None and scu["trust_store"] == str(stores.trust_store)
    assert scu["ciphers"] == list(JAVA_TLS_CIPHERS)
    assert scu["protocols"] == list(JAVA_TLS_PROTOCOLS)
    # Option values never look like options (the tools' parser would take "-x…" for one).
    assert stores.key_store_pass.isalnum() and stores.trust_store_pass.isalnum()


def _config(tmp_path: Path, pki: Pki, dest_tls: str) -> Path:
    home = tmp_path / "dcm4che"
    (home / "bin").mkdir(parents=True)
    (home / "bin" / "storescp").write_text("#!/bin/sh\n")
    (home / "lib").mkdir()
    (home / "lib" / "dcm4che-net-5.24.0.jar").write_bytes(b"")
    path = tmp_path / "relay.toml"
    path.write_text(f"""
[toolkit]
engine = "dcm4che"
dcm4che_home = "{home}"
[spool]
path = "{tmp_path / 'spool'}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104
tls = {{ {dest_tls} }}
""")
    return path


def test_start_up_makes_the_stores_or_names_the_key(tmp_path: Path, pki: Pki) -> None:
    engine = select_engine(load_config(_config(tmp_path, pki, f'ca = "{pki.ca}"')))
    [stores] = engine._stores.values()  # type: ignore[attr-defined]
    assert stores.trust_store is not None and stores.trust_store.stat().st_mode & 0o077 == 0
    assert stores.key_store.parent.stat().st_mode & 0o777 == 0o700
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.tls\."
                       "require_peer_certificate: dcm4che's sender always verifies"):
        select_engine(load_config(_config(tmp_path / "b", pki,
                                          "require_peer_certificate = false")))
    bad = tmp_path / "not-a-cert.pem"
    bad.write_text("not PEM\n")
    with pytest.raises(ConfigError, match=r"\[\[destinations\]\]\[0\]\.tls: cannot make the "
                       "Java key stores"):
        select_engine(load_config(_config(tmp_path / "c", pki, f'ca = "{bad}"')))
