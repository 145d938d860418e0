"""DICOMweb (STOW-RS) destinations.

End to end on every engine against a real server: Orthanc with its DICOMweb plugin (Debian's
orthanc-dicomweb), a DCMTK modality, checked over Orthanc's REST API. Statuses Orthanc
cannot be made to give (4xx, 5xx with Retry-After, 409, partial success with warnings and
failures, 401) from a scripted HTTP server, through the real sender and spool. Unit: the
streamed multipart body, request bounds, Retry-After, response → outcome, config errors."""

from __future__ import annotations

import email
import email.policy
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dicomdata import MIXED, NON_IMAGES, ct_series, mixed_study
from peers import (
    EG_RULE,
    ENGINES,
    Orthanc,
    RelayProcess,
    ScriptedStow,
    dcmsend,
    free_port,
    logged_events,
    spool_files,
    stow_response,
    wait_until,
)
from relay.config.load import load_config
from relay.config.model import ConfigError, Destination, SenderConfig
from relay.send.results import DestinationUnavailable, Outcome
from relay.send.sender import DestinationSender
from relay.send.stow import (
    MultipartBody,
    Part,
    StowSender,
    request_groups,
    results_from_response,
    retry_after,
)
from relay.spool import Spool


def stow_config(path: Path, *, port: int, spool: Path, url: str, engine: str = "embedded",
                extra: str = "", dest_extra: str = "") -> Path:
    path.write_text(f"""
[receiver]
host = "127.0.0.1"
port = {port}

[spool]
path = "{spool}"

[toolkit]
engine = "{engine}"
{_dcm4che_home(engine)}

[sender]
retry_initial = 0.2
retry_max = 1.0
timeout = 10

{extra}

[[destinations]]
name = "archive"
url = "{url}"
{dest_extra}

{EG_RULE}
""")
    return path


def _dcm4che_home(engine: str) -> str:
    from peers import DCM4CHE_HOME

    return f'dcm4che_home = "{DCM4CHE_HOME}"' if engine == "dcm4che" and DCM4CHE_HOME else ""


def _failed(spool: Path) -> dict[str, dict[str, Any]]:
    """Quarantined object name → its sidecar."""
    return {p.name.removesuffix(".json"): json.loads(p.read_text())
            for p in (spool / "failed").rglob("*.json")}


# --- end to end with Orthanc's DICOMweb plugin ---------------------------------------------

@pytest.mark.e2e
@pytest.mark.parametrize("engine", ENGINES)
def test_a_mixed_set_reaches_orthanc_by_stow_rs_rewritten(tmp_path: Path, dcmtk: Path,
                                                         engine: str) -> None:
    archive = Orthanc(tmp_path / "archive", dicomweb=True).start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = stow_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                      url=archive.dicomweb_url)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        sent = mixed_study(tmp_path / "study", MIXED + NON_IMAGES)
        assert dcmsend(sorted((tmp_path / "study").iterdir()), port,
                       "DICOMRELAY").returncode == 0
        wait_until(lambda: archive.count() >= len(sent), 60, what="all at the archive")
        tags = archive.tags_by_sop_uid()
        assert set(tags) == set(sent)
        for uid, info in sent.items():
            assert tags[uid]["PatientID"] == info["ethnic_group"], info["source"]
        wait_until(lambda: not spool_files(spool, "out") and not spool_files(spool, "incoming"),
                   20, what="spool empty")
        assert spool_files(spool, "failed") == []
        audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
        delivered = [a for a in audit if a["step"] == "delivered"]
        assert len(delivered) == len(sent)
        assert {(a["kind"], a["http_status"]) for a in delivered} == {("dicomweb", 200)}
    finally:
        assert relay.stop() == 0
        archive.close()


@pytest.mark.e2e
def test_archive_down_then_up_gets_everything(tmp_path: Path, dcmtk: Path) -> None:
    archive = Orthanc(tmp_path / "archive", dicomweb=True)  # configured, not started
    port = free_port()
    spool = tmp_path / "spool"
    cfg = stow_config(tmp_path / "relay.toml", port=port, spool=spool,
                      url=archive.dicomweb_url)
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        uids = ct_series(tmp_path / "ct", 15)
        assert dcmsend(sorted((tmp_path / "ct").iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(spool_files(spool, "out/archive")) == 15, 30, what="queued")
        wait_until(lambda: relay.output().count("archive unavailable") >= 2, 30,
                   what="retried while down")
        assert "Connection refused" in relay.output()
        archive.start()
        wait_until(lambda: archive.count() == 15, 60, what="delivered once up")
        assert set(archive.tags_by_sop_uid()) == set(uids)
        wait_until(lambda: not spool_files(spool, "out"), 20, what="out/ empty")
    finally:
        assert relay.stop() == 0
        archive.close()


@pytest.mark.e2e
def test_a_300_instance_study_goes_in_bounded_memory(tmp_path: Path, dcmtk: Path) -> None:
    """300 objects of 1 MB each (300 MB): the relay's peak memory stays far below what one
    request (64 MB) or the study would take in memory."""
    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    from dicomdata import bundled

    archive = Orthanc(tmp_path / "archive", dicomweb=True).start()
    port = free_port()
    spool = tmp_path / "spool"
    cfg = stow_config(tmp_path / "relay.toml", port=port, spool=spool,
                      url=archive.dicomweb_url)
    folder = tmp_path / "big"
    folder.mkdir()
    template = dcmread(bundled("CT_small.dcm"))
    template.Rows, template.Columns = 512, 1024
    rng = np.random.default_rng(7)
    template.PixelData = rng.integers(0, 4096, (512, 1024), dtype=np.uint16).tobytes()
    template.StudyInstanceUID = generate_uid()
    uids = []
    for i in range(300):
        template.SOPInstanceUID = generate_uid()
        template.file_meta.MediaStorageSOPInstanceUID = template.SOPInstanceUID
        template.InstanceNumber = i + 1
        template.save_as(folder / f"{i:03d}.dcm", enforce_file_format=False)
        uids.append(template.SOPInstanceUID)
    total = sum(p.stat().st_size for p in folder.iterdir())
    relay = RelayProcess(cfg, tmp_path).start(port)
    try:
        assert dcmsend(sorted(folder.iterdir()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: archive.count() == 300, 240, interval=1, what="300 at the archive")
        assert set(archive.tags_by_sop_uid()) == set(uids)
        wait_until(lambda: not spool_files(spool, "out"), 30, what="out/ empty")
        assert relay.proc is not None
        status = Path(f"/proc/{relay.proc.pid}/status").read_text()
        peak = int(next(line.split()[1] for line in status.splitlines()
                        if line.startswith("VmHWM:"))) * 1024
    finally:
        assert relay.stop() == 0
        archive.close()
    print(f"\n300 x {total / 300 / 1e6:.1f} MB by STOW-RS: relay peak RSS {peak / 1e6:.0f} MB "
          f"for {total / 1e6:.0f} MB sent")
    assert peak < 200e6 < total, "the study was never held in memory"


# --- statuses Orthanc cannot be made to give: a scripted STOW-RS server --------------------

def _queued(spool: Spool, folder: Path, count: int) -> dict[str, Path]:
    """count CT objects queued for 'archive'; SOP Instance UID → path."""
    uids = ct_series(folder, count)
    out = {}
    for uid, path in zip(uids, sorted(folder.iterdir()), strict=True):
        target = spool.outbox("archive") / path.name
        path.rename(target)
        out[uid] = target
    return out


def _sender(spool: Spool, url: str, clock: Callable[[], float] = time.monotonic,
            **dest: Any) -> DestinationSender:
    destination = Destination("archive", "", "127.0.0.1", 0, url=url, **dest)
    return DestinationSender(spool, destination, StowSender(),
                             SenderConfig(retry_initial=0.1, retry_max=5.0, timeout=5),
                             events=logged_events(), clock=clock)


class FakeClock:
    """The sender's monotonic clock, moved by the test (no sleeping, no wall-clock assert)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", ["archive"]).create()


def test_partial_success_each_object_ends_where_the_rules_say(tmp_path: Path,
                                                              spool: Spool) -> None:
    queued = _queued(spool, tmp_path / "ct", 5)
    ok, warned, busy, refused, unlisted = list(queued)
    server = ScriptedStow(lambda n, uids: (202, stow_response(
        stored=[ok, warned], warnings={warned: 0xB000},
        failed={busy: 0xA700, refused: 0xC000}), {}))
    try:
        sender = _sender(spool, server.url)
        sender.load_backlog()
        results = {r.path: r for r in sender.send_batch(sender._next_batch())}
    finally:
        server.close()
    assert not queued[ok].exists() and not queued[warned].exists()  # delivered
    assert results[queued[warned]].status == 0xB000
    assert queued[busy].exists() and queued[unlisted].exists()  # retried later
    assert results[queued[busy]].outcome is Outcome.RETRY
    assert results[queued[unlisted]].outcome is Outcome.RETRY
    failed = _failed(spool.root)
    [(name, sidecar)] = failed.items()
    assert name.endswith(queued[refused].name) and sidecar["reason"] == "status-C000"
    assert "HTTP 202" in sidecar["detail"] and "FailureReason 0xC000" in sidecar["detail"]
    assert server.received == [list(queued)]


@pytest.mark.parametrize(("status", "body", "reason", "words"), [
    (400, {"Message": "Bad multipart"}, "http-400", "HTTP 400: Bad multipart"),
    (415, b"Unsupported Media Type", "http-415", "HTTP 415: Unsupported Media Type"),
    (401, None, "http-401", "token_file"),
    (403, {"Message": "forbidden for this user"}, "http-403", "token_file"),
    (409, "all-failed", "status-0122", "FailureReason 0x0122"),
])
def test_client_errors_go_to_failed_with_the_servers_words(
        tmp_path: Path, spool: Spool, status: int, body: Any, reason: str, words: str) -> None:
    queued = _queued(spool, tmp_path / "ct", 2)
    token = tmp_path / "token"
    token.write_text("s3cret\n")

    def script(n: int, uids: list[str]) -> tuple[int, Any, dict[str, str]]:
        if body == "all-failed":
            return status, stow_response(failed=dict.fromkeys(uids, 0x0122)), {}
        return status, body, {}

    server = ScriptedStow(script)
    try:
        sender = _sender(spool, server.url, token_file=token)
        sender.load_backlog()
        sender.send_batch(sender._next_batch())
    finally:
        server.close()
    assert server.auth == ["Bearer s3cret"]
    assert not any(p.exists() for p in queued.values())
    failed = _failed(spool.root)
    assert len(failed) == 2
    for sidecar in failed.values():
        assert sidecar["reason"] == reason and words in sidecar["detail"], sidecar
        assert sidecar["destination"] == "archive"


def test_busy_server_is_retried_after_what_it_said(tmp_path: Path, spool: Spool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    queued = _queued(spool, tmp_path / "ct", 3)
    answers = [(503, {"Message": "busy"}, {"Retry-After": "2"}),
               (429, None, {"Retry-After": "1"}),
               (200, None, {})]
    server = ScriptedStow(lambda n, uids: answers[n] if n < len(answers) else answers[-1])
    clock = FakeClock()
    sender = _sender(spool, server.url, clock=clock)
    sender.load_backlog()

    def due() -> list[Path]:  # what the sender would send now, without waiting
        return sender._next_batch(idle_limit=0)

    try:
        with caplog.at_level("WARNING", logger="relay.send"):
            clock.now += sender.batch_wait
            first = sender.send_batch(due())
            assert all(r.outcome is Outcome.RETRY and r.retry_after == 2.0 for r in first)
            assert len(server.received) == 1
            clock.now += 1.99
            assert due() == [], "Retry-After: 2 honoured (the backoff alone is 0.1 s)"
            clock.now += 0.01
            second = sender.send_batch(due())
            assert [r.retry_after for r in second] == [1.0] * 3
            clock.now += 0.99
            assert due() == [], "Retry-After: 1 honoured"
            clock.now += 0.01
            sender.send_batch(due())
    finally:
        server.close()
    assert not any(p.exists() for p in queued.values()), "delivered on the third request"
    assert [len(r) for r in server.received] == [3, 3, 3]
    assert "next try in 2.0 s" in caplog.text and "HTTP 503: busy" in caplog.text


def test_echo_names_the_credentials_on_401(tmp_path: Path) -> None:
    server = ScriptedStow(lambda n, uids: (401, {"Message": "token expired"}, {}))
    password = tmp_path / "password"
    password.write_text("pw\n")
    try:
        dest = Destination("archive", "", "127.0.0.1", 0, url=server.url, username="relay",
                           password_file=password)
        with pytest.raises(DestinationUnavailable, match=r"HTTP 401 token expired.*username "
                                                         r"and password_file"):
            StowSender().echo(dest, "X", 5)
        assert server.auth[0].startswith("Basic ")
    finally:
        server.close()


@pytest.mark.e2e
def test_cli_echo_and_check_a_dicomweb_destination(tmp_path: Path) -> None:
    archive = Orthanc(tmp_path / "archive", dicomweb=True).start()
    cfg = stow_config(tmp_path / "relay.toml", port=free_port(), spool=tmp_path / "spool",
                      url=archive.dicomweb_url)
    try:
        echo = subprocess.run([sys.executable, "-m", "relay", "echo", "--config", str(cfg)],
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        archive.close()
    assert echo.returncode == 0, echo.stdout + echo.stderr
    assert f"ok   archive ({archive.dicomweb_url}, QIDO-RS)" in echo.stdout
    down = subprocess.run([sys.executable, "-m", "relay", "echo", "--config", str(cfg)],
                          capture_output=True, text=True, timeout=60, check=False)
    assert down.returncode == 1 and "Connection refused" in down.stdout


# --- unit ------------------------------------------------------------------------------------

def test_the_body_is_multipart_related_streamed_with_its_length(tmp_path: Path) -> None:
    ct_series(tmp_path / "ct", 3)
    paths = sorted((tmp_path / "ct").iterdir())
    parts = [Part(p, str(i), p.stat().st_size) for i, p in enumerate(paths)]
    body = MultipartBody(parts, "b0undary")
    data = b"".join(body)
    assert len(data) == len(body)
    assert body.content_type == 'multipart/related; type="application/dicom"; boundary=b0undary'
    message = email.message_from_bytes(
        f"Content-Type: {body.content_type}\r\n\r\n".encode() + data, policy=email.policy.HTTP)
    payloads = [part.get_payload(decode=True) for part in message.iter_parts()]
    assert payloads == [p.read_bytes() for p in paths]
    assert all(part.get_content_type() == "application/dicom" for part in message.iter_parts())


def test_requests_are_bounded_by_count_and_bytes() -> None:
    parts = [Part(Path(f"{i}"), str(i), 10) for i in range(25)]
    assert [len(g) for g in request_groups(parts, max_bytes=1000, max_count=10)] == [10, 10, 5]
    assert [len(g) for g in request_groups(parts, max_bytes=35, max_count=100)] == [3] * 8 + [1]
    big = [Part(Path("a"), "a", 500), Part(Path("b"), "b", 5)]
    assert [len(g) for g in request_groups(big, max_bytes=100)] == [1, 1]


def test_retry_after_takes_seconds_or_a_date() -> None:
    assert retry_after("120") == 120.0
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412420.0) == 60.0
    assert retry_after("soon") is None and retry_after(None) is None


def _parts(*uids: str) -> list[Part]:
    return [Part(Path(f"{u}.dcm"), u, 1) for u in uids]


def test_a_200_stores_every_instance_listed_or_not() -> None:
    results = results_from_response(_parts("1", "2"), 200, stow_response(stored=["1"]), "",
                                    "token_file")
    assert [r.outcome for r in results] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert {r.http_status for r in results} == {200}


def test_server_errors_are_retried_with_their_wait() -> None:
    for status in (500, 502, 503, 504, 429, 408):
        results = results_from_response(_parts("1"), status, None, "busy", "k", wait=30)
        assert results[0].outcome is Outcome.RETRY and results[0].retry_after == 30
        assert results[0].status is None and results[0].status_text == f"HTTP {status}"


def test_a_409_fails_what_it_lists_and_what_it_does_not() -> None:
    results = results_from_response(_parts("1", "2"), 409,
                                    stow_response(failed={"1": 0xA700}), "", "k")
    assert [r.outcome for r in results] == [Outcome.RETRY, Outcome.FAILED]


WEB = 'url = "https://a.example/x"\n'
DIMSE = 'ae_title = "A"\nhost = "h"\nport = 104\n'


@pytest.mark.parametrize(("table", "message"), [
    (WEB + 'host = "x"', "[[destinations]][0].host: expected no DIMSE key"),
    ('url = "ftp://a.example/x"', "[[destinations]][0].url: expected an http:// or https:// URL"),
    ('url = "https://a.example/x?y=1"', "[[destinations]][0].url: expected an http"),
    (WEB + 'token_file = "nope.token"', "token_file: expected an existing file"),
    (WEB + 'username = "u"', "password_file: expected it with username"),
    (WEB + 'transcode = "on-refusal"', "transcode: expected no DIMSE key"),
    (DIMSE + 'token_file = "t"', "token_file: expected it only with url"),
    (DIMSE + 'transcode = "always"', "transcode: expected one of 'never', 'on-refusal'"),
])
def test_dicomweb_config_errors_name_the_key(tmp_path: Path, table: str, message: str) -> None:
    cfg = tmp_path / "relay.toml"
    cfg.write_text(f'[[destinations]]\nname = "d"\n{table}\n')
    with pytest.raises(ConfigError, match="relay.toml: ") as info:
        load_config(cfg)
    assert message in str(info.value)


def test_a_dicomweb_destination_loads(tmp_path: Path) -> None:
    (tmp_path / "cloud.token").write_text("t")
    cfg = tmp_path / "relay.toml"
    cfg.write_text('[[destinations]]\nname = "cloud"\nurl = "https://a.example/dicom-web/"\n'
                   'token_file = "cloud.token"\n[destinations.tls]\nca = "ca.pem"\n')
    (tmp_path / "ca.pem").write_text("-----BEGIN CERTIFICATE-----\n")
    [dest] = load_config(cfg).destinations
    assert dest.kind == "dicomweb" and dest.url == "https://a.example/dicom-web"
    assert dest.token_file == tmp_path / "cloud.token" and dest.tls is not None
    assert dest.host == "a.example" and dest.port == 443
