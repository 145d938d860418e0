"""A toolkit that fails on its own (a broken installation, a tool gone since start-up, TLS
files it cannot read) is logged as a local tool failure with the tool's last words, never as
"destination unavailable"; the objects wait in the queue, nothing is quarantined. dcm4che's
own case is in test_dcm4che_real.py. The broken tools are scripts standing in for a damaged
installation; the destinations are real (DCMTK's tools, pynetdicom)."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import DCMTK_BIN, ScriptedSCP, free_port, logged_events
from relay.config.model import Destination, SenderConfig, TLSConfig
from relay.send.results import Outcome, ToolFailure
from relay.send.sender import DestinationSender
from relay.spool import Spool
from relay.toolkits.dcmtk import DcmtkEngine
from relay.toolkits.embedded import EmbeddedEngine

LOADER_ERROR = ("error while loading shared libraries: libdcmnet.so.17: cannot open shared "
                "object file: No such file or directory")


def _broken_dcmtk(folder: Path) -> DcmtkEngine:
    """DCMTK's tools as a half-removed package leaves them: they start and die at once."""
    folder.mkdir()
    for tool in ("dcmsend", "echoscu", "storescu"):
        script = folder / tool
        script.write_text(f"#!/bin/sh\necho \"{tool}: {LOADER_ERROR}\" >&2\nexit 127\n")
        script.chmod(0o755)
    return DcmtkEngine(folder)


@pytest.fixture
def scp() -> ScriptedSCP:
    pacs = ScriptedSCP()
    yield pacs
    pacs.close()


def test_dcmtk_tools_that_die_before_connecting_are_local_failures(
        tmp_path: Path, dcmtk: Path, scp: ScriptedSCP) -> None:
    engine = _broken_dcmtk(tmp_path / "bin")
    ct_series(tmp_path / "ct", 2)
    files = sorted((tmp_path / "ct").iterdir())
    dest = Destination("pacs", "SCRIPTED", "127.0.0.1", scp.port)
    results = list(engine.send(files, dest, "DICOMRELAY", 10))
    assert [r.outcome for r in results] == [Outcome.RETRY] * 2
    assert all(r.local_failure for r in results)
    assert results[0].detail.startswith("local tool failure: dcmsend stopped before "
                                        "connecting (exit 127): dcmsend: error while loading")
    with pytest.raises(ToolFailure, match="echoscu stopped before connecting.*libdcmnet"):
        engine.echo(dest, "DICOMRELAY", 10)
    # Over TLS it is storescu that runs.
    tls_dest = Destination("pacs", "SCRIPTED", "127.0.0.1", scp.port,
                           tls=TLSConfig(require_peer_certificate=False))
    [first, _] = engine.send(files, tls_dest, "DICOMRELAY", 10)
    assert first.local_failure and "storescu stopped before connecting" in first.detail
    assert scp.received == []


def test_a_dcmtk_tool_removed_since_start_up_is_a_local_failure(
        tmp_path: Path, dcmtk: Path, scp: ScriptedSCP) -> None:
    folder = tmp_path / "bin"
    folder.mkdir()
    for tool in ("dcmsend", "echoscu", "storescu"):
        shutil.copy(DCMTK_BIN / tool, folder / tool)
    engine = DcmtkEngine(folder)
    ct_series(tmp_path / "ct", 1)
    dest = Destination("pacs", "SCRIPTED", "127.0.0.1", scp.port)
    [ok] = engine.send(sorted((tmp_path / "ct").iterdir()), dest, "DICOMRELAY", 10)
    assert ok.outcome is Outcome.DELIVERED
    for tool in ("dcmsend", "echoscu"):
        (folder / tool).unlink()
    [result] = engine.send(sorted((tmp_path / "ct").iterdir()), dest, "DICOMRELAY", 10)
    assert result.local_failure and "cannot run" in result.detail
    with pytest.raises(ToolFailure, match="cannot run .*echoscu"):
        engine.echo(dest, "DICOMRELAY", 10)


def test_a_refused_connection_is_still_the_destination_for_dcmtk(
        tmp_path: Path, dcmtk: Path) -> None:
    engine = DcmtkEngine(DCMTK_BIN)
    ct_series(tmp_path / "ct", 1)
    dest = Destination("down", "NOBODY", "127.0.0.1", free_port())
    [result] = engine.send(sorted((tmp_path / "ct").iterdir()), dest, "DICOMRELAY", 10)
    assert result.outcome is Outcome.RETRY and not result.local_failure
    with pytest.raises(Exception, match="refused") as info:
        engine.echo(dest, "DICOMRELAY", 10)
    assert not isinstance(info.value, ToolFailure)


def test_embedded_tls_files_gone_since_start_up_are_a_local_failure(
        tmp_path: Path, scp: ScriptedSCP) -> None:
    ct_series(tmp_path / "ct", 1)
    dest = Destination("pacs", "SCRIPTED", "127.0.0.1", scp.port,
                       tls=TLSConfig(ca=tmp_path / "removed-ca.pem"))
    engine = EmbeddedEngine()
    [result] = engine.send(sorted((tmp_path / "ct").iterdir()), dest, "DICOMRELAY", 10)
    assert result.outcome is Outcome.RETRY and result.local_failure
    assert "cannot load pacs's TLS files" in result.detail
    with pytest.raises(ToolFailure, match="TLS files"):
        engine.echo(dest, "DICOMRELAY", 10)


def test_the_sender_logs_a_local_failure_with_the_tools_words_and_keeps_the_queue(
        tmp_path: Path, dcmtk: Path, scp: ScriptedSCP, caplog: pytest.LogCaptureFixture) -> None:
    dest = Destination("pacs", "SCRIPTED", "127.0.0.1", scp.port)
    spool = Spool(tmp_path / "spool", ["pacs"])
    spool.create()
    ct_series(spool.out / "pacs", 3)
    sender = DestinationSender(spool, dest, _broken_dcmtk(tmp_path / "bin"), SenderConfig(),
                               events=logged_events())
    sender.load_backlog()
    with caplog.at_level(logging.WARNING, logger="relay.send"):
        sender.send_batch(sender._next_batch())
    assert len(list((spool.out / "pacs").iterdir())) == 3
    assert not any(spool.failed.rglob("*"))
    assert "local tool failure: dcmsend stopped before connecting (exit 127)" in caplog.text
    assert "libdcmnet.so.17" in caplog.text and "not the destination's fault" in caplog.text
    assert "unavailable" not in caplog.text


def test_an_engine_that_raises_does_not_end_the_sender(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    class Crashing(EmbeddedEngine):
        def send(self, files, destination, calling_ae, timeout,  # noqa: ANN001, ANN202
                 keep_open=False):  # noqa: ANN001
            raise RuntimeError("a bug in an adapter")
            yield  # a generator, as the real ones

    dest = Destination("pacs", "SCRIPTED", "127.0.0.1", free_port())
    spool = Spool(tmp_path / "spool", ["pacs"])
    spool.create()
    ct_series(spool.out / "pacs", 2)
    sender = DestinationSender(spool, dest, Crashing(), SenderConfig())
    sender.load_backlog()
    with caplog.at_level(logging.ERROR, logger="relay.send"):
        results = sender.send_batch(sender._next_batch())
    assert all(r.local_failure and "RuntimeError: a bug in an adapter" in r.detail
               for r in results)
    assert len(results) == 2 and len(list((spool.out / "pacs").iterdir())) == 2
    assert "pacs: the embedded sender failed" in caplog.text
