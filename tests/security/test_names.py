"""File names never come from peer-supplied values unchecked: a SOP Instance UID like
`../../x` cannot put a file outside the spool, whatever the engine, and one carrying a shell
command is never run by a shell. And the XML the relay parses (a toolkit's output, a
stylesheet) never resolves entities."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pynetdicom import AE

from dicomdata import bundled
from peers import ENGINES, RelayProcess, ScriptedSCP, free_port, relay_config, wait_until
from relay.edit.dicomxml import safe_parser

HOSTILE_UIDS = ["1.2.3/../../../escaped", "../../escaped2", "1.2.3$(touch escaped3)"]
# Shell payloads that survive DCMTK dropping spaces from a UI value (${IFS} for the space)
# and name their marker without a '/' (dcm4che refuses such UIDs): `cd` alone goes to $HOME,
# which the test points at a folder of its own, so a shell that ran one leaves
# $HOME/pwned… at a known absolute place, whatever the relay's working directory.
SHELL_UIDS = ["1.2.3$(cd;touch${IFS}pwned1)", "1.2.3;cd;touch${IFS}pwned2;",
              "1.2.3`cd;touch${IFS}pwned3`", "1.2.3|cd;touch${IFS}pwned4"]


@pytest.mark.e2e
@pytest.mark.parametrize("engine", ENGINES)
def test_hostile_sop_instance_uids_stay_in_the_spool(tmp_path: Path, dcmtk: Path,
                                                     engine: str) -> None:
    sink = ScriptedSCP()
    port = free_port()
    work = tmp_path / "deep" / "er"
    work.mkdir(parents=True)
    spool = work / "spool"
    cfg = relay_config(work / "relay.toml", port=port, spool=spool, engine=engine,
                       destinations=[("sink", "SCRIPTED", sink.port)])
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    relay = RelayProcess(cfg, work, cwd=cwd, env={**os.environ, "HOME": str(home)}).start(port)
    hostile = [*HOSTILE_UIDS, *SHELL_UIDS]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(bundled("CT_small.dcm"))
        ae = AE("MODALITY")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        stored = []
        for uid in [*hostile, "1.2.3.4.5.6.7"]:  # one association each, then a good one
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMRELAY")
            assert assoc.is_established
            ds.SOPInstanceUID = uid
            ds.file_meta.MediaStorageSOPInstanceUID = uid
            status = assoc.send_c_store(ds)
            if status and status.Status == 0:
                stored.append(uid)
            if assoc.is_established:
                assoc.release()
        if engine == "dcm4che":
            # dcm4che's storescp names its temporary file from the UID: a UID with '/' is
            # refused by its write confinement (association aborted: no success for it).
            expected = [u for u in [*hostile, "1.2.3.4.5.6.7"] if "/" not in u]
        else:
            expected = [*hostile, "1.2.3.4.5.6.7"]
        assert stored == expected
        # (DCMTK drops the space from '$(touch escaped3)' on the way: UI has no spaces.)
        wait_until(lambda: len(sink.received) == len(expected), 30, what="relayed")
        assert "1.2.3.4.5.6.7" in sink.received, "the relay kept serving"
    finally:
        relay.stop()
        sink.close()
    everything = {p.name for p in tmp_path.rglob("*")}
    assert not any(n.startswith(("escaped", "pwned")) for n in everything), everything
    assert list(home.iterdir()) == [], "a shell ran a UID's command"
    assert list(cwd.iterdir()) == [], "nothing is written in the relay's working directory"
    outside = [p for p in tmp_path.rglob("*") if p.is_file()
               and spool not in p.parents and p.parent != work]
    assert outside == []
    # Every one relayed, as sent (less the space DCMTK drops).
    assert sorted(u.replace(" ", "") for u in sink.received) == \
        sorted(u.replace(" ", "") for u in expected)


def test_xml_parsing_resolves_no_entities(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET")
    xxe = (f'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY e SYSTEM "file://{secret}">]>'
           '<NativeDicomModel><DicomAttribute tag="00100020" vr="LO">'
           '<Value number="1">&e;</Value></DicomAttribute></NativeDicomModel>').encode()
    root = etree.fromstring(xxe, safe_parser())
    assert b"TOPSECRET" not in etree.tostring(root)
    billion = (b'<?xml version="1.0"?><!DOCTYPE r [<!ENTITY a "aaaaaaaaaa">'
               b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
               b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><r>&c;</r>')
    assert len(etree.tostring(etree.fromstring(billion, safe_parser()))) < 1000
