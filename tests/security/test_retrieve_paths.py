"""A PACS's text never chooses where a retrieve writes: DCMTK's getscu in bit-preserving mode
names each file by the PACS's SOP Instance UID unchecked ("../x" writes one folder up, tried
on 3.6.7), so the relay runs it confined to the retrieve's folder with Landlock, and where
the kernel has none, in the mode that makes names safe. Real getscu against a scripted
pynetdicom PACS (the peer that sends such a UID)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as Get

from dicomdata import ct_series
from peers import scripted_get_pacs
from relay.config.model import Destination
from relay.receive import landlock
from relay.receive.supervisor import ToolLines
from relay.toolkits.dcmtk import GetscuRun, find_tool, getscu_argv


@pytest.fixture
def hostile_pacs(tmp_path: Path) -> Iterator[tuple[int, str]]:
    """A PACS answering any C-GET with two objects, the second's UID "../escaped"; yields
    its port and the first object's UID."""
    ct_series(tmp_path / "objects", 2, PatientID="HOSTILE")
    good, bad = (dcmread(p) for p in sorted((tmp_path / "objects").iterdir()))
    bad.SOPInstanceUID = "../escaped"
    server, port = scripted_get_pacs([good, bad])
    yield port, str(good.SOPInstanceUID)
    server.shutdown()


@pytest.mark.parametrize("confined", [True, False], ids=["bit-preserving-confined", "safe-names"])
def test_getscu_writes_nothing_outside_the_retrieve_whatever_the_uid(
        dcmtk: Path, tmp_path: Path, hostile_pacs: tuple[int, str], confined: bool) -> None:
    if confined and not landlock.available():
        pytest.skip("this kernel has no Landlock: the relay uses getscu's safe names (the "
                    "other case of this test)")
    port, good_uid = hostile_pacs
    root = tmp_path / "retrieving"
    folder = root / "get-1"
    folder.mkdir(parents=True)
    query = folder / ".query.dcm"
    identifier = Dataset()
    identifier.QueryRetrieveLevel = "STUDY"
    identifier.StudyInstanceUID = "1.2.3"
    identifier.save_as(query, implicit_vr=True, little_endian=True)
    argv = getscu_argv(find_tool(dcmtk, "getscu"), query, Get,
                       Destination("pacs", "SCRIPTED", "127.0.0.1", port), "RELAY", folder, 30,
                       bit_preserving=confined)
    updates = list(GetscuRun(argv, folder, 60, confined))
    stored = [(u.path, u.uid) for u in updates if u.path is not None]
    assert [uid for _, uid in stored] == [good_uid], updates
    assert stored[0][0] is not None and stored[0][0].parent == folder
    # Safe names: "CT..._escaped" in the folder; confined: refused, nowhere.
    assert all(p.parent == folder for p in tmp_path.rglob("*escaped*")), list(root.rglob("*"))
    assert sorted(p.name for p in root.iterdir()) == ["get-1"]


def test_a_confined_tool_writes_only_in_its_folder(tmp_path: Path) -> None:
    """Landlock as the relay sets it up (where the kernel has it): a real `cp` may write in
    the folder, not beside it; reading elsewhere still works."""
    if not landlock.available():
        pytest.skip("this kernel has no Landlock (getscu then runs in its safe-names mode)")
    cp = shutil.which("cp")
    assert cp is not None
    folder = tmp_path / "inside"
    folder.mkdir()
    source = tmp_path / "source"
    source.write_text("x")
    inside = ToolLines([cp, str(source), str(folder / "copy")], timeout=30, confine_to=folder)
    outside = ToolLines([cp, str(source), str(tmp_path / "copy")], timeout=30,
                        confine_to=folder)
    assert (list(inside), inside.returncode) == ([], 0)
    lines = list(outside)
    assert outside.returncode != 0 and "Permission denied" in " ".join(lines), lines
    assert (folder / "copy").read_text() == "x"
    assert not (tmp_path / "copy").exists()
