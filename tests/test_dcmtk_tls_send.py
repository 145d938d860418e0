"""The DCMTK engine's TLS sender (storescu with an association profile of each object's own
SOP class and transfer syntax), against a real TLS peer."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from pydicom import dcmread

from dicomdata import bundled, copy_with_new_uids, ct_series
from peers import Link
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
def test_peer_text_never_reaches_the_profile(tmp_path: Path, link: Link,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A SOP Class UID is peer-supplied: one carrying a line break and a profile section would
    # rewrite storescu's association profile. It never reaches the profile: pynetdicom sends
    # that object as it is (over TLS too), and the others go by storescu as ever.
    ct_series(tmp_path, 2)
    files = sorted(tmp_path.glob("*.dcm"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(files[0])
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2\n[[Profiles]]"
        ds.save_as(files[0], enforce_file_format=False)
    profiles: list[str] = []
    write_profile = dcmtk_module.association_profile
    monkeypatch.setattr(dcmtk_module, "association_profile",
                        lambda contexts, *a: profiles.append(write_profile(contexts, *a))
                        or profiles[-1])
    scp = link.scp()
    try:
        results = {r.path: r for r in link.engine.send(
            files, link.destination("SCRIPTED", scp.port), "ME", 10)}
    finally:
        scp.close()
    assert {p: r.outcome for p, r in results.items()} == dict.fromkeys(files, Outcome.DELIVERED)
    assert len(scp.received) == 2
    # storescu sent the other one; its profile holds its one [[Profiles]] section, no more.
    assert profiles and all(p.count("[[Profiles]]") == 1 for p in profiles)


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
