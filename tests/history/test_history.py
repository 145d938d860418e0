"""The history: written off the delivery path, never blocking or losing an object, caught
up after its database was down; one history for several relays on PostgreSQL; filled from
an audit log."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from console.studies import study
from console.test_api import Api, token
from pydicom import dcmread
from sqlalchemy import func, select
from sqlalchemy.exc import OperationalError

from peers import (
    EG_RULE,
    PostgreSQL,
    RelayProcess,
    ScriptedSCP,
    dcmsend,
    free_port,
    relay_config,
    wait_until,
)
from relay.events import Delivered, Identity, Queued, Received, Routed
from relay.history.schema import events, studies
from relay.history.store import HistoryStore, sqlite_url
from relay.history.writer import HistoryWriter


def _object_events(n: int, study_uid: str = "1.2.3") -> list[object]:
    out: list[object] = []
    for i in range(n):
        obj = f"{study_uid}~{i}.dcm"
        ident = Identity(sop_instance_uid=f"{study_uid}.{i}", study_instance_uid=study_uid,
                         patient_id="P1", patient_name="Doe^Jane", accession_number="A1")
        out += [Received(obj=obj, identity=ident, calling_ae="CT", size=100,
                         arrived=time.time(), transfer_syntax="1.2.840.10008.1.2.1"),
                Routed(obj=obj, to=("pacs",), not_to={}, refused_by={}),
                Queued(obj=obj, destination="pacs"),
                Delivered(obj=obj, destination="pacs", status="0x0000")]
    return out


def test_a_database_that_fails_keeps_the_history_aside_and_catches_up(tmp_path: Path) -> None:
    store = HistoryStore(sqlite_url(tmp_path / "h.sqlite"), "r1")
    backlog = tmp_path / "history-backlog.jsonl"
    writer = HistoryWriter(store, backlog, retry=0)
    real_apply = store.apply
    failures = {"left": 2}

    def failing_apply(ops):  # noqa: ANN001, ANN202 - a database that is down, twice
        if failures["left"]:
            failures["left"] -= 1
            raise OperationalError("INSERT", {}, Exception("database is down"))
        return real_apply(ops)

    store.apply = failing_apply  # type: ignore[method-assign]
    first, second = _object_events(3), _object_events(2, "1.2.4")
    for e in first:
        writer.take(e)  # type: ignore[arg-type]
    writer.flush()
    assert backlog.exists() and writer.written == 0  # aside, in order
    for e in second:
        writer.take(e)  # type: ignore[arg-type]
    writer.flush()  # fails again: appended after the first batch
    lines = backlog.read_text().splitlines()
    # 7 operations per object (received: object + line; routed; queued, delivered: state +
    # line), 3 + 2 objects, the first batch first.
    assert len(lines) == 7 * 5
    assert [json.loads(line)[1]["obj"] for line in lines[::7]] == [
        "1.2.3~0.dcm", "1.2.3~1.dcm", "1.2.3~2.dcm", "1.2.4~0.dcm", "1.2.4~1.dcm"]
    writer.flush()  # answers: the backlog goes in, oldest first, and the file goes
    assert not backlog.exists()
    assert {r.study_instance_uid: r.destinations["pacs"]["delivered"]
            for r in store.search("P1")} == {"1.2.3": 3, "1.2.4": 2}
    with store.engine.connect() as conn:
        steps = [r[0] for r in conn.execute(select(events.c.step).order_by(events.c.id))]
    assert steps == ["received", "routed", "queued", "delivered"] * 5
    writer.stop()


def test_a_late_batch_never_undoes_a_later_state(tmp_path: Path) -> None:
    store = HistoryStore(sqlite_url(tmp_path / "h.sqlite"), "r1")
    store.upgrade()
    received, routed, queued, delivered = _object_events(1)
    store.apply([*HistoryWriter(store, tmp_path / "b").ops(received),
                 *HistoryWriter(store, tmp_path / "b").ops(delivered)])
    store.apply(HistoryWriter(store, tmp_path / "b").ops(queued))  # replayed late
    assert store.search("P1")[0].destinations["pacs"]["delivered"] == 1


def test_prune_forgets_what_is_older_than_keep_days(tmp_path: Path) -> None:
    store = HistoryStore(sqlite_url(tmp_path / "h.sqlite"), "r1")
    store.upgrade()
    writer = HistoryWriter(store, tmp_path / "b")
    old = [e for e in _object_events(2, "1.2.9")]
    store.apply([op for e in old for op in writer.ops(e)])
    cut = time.time() + 1
    store.apply([op for e in _object_events(1, "1.2.10") for op in writer.ops(e)])
    with store.engine.begin() as conn:  # the second study happened later
        conn.execute(studies.update().where(studies.c.study_instance_uid == "1.2.10")
                     .values(last_event=cut + 10))
        conn.execute(events.update().where(events.c.obj == "1.2.10~0.dcm")
                     .values(time=cut + 10))
    assert store.prune(cut) > 0
    assert [s.study_instance_uid for s in store.search("")] == ["1.2.10"]
    assert store.revision() == "0002"
    store.upgrade()  # in place, twice: nothing to do
    assert store.revision() == "0002"


def test_an_older_schema_is_upgraded_in_place_with_its_history(tmp_path: Path) -> None:
    from alembic import command
    from alembic.config import Config
    from sqlalchemy import inspect

    from relay.history.store import MIGRATIONS

    store = HistoryStore(sqlite_url(tmp_path / "h.sqlite"), "r1")
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    with store.engine.begin() as conn:  # a history written by the first release
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "0001")
    writer = HistoryWriter(store, tmp_path / "b")
    store.apply([op for e in _object_events(3) for op in writer.ops(e)])
    assert store.revision() == "0001"
    store.upgrade()  # what a start does
    assert store.revision() == "0002"
    indexes = {i["name"] for i in inspect(store.engine).get_indexes("events")}
    assert {"ix_events_destination_step_time", "ix_events_step_time"} <= indexes
    assert store.search("P1")[0].destinations["pacs"]["delivered"] == 3


def _relay(tmp: Path, name: str, scp: ScriptedSCP, extra: str) -> tuple[RelayProcess, int, Path]:
    port = free_port()
    config = relay_config(tmp / f"{name}.toml", port=port, spool=tmp / f"spool-{name}",
                          destinations=[("pacs", "PACS", scp.port)], rules=EG_RULE,
                          extra=extra)
    return RelayProcess(config, tmp).start(port), port, config


@pytest.mark.e2e
def test_two_relays_share_one_history_and_survive_it_going_down(
        tmp_path: Path, postgresql: PostgreSQL) -> None:
    scp = ScriptedSCP(ae_title="PACS")
    consoles = {name: free_port() for name in ("r1", "r2")}
    relays = {}
    try:
        for name in ("r1", "r2"):
            extra = (f'[history]\nurl = "{postgresql.url}"\nrelay_name = "{name}"\n'
                     f'[console]\nlisten = "127.0.0.1:{consoles[name]}"\n')
            relays[name] = _relay(tmp_path, name, scp, extra)
        api = {name: Api(consoles[name], token(relays[name][2], f"check-{name}", "viewer"))
               for name in relays}
        uid1, files1 = study(tmp_path / "s1", 3, patient_id="R1", ethnic_group="S1",
                             name="Uno^Ana", accession="A-1")
        uid2, files2 = study(tmp_path / "s2", 2, patient_id="R2", ethnic_group="S2",
                             name="Dos^Ana", accession="A-2")
        assert dcmsend(files1, relays["r1"][1], "DICOMRELAY").returncode == 0
        assert dcmsend(files2, relays["r2"][1], "DICOMRELAY").returncode == 0

        def both_delivered(name: str) -> bool:
            answer = api[name].get("/studies", q="")
            if answer.status_code == 503:  # the other relay is creating the tables
                return False
            assert answer.status_code == 200, answer.text
            found = {s["study_instance_uid"]: s for s in answer.json()["studies"]}
            return (found.get(uid1, {}).get("destinations", {}).get("pacs", {})
                    .get("delivered") == 3 and
                    found.get(uid2, {}).get("destinations", {}).get("pacs", {})
                    .get("delivered") == 2)

        for name in ("r1", "r2"):  # each console shows both relays' studies
            wait_until(lambda n=name: both_delivered(n), 30, what=f"both studies on {name}")
        # A name's beginning, any case, under the cluster's collation.
        for q in ("dos", "DOS^a", "Dos^Ana"):
            assert [s["study_instance_uid"] for s in
                    api["r1"].get("/studies", q=q).json()["studies"]] == [uid2], q
        timeline = api["r1"].get(f"/studies/{uid2}").json()["events"]
        assert {e["relay"] for e in timeline} == {"r2"}

        # The database stops in the middle of a study: relaying goes on, nothing is lost,
        # and the history catches up once it is back.
        uid3, files3 = study(tmp_path / "s3", 10, patient_id="R3", ethnic_group="S3",
                             name="Tres^Ana", accession="A-3")
        assert dcmsend(files3[:4], relays["r1"][1], "DICOMRELAY").returncode == 0
        postgresql.stop("immediate")
        assert dcmsend(files3[4:], relays["r1"][1], "DICOMRELAY").returncode == 0
        sop3 = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files3}
        wait_until(lambda: sop3 <= set(scp.received), 60, what="all 10 at the PACS")
        backlog = tmp_path / "spool-r1" / "history-backlog.jsonl"
        wait_until(backlog.exists, 30, what="the history kept aside")
        assert requests.get(f"{api['r1'].base}/queues", headers=api["r1"].headers,
                            timeout=30).status_code == 200  # the console still answers
        postgresql.start()

        def caught_up() -> bool:
            s = api["r2"].get("/studies", q="R3").json()["studies"]
            return bool(s) and s[0]["destinations"]["pacs"]["delivered"] == 10
        wait_until(caught_up, 60, what="the history caught up (seen from r2)")
        wait_until(lambda: not backlog.exists(), 30, what="the backlog written")
        received = [e for e in api["r2"].get(f"/studies/{uid3}").json()["events"]
                    if e["step"] == "received"]
        assert len(received) == 10
    finally:
        for relay, _port, _config in relays.values():
            relay.stop()
        scp.close()


@pytest.mark.e2e
def test_history_import_fills_the_timeline_from_an_audit_log(tmp_path: Path) -> None:
    scp = ScriptedSCP(ae_title="PACS")
    try:
        relay, port, config = _relay(tmp_path, "r", scp, "[history]\nenabled = false\n")
        _uid, files = study(tmp_path / "s", 3, patient_id="IMP", ethnic_group="IMP-S",
                            name="Imp^Ana", accession="A-I")
        assert dcmsend(files, port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len(set(scp.received)) == 3, 30, what="3 at the PACS")
        relay.stop()
    finally:
        scp.close()
    spool = tmp_path / "spool-r"
    assert not (spool / "history.sqlite").exists()
    audit = spool / "audit.jsonl"
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    config.write_text(config.read_text().replace("enabled = false", "enabled = true"))
    (tmp_path / "junk.jsonl").write_text(audit.read_text() + "not json\n")
    done = subprocess.run([sys.executable, "-m", "relay", "history", "import",
                           str(tmp_path / "junk.jsonl"), "--config", str(config)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr
    assert f"{len(lines)} audit line(s) imported into the history, 1 skipped" in done.stdout
    assert "junk.jsonl:" in done.stderr and "not an audit line" in done.stderr
    assert "alembic" not in done.stderr, "the history's schema tool stays quiet"
    store = HistoryStore(sqlite_url(spool / "history.sqlite"), "imported")
    with store.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(events)).scalar() == len(lines)
    for obj in {line["object"] for line in lines if line["step"] == "delivered"}:
        row = HistoryStore(sqlite_url(spool / "history.sqlite"),
                           _relay_name(config)).object(obj)
        assert row is not None and row["sop_instance_uid"]


def _relay_name(config: Path) -> str:
    from relay.config.load import load_config

    return load_config(config).relay_name
