"""The DCMTK engine's TLS sender (storescu with an association profile of each object's own
SOP class and transfer syntax), against a real TLS peer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled, copy_with_new_uids, ct_series
from peers import Link, free_port
from relay.send.results import Outcome
from relay.toolkits import common as adapters_common
from relay.toolkits import dcmtk as dcmtk_module


@pytest.mark.parametrize("link", ["dcmtk-tls"], indirect=True)
def test_more_contexts_than_one_association_holds(tmp_path: Path, link: Link,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    # 128 presentation contexts per association: with the limit at 2, three (SOP class,
    # transfer syntax) pairs need two associations, and every object still arrives.
    monkeypatch.setattr(adapters_common, "MAX_CONTEXTS", 2)
    files = []
    for name in ("CT_small.dcm", "MR_small_RLE.dcm", "JPEG2000.dcm", "CT_small.dcm"):
        target = tmp_path / f"{len(files)}-{name}"
        copy_with_new_uids(bundled(name), target)
        files.append(target)
    scp = link.scp()
    try:
        results = list(link.engine.send(files, link.destination("SCRIPTED", scp.port),
                                            "ME", 10))
    finally:
        scp.close()
    assert {r.path: r.outcome for r in results} == dict.fromkeys(files, Outcome.DELIVERED)
    assert len(scp._per_assoc) == 2 and len(scp.received) == 4


@pytest.mark.parametrize("link", ["dcmtk-tls"], indirect=True)
def test_peer_text_never_reaches_the_profile(tmp_path: Path, link: Link) -> None:
    # A SOP Class UID is peer-supplied: one carrying a line break and a profile section would
    # rewrite storescu's association profile. It is refused; the others are not held up.
    ct_series(tmp_path, 2)
    files = sorted(tmp_path.glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(files[0])
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2\n[[Profiles]]"
        ds.save_as(files[0], enforce_file_format=False)
    results = {r.path: r for r in link.engine.send(
        files, link.destination("SCRIPTED", free_port()), "ME", 5)}
    assert results[files[0]].outcome is Outcome.FAILED
    assert "is not a UID" in results[files[0]].detail
    assert results[files[1]].outcome is Outcome.RETRY  # nobody listening: stays queued


def test_association_profile_proposes_each_pair_once() -> None:
    text = dcmtk_module.association_profile([
        ("1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"),
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.1.2.4.91")])
    assert text.splitlines() == [
        "[[TransferSyntaxes]]",
        "[TS0]", "TransferSyntax1 = 1.2.840.10008.1.2.1",
        "[TS1]", "TransferSyntax1 = 1.2.840.10008.1.2.4.91",
        "[[PresentationContexts]]", "[Relay]",
        "PresentationContext1 = 1.2.840.10008.5.1.4.1.1.2\\TS0",
        "PresentationContext2 = 1.2.840.10008.5.1.4.1.1.7\\TS1",
        "[[Profiles]]", "[Relay]", "PresentationContexts = Relay"]
