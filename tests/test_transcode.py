"""transcode = "on-refusal", on every engine, with real peers: DCMTK's dcmsend as the modality,
DCMTK's storescp without +xa (it accepts uncompressed syntaxes only) as the old PACS, and an
Orthanc that takes everything as a second destination. JPEG baseline, JPEG lossless, JPEG
2000 and RLE arrive at the old PACS as Explicit VR Little Endian with the original's decoded
pixels, and pydicom's 12-bit JPEG Extended (which only GDCM decodes here) with the pixels
DCMTK's dcmdjpeg decodes; Orthanc gets them as they arrived; what no decoder takes (a broken
JPEG stream) goes to failed/ naming every decoder's error. With transcode = "never" they are
quarantined as before."""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.encaps import encapsulate

from dicomdata import bundled, copy_with_new_uids
from peers import (
    DCMTK_BIN,
    EG_RULE,
    ENGINES,
    Orthanc,
    RelayProcess,
    dcmsend,
    dcmtk_env,
    free_port,
    relay_config,
    spool_files,
    wait_until,
)
from relay.send.transcode import CannotDecode, decompress_in_place

pytestmark = pytest.mark.e2e

EXPLICIT_LE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"
JPEG_2000 = "1.2.840.10008.1.2.4.91"
RLE = "1.2.840.10008.1.2.5"


def _read(path: Path):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dcmread(path)


def broken_jpeg(source: Path, target: Path) -> None:
    """`source` (a JPEG Extended file) with its stream's scan replaced by noise: a file no
    decoder can read, as a damaged vendor stream would be."""
    ds = _read(source)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc1\x00\x0b" + bytes(range(256)) * 8
                                + b"\xff\xd9"])
    ds.save_as(target, enforce_file_format=True)


def compressed_set(folder: Path) -> dict[str, Path]:
    """name → file: JPEG baseline, JPEG lossless (made by DCMTK's dcmcjpeg), JPEG 2000, RLE,
    a 12-bit JPEG Extended only GDCM decodes here, and a broken JPEG stream no decoder takes;
    each with new UIDs and an EthnicGroup."""
    folder.mkdir(parents=True)
    lossless_source = folder.parent / "ct_lossless.dcm"
    subprocess.run([str(DCMTK_BIN / "dcmcjpeg"), "+e1", str(bundled("CT_small.dcm")),
                    str(lossless_source)], check=True, env=dcmtk_env(), capture_output=True)
    broken = folder.parent / "broken_jpeg.dcm"
    broken_jpeg(bundled("JPEG-lossy.dcm"), broken)
    sources = {"jpeg-baseline": bundled("SC_rgb_jpeg_dcmtk.dcm"),
               "jpeg-lossless": lossless_source, "jpeg2000": bundled("JPEG2000.dcm"),
               "rle": bundled("MR_small_RLE.dcm"), "jpeg-12bit": bundled("JPEG-lossy.dcm"),
               "undecodable": broken}
    files = {}
    for name, source in sources.items():
        target = folder / f"{name}.dcm"
        copy_with_new_uids(source, target, ethnic_group=f"EG-{name}")
        files[name] = target
    return files


class OldPacs:
    """DCMTK's storescp with its default: uncompressed transfer syntaxes only."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True)
        self.port = free_port()
        self.log = open(folder.parent / "oldpacs.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(DCMTK_BIN / "storescp"), "--aetitle", "OLDPACS", "--output-directory",
             str(folder), str(self.port)], stdout=self.log, stderr=subprocess.STDOUT,
            env=dcmtk_env())
        from peers import wait_for_port

        wait_for_port(self.port, proc=self.proc)

    def stored(self) -> dict[str, Path]:
        """SOP Instance UID → stored file."""
        return {str(_read(p).SOPInstanceUID): p for p in self.folder.iterdir() if p.is_file()}

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)
        self.log.close()


def _relay(tmp_path: Path, engine: str, transcode: str, pacs: OldPacs,
           orthanc: Orthanc | None) -> tuple[int, Path, RelayProcess]:
    port = free_port()
    spool = tmp_path / "spool"
    dests: list = [("oldpacs", "OLDPACS", pacs.port, f'transcode = "{transcode}"')]
    if orthanc is not None:
        dests.append(("archive", orthanc.aet, orthanc.dicom_port))
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=spool, engine=engine,
                       rules=EG_RULE, destinations=dests)
    return port, spool, RelayProcess(cfg, tmp_path).start(port)


@pytest.mark.parametrize("engine", ENGINES)
def test_refused_syntaxes_arrive_decompressed_with_the_same_pixels(
        tmp_path: Path, dcmtk: Path, engine: str) -> None:
    files = compressed_set(tmp_path / "set")
    pacs = OldPacs(tmp_path / "oldpacs")
    archive = Orthanc(tmp_path / "archive").start()
    port, spool, relay = _relay(tmp_path, engine, "on-refusal", pacs, archive)
    try:
        assert dcmsend(list(files.values()), port, "DICOMRELAY").returncode == 0
        decodable = {k: v for k, v in files.items() if k != "undecodable"}
        uids = {name: str(_read(path).SOPInstanceUID) for name, path in files.items()}
        wait_until(lambda: len(pacs.stored()) == len(decodable), 90,
                   what="5 decompressed objects at the old PACS")
        wait_until(lambda: archive.count() == len(files), 60, what="all 6 at Orthanc")
        wait_until(lambda: not spool_files(spool, "out"), 60, what="queues empty")
    finally:
        assert relay.stop() == 0
        pacs.close()
    try:
        stored = pacs.stored()
        assert set(stored) == {uids[name] for name in decodable}
        assert set(archive.tags_by_sop_uid()) == set(uids.values())
        for name, path in decodable.items():
            got = _read(stored[uids[name]])
            original = _read(dcmdjpeg(path) if name == "jpeg-12bit" else path)
            assert got.file_meta.TransferSyntaxUID == EXPLICIT_LE, name
            assert got.PatientID == f"EG-{name}", name
            assert np.array_equal(got.pixel_array, original.pixel_array), name
        assert _read(stored[uids["jpeg-baseline"]]).LossyImageCompression == "01"
        # The other destination got them as they arrived.
        assert archive.transfer_syntax(uids["jpeg2000"]) == JPEG_2000
        assert archive.transfer_syntax(uids["rle"]) == RLE
    finally:
        archive.close()
    sidecars = [json.loads(p.read_text()) for p in (spool / "failed").rglob("*.json")]
    assert [(s["reason"], s["destination"]) for s in sidecars] == [("cannot-decode", "oldpacs")]
    detail = sidecars[0]["detail"]
    assert "no decoder could decode JPEG Extended" in detail, detail
    assert "pylibjpeg:" in detail and "GDCM on the whole file" in detail, detail
    audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    transcoded = {a["transfer_syntax"] for a in audit if a["step"] == "transcoded"}
    assert {JPEG_BASELINE, JPEG_LOSSLESS_SV1, JPEG_2000, JPEG_EXTENDED} <= transcoded
    assert RLE in transcoded


@pytest.mark.parametrize("engine", ENGINES)
def test_without_transcoding_refused_syntaxes_are_quarantined(
        tmp_path: Path, dcmtk: Path, engine: str) -> None:
    files = compressed_set(tmp_path / "set")
    pacs = OldPacs(tmp_path / "oldpacs")
    port, spool, relay = _relay(tmp_path, engine, "never", pacs, None)
    # Every engine sends the file as it is (dcm4che's JVM too: no decompression of its own),
    # so the old PACS refuses all six and every one is quarantined.
    expected = set(files)
    uids = {name: str(_read(path).SOPInstanceUID) for name, path in files.items()}
    try:
        assert dcmsend(list(files.values()), port, "DICOMRELAY").returncode == 0
        wait_until(lambda: len([p for p in spool_files(spool, "failed")
                                if p.suffix != ".json"]) == len(expected), 90,
                   what="quarantined")
        wait_until(lambda: not spool_files(spool, "out"), 60, what="queues empty")
    finally:
        assert relay.stop() == 0
        pacs.close()
    failed = {str(_read(p).SOPInstanceUID): p.parent.name for p in spool_files(spool, "failed")
              if p.suffix != ".json"}
    assert set(failed) == {uids[name] for name in expected}
    assert set(pacs.stored()) == {uids[name] for name in files if name not in expected}
    assert "transcoded" not in (spool / "audit.jsonl").read_text()
    assert set(failed.values()) <= {"not-sendable", "breaks-association"}, failed


def test_decompress_in_place_replaces_only_that_link(tmp_path: Path) -> None:
    original = tmp_path / "a" / "rle.dcm"
    copy_with_new_uids(bundled("MR_small_RLE.dcm"), original)
    other = tmp_path / "other.dcm"
    other.hardlink_to(original)
    before, after = decompress_in_place(other)
    assert (before, after) == (RLE, EXPLICIT_LE)
    assert _read(original).file_meta.TransferSyntaxUID == RLE, "the other link is untouched"
    assert _read(other).file_meta.TransferSyntaxUID == EXPLICIT_LE
    assert _read(other).SOPInstanceUID == _read(original).SOPInstanceUID, "the same instance"
    assert np.array_equal(_read(other).pixel_array, _read(original).pixel_array)
    assert oct(other.stat().st_mode & 0o777) == "0o600"
    with pytest.raises(CannotDecode, match="not compressed"):
        decompress_in_place(other)
    broken = tmp_path / "broken.dcm"
    broken_jpeg(bundled("JPEG-lossy.dcm"), broken)
    with pytest.raises(CannotDecode, match="no decoder could decode") as refused:
        decompress_in_place(broken)
    assert "pylibjpeg:" in str(refused.value) and "GDCM on the whole file" in str(refused.value)
    assert _read(broken).file_meta.TransferSyntaxUID != EXPLICIT_LE, "left as it was"


def dcmdjpeg(path: Path) -> Path:
    """What DCMTK's dcmdjpeg decodes of `path` (next to it)."""
    out = path.with_suffix(".dcmdjpeg.dcm")
    subprocess.run([str(DCMTK_BIN / "dcmdjpeg"), str(path), str(out)], check=True,
                   env=dcmtk_env(), capture_output=True)
    return out


def test_gdcm_decodes_what_pylibjpeg_refuses_as_dcmtk_does(tmp_path: Path) -> None:
    """pydicom's 12-bit JPEG Extended: pylibjpeg refuses its stream, pydicom's GDCM plugin
    refuses 12-bit JPEG Extended; GDCM on the whole file decodes it to DCMTK's pixels."""
    lossy, original = tmp_path / "lossy.dcm", tmp_path / "original.dcm"
    shutil.copy(bundled("JPEG-lossy.dcm"), lossy)
    shutil.copy(bundled("JPEG-lossy.dcm"), original)
    with pytest.raises(Exception, match="pylibjpeg"):
        _read(lossy).pixel_array  # noqa: B018 - what pydicom's own decoders do with it
    assert decompress_in_place(lossy) == (JPEG_EXTENDED, EXPLICIT_LE)
    got = _read(lossy)
    reference = _read(dcmdjpeg(original))
    assert got.SOPInstanceUID == reference.SOPInstanceUID
    assert got.LossyImageCompression == "01"
    assert (got.BitsStored, got.PhotometricInterpretation) == (12, "MONOCHROME2")
    assert np.array_equal(got.pixel_array, reference.pixel_array)


def test_a_file_written_with_the_wrong_vr_encoding_is_decoded_and_written(
        tmp_path: Path) -> None:
    """pydicom's SC_rgb_jpeg.dcm says explicit VR in its meta and is implicit VR: decoding
    it used to end in a TypeError from the writer (the sender's loop, not a quarantine)."""
    odd = tmp_path / "odd.dcm"
    shutil.copy(bundled("SC_rgb_jpeg.dcm"), odd)
    assert decompress_in_place(odd) == (JPEG_BASELINE, EXPLICIT_LE)
    assert _read(odd).pixel_array.shape == (256, 256, 3)
