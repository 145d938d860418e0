"""Spool transitions: every move is a rename; nothing is ever dropped."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from relay.ops.metrics import spool_figures
from relay.spool import Failure, Spool, is_ready, safe_name


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    return Spool(tmp_path / "spool", ["central", "backup"]).create()


def _incoming(spool: Spool, data: bytes = b"DICM-ish") -> Path:
    return spool.write_incoming(safe_name("1.2.3"), data)


def test_folders_are_private(spool: Spool) -> None:
    for folder in (spool.root, spool.incoming, spool.work, spool.out, spool.failed,
                   spool.outbox("central")):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    path = _incoming(spool)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_safe_name_never_escapes() -> None:
    for hostile in ["../../x", "/etc/passwd", "1.2/../../3", "", None, "1.2.3\x00", "a" * 300]:
        name = safe_name(hostile)
        assert "/" not in name and not name.startswith(".")
    assert safe_name("1.2.840.1").startswith("1.2.840.1~")
    assert safe_name("1.2.3") != safe_name("1.2.3"), "two copies never overwrite each other"


def test_partial_files_are_not_ready(spool: Spool) -> None:
    partial = spool.partial_path("x.dcm")
    partial.write_bytes(b"half")
    assert not is_ready(partial)
    assert spool.ready_incoming() == []
    final = spool.commit_incoming(partial, "x.dcm")
    assert spool.ready_incoming() == [final]


def test_claim_is_exclusive(spool: Spool) -> None:
    path = _incoming(spool)
    claimed = spool.claim(path)
    assert claimed is not None and claimed.parent == spool.work
    assert spool.claim(path) is None


def test_publish_links_into_every_destination(spool: Spool) -> None:
    claimed = spool.claim(_incoming(spool, b"original"))
    assert claimed is not None
    edited = spool.edited_path(claimed)
    edited.write_bytes(b"edited")
    queued = spool.publish(claimed, edited)
    assert [p.parent.name for p in queued] == ["central", "backup"]
    assert all(p.read_bytes() == b"edited" for p in queued)
    assert list(spool.work.iterdir()) == []
    assert spool.queued("central") == [queued[0]]


def test_publish_without_destinations_refuses(tmp_path: Path) -> None:
    lonely = Spool(tmp_path / "s").create()
    claimed = lonely.claim(lonely.write_incoming("a.dcm", b"x"))
    assert claimed is not None
    edited = lonely.edited_path(claimed)
    edited.write_bytes(b"y")
    with pytest.raises(RuntimeError):
        lonely.publish(claimed, edited)
    assert claimed.exists()


def test_recover_returns_work_to_incoming(spool: Spool) -> None:
    claimed = spool.claim(_incoming(spool))
    assert claimed is not None
    spool.edited_path(claimed).write_bytes(b"half-edited")
    assert spool.recover() == 1
    assert [p.name for p in spool.ready_incoming()] == [claimed.name]
    assert list(spool.work.iterdir()) == []


def test_delivered_removes_only_that_copy(spool: Spool) -> None:
    claimed = spool.claim(_incoming(spool))
    assert claimed is not None
    edited = spool.edited_path(claimed)
    edited.write_bytes(b"e")
    central, backup = spool.publish(claimed, edited)
    spool.delivered(central)
    assert not central.exists() and backup.read_bytes() == b"e"


def test_fail_writes_sidecar_and_retry_requeues(spool: Spool) -> None:
    claimed = spool.claim(_incoming(spool))
    assert claimed is not None
    failed = spool.fail(claimed, Failure("not-dicom", "no DICM prefix", "process"))
    assert failed.parent == spool.failed / "not-dicom"
    sidecar = json.loads(failed.with_name(failed.name + ".json").read_text())
    assert sidecar["reason"] == "not-dicom" and sidecar["detail"] == "no DICM prefix"
    assert sidecar["stage"] == "process" and sidecar["when"].endswith("Z")
    [(path, info)] = list(spool.failures())
    back = spool.requeue(path, info)
    assert back.parent == spool.incoming and not failed.exists()
    assert not failed.with_name(failed.name + ".json").exists()


def test_send_failure_requeues_to_its_destination(spool: Spool) -> None:
    claimed = spool.claim(_incoming(spool))
    assert claimed is not None
    edited = spool.edited_path(claimed)
    edited.write_bytes(b"e")
    central, backup = spool.publish(claimed, edited)
    f1 = spool.fail(central, Failure("status-A900", "0xA900", "send", "central"))
    f2 = spool.fail(backup, Failure("status-A900", "0xA900", "send", "backup"))
    assert f1 != f2, "the same object failing at two destinations keeps both copies"
    for path, info in list(spool.failures()):
        spool.requeue(path, info)
    assert [p.name for p in spool.queued("central")] == [central.name]
    assert [p.name for p in spool.queued("backup")] == [backup.name]


def test_hostile_reason_stays_inside_failed(spool: Spool) -> None:
    path = _incoming(spool)
    failed = spool.fail(path, Failure("../../etc", "x", "process"))
    assert failed.parent.parent == spool.failed


def test_depth(spool: Spool) -> None:
    _incoming(spool)
    _incoming(spool)
    queues, folders, quarantined = spool_figures(spool, ["central", "backup"])
    assert folders == {"receiving": 0, "incoming": 2, "work": 0, "failed": 0}
    assert {q.destination: q.objects for q in queues} == {"central": 0, "backup": 0}
    assert quarantined == {}


def test_unsynced_publish_keeps_the_original_until_committed(spool: Spool,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    import relay.spool as spool_module

    syncs: list[Path] = []
    monkeypatch.setattr(spool_module, "sync_filesystem", syncs.append)
    published = []
    for uid in ("1.2.3", "1.2.4"):
        claimed = spool.claim(spool.write_incoming(safe_name(uid), b"DICM-ish"))
        assert claimed is not None
        edited = spool.edited_path(claimed)
        edited.write_bytes(b"edited")
        spool.publish(claimed, edited, durable=False)
        published.append((claimed, edited))
    # Queued for both destinations at once, but the originals stay until one sync.
    assert len(spool.queued("central")) == 2 and len(spool.queued("backup")) == 2
    assert all(c.exists() and e.exists() for c, e in published)
    spool.commit(published)
    assert syncs == [spool.root], "one sync for the whole group"
    assert not any(c.exists() or e.exists() for c, e in published)
    assert [p.read_bytes() for p in spool.queued("central")] == [b"edited", b"edited"]


def _published_uncommitted(spool: Spool, edit: bytes) -> tuple[Path, Path]:
    """An object claimed, edited and published without the commit (a crash may follow)."""
    claimed = spool.claim(_incoming(spool))
    assert claimed is not None
    edited = spool.edited_path(claimed)
    edited.write_bytes(edit)
    spool.publish(claimed, edited, durable=False)
    return claimed, edited


def test_a_crash_before_commit_repeats_the_edit(spool: Spool) -> None:
    claimed, edited = _published_uncommitted(spool, b"edited")
    # Restart: the original is processed again; the edited copy is rebuilt from it.
    assert spool.recover() == 1
    assert [p.name for p in spool.ready_incoming()] == [claimed.name]
    assert not edited.exists()


def test_an_unchanged_object_published_again_after_a_crash_leaves_no_partial_link(
        spool: Spool) -> None:
    # An unchanged object's edit is a hard link to its original, so after a crash between
    # publish and commit the original comes back as the very file already queued: linking
    # it again must neither fail nor leave a ".part" name in out/<dest>/ (rename(2) between
    # two links to one file does nothing).
    for run in range(2):
        if run:
            assert spool.recover() == 1
        claimed = spool.claim(spool.ready_incoming()[0] if run else _incoming(spool, b"same"))
        assert claimed is not None
        edited = spool.edited_path(claimed)
        os.link(claimed, edited)
        queued = spool.publish(claimed, edited, durable=False)
    for dest in ("central", "backup"):
        assert sorted(p.name for p in spool.outbox(dest).iterdir()) == [claimed.name]
    assert [p.read_bytes() for p in queued] == [b"same", b"same"]
    spool.commit([(claimed, edited)])
    assert list(spool.work.iterdir()) == []
    assert [p.read_bytes() for p in spool.queued("central")] == [b"same"]


def test_an_object_published_again_with_another_edit_replaces_the_queued_copy(
        spool: Spool) -> None:
    _, edited = _published_uncommitted(spool, b"first edit")
    assert spool.recover() == 1
    claimed = spool.claim(spool.ready_incoming()[0])
    assert claimed is not None
    edited.write_bytes(b"second edit (rules reloaded)")
    queued = spool.publish(claimed, edited)
    assert [p.read_bytes() for p in queued] == [b"second edit (rules reloaded)"] * 2
    for dest in ("central", "backup"):
        assert [p.name for p in spool.outbox(dest).iterdir()] == [claimed.name]


def test_a_large_edited_object_is_committed_without_writing_its_original(
        spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large edited object's commit syncs its queued edited copy alone (fdatasync, then the
    outboxes' folders) and drops its original unsynced; small objects and an unchanged large
    one (its copy is its original) go by the group's one syncfs."""
    import relay.spool as spool_module

    syncs: list[Path] = []
    datasyncs: list[int] = []
    monkeypatch.setattr(spool_module, "sync_filesystem", syncs.append)
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: datasyncs.append(os.fstat(fd).st_ino)
                        or real_fdatasync(fd))
    big = b"\0" * spool_module.WRITTEN_ONCE_FROM

    def published(data: bytes, edit: bytes | None) -> tuple[Path, Path]:
        claimed = spool.claim(spool.write_incoming(safe_name("1.2.3"), data))
        assert claimed is not None
        edited = spool.edited_path(claimed)
        if edit is None:
            os.link(claimed, edited)  # unchanged: the original itself is queued
        else:
            edited.write_bytes(edit)
        spool.publish(claimed, edited, durable=False)
        return claimed, edited

    large = published(big, b"edited" + big)
    unchanged = published(big, None)
    small = published(b"DICM-ish", b"edited")
    queued_large = spool.outbox("central") / large[0].name
    spool.commit([large, unchanged, small])
    assert datasyncs == [queued_large.stat().st_ino], "only the large edited copy, alone"
    assert syncs == [spool.root], "the others in one syncfs"
    assert list(spool.work.iterdir()) == []
    assert queued_large.read_bytes() == b"edited" + big
    assert len(spool.queued("central")) == 3 and len(spool.queued("backup")) == 3

    datasyncs.clear()
    syncs.clear()
    spool.commit([published(big, b"another edit" + big)])
    assert len(datasyncs) == 1 and syncs == [], "no syncfs when every object was large"
    assert list(spool.work.iterdir()) == []


def test_delivered_copies_are_kept_for_a_resend_then_pruned(tmp_path: Path) -> None:
    import time

    spool = Spool(tmp_path / "spool", ["pacs", "archive"], keep_delivered=True).create()
    for dest in ("pacs", "archive"):
        (spool.outbox(dest) / "a.dcm").write_bytes(b"DICM")
    os.utime(spool.outbox("archive") / "a.dcm", (1000, 1000))  # received long ago
    spool.delivered(spool.outbox("archive") / "a.dcm")
    assert spool.kept_copy("archive", "a.dcm") is not None
    assert spool.queued("archive") == [] and spool.queued("pacs") != []
    # Kept since it was delivered (now), not since it arrived.
    assert spool.prune_delivered(time.time() - 3600) == 0
    assert spool.resend("archive", "a.dcm") == spool.outbox("archive") / "a.dcm"
    assert spool.kept_copy("archive", "a.dcm") is None
    spool.delivered(spool.outbox("archive") / "a.dcm")
    assert spool.prune_delivered(time.time() + 1) == 1
    assert spool.kept_copy("archive", "a.dcm") is None
    plain = Spool(tmp_path / "plain", ["pacs"]).create()
    (plain.outbox("pacs") / "b.dcm").write_bytes(b"DICM")
    plain.delivered(plain.outbox("pacs") / "b.dcm")
    assert not (plain.root / "delivered").exists()  # the default: deleted at once
