"""Decompressing one destination's copy when it refuses the object's transfer syntax
(`transcode = "on-refusal"`): to Explicit VR Little Endian, with pydicom and pylibjpeg's
decoders (libjpeg: JPEG baseline, extended, lossless and LS; OpenJPEG: JPEG 2000; RLE), then,
where they all fail, GDCM on the whole file in a child process (gdcm_decode.py: 12-bit JPEG
Extended and the odd vendor stream). An object goes to failed/cannot-decode/ only when every
decoder failed; the reason names each one's error.

Lossless syntaxes give back the original pixels exactly; lossy ones are decoded, never
encoded again (the loss already happened: the header says so with LossyImageCompression).
Only the destination's own copy in out/<dest>/ is replaced: other destinations keep the
object as it arrived (their hard links point to the original).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from relay.spool import transcoding_path

GDCM_TIMEOUT = 300  # seconds for GDCM to decode one object (a hang must not hold the queue)

# Syntaxes that are always lossy (JPEG 2000 and others may be either: their header says).
ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless})


class CannotDecode(Exception):
    """No codec available could decode the object's pixel data."""


def is_compressed(path: Path) -> bool:
    """Whether the file's transfer syntax is a compressed (encapsulated) one."""
    try:
        return UID(str(read_file_meta_info(path).TransferSyntaxUID)).is_compressed
    except Exception:  # noqa: BLE001 - unreadable: nothing to transcode
        return False


def decompress_in_place(path: Path) -> tuple[str, str]:
    """Replace the file at `path` (its directory entry only) by its decompressed form:
    (transfer syntax before, after). CannotDecode when no decoder takes it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = dcmread(path)
    before = UID(str(ds.file_meta.TransferSyntaxUID))
    if not before.is_compressed:
        raise CannotDecode(f"{before.name} is not compressed: nothing to decompress")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # The same instance in another encoding: its SOP Instance UID stays (pydicom would
            # make a new one by default), or the PACS would hold it twice.
            ds.decompress(generate_instance_uid=False)
    except Exception as exc:  # noqa: BLE001 - each decoder fails its own way
        pydicom_reason = " ".join(str(exc).split()).removeprefix(
            "Unable to decode as exceptions were raised by all available plugins: ")
        try:
            _decompress_with_gdcm(path, ds)
        except CannotDecode as gdcm_exc:
            raise CannotDecode(f"no decoder could decode {before.name}: pydicom ("
                               f"{pydicom_reason[:400]}); GDCM on the whole file ({gdcm_exc})"
                               ) from None
    if before in ALWAYS_LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: it has been lossy compressed
    # Every element read now: one that arrived without its VR (a file whose meta says explicit
    # VR and whose data set is implicit) gets it from the dictionary, or the writer fails.
    for _ in ds.iterall():
        pass
    tmp = transcoding_path(path)
    try:
        with open(tmp, "wb") as fp:
            try:
                ds.save_as(fp, enforce_file_format=True)
            except (TypeError, ValueError, AttributeError) as exc:  # what the writer raises
                raise CannotDecode(f"decoded, but pydicom cannot write it: {exc}") from None
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # this destination's entry only: other links keep the original
    finally:
        tmp.unlink(missing_ok=True)
    return str(before), str(ExplicitVRLittleEndian)


def _decompress_with_gdcm(path: Path, ds: Dataset) -> None:
    """Decode `path` with GDCM in a child process and put the pixels into `ds` (as
    ds.decompress() would: Explicit VR Little Endian, the colour model GDCM decoded to)."""
    with tempfile.TemporaryDirectory(prefix="relay-gdcm-") as tmp:
        pixels = Path(tmp) / "pixels"
        try:
            result = subprocess.run(
                [sys.executable, "-m", "relay.send.gdcm_decode", str(path), str(pixels)],
                capture_output=True, text=True, timeout=GDCM_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise CannotDecode(f"no answer in {GDCM_TIMEOUT} s") from None
        if result.returncode != 0:
            why = " ".join(result.stderr.split())[:300] or f"exit code {result.returncode}"
            raise CannotDecode(why)
        described = json.loads(result.stdout)
        data = pixels.read_bytes()
    expected = (int(ds.Rows) * int(ds.Columns) * int(described["samples_per_pixel"])
                * int(described["bits_allocated"]) // 8 * int(ds.get("NumberOfFrames", 1) or 1))
    if len(data) < expected:
        raise CannotDecode(f"{len(data)} bytes of pixels decoded, {expected} expected")
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PixelData = data[:expected] + (b"\0" if expected % 2 else b"")
    ds["PixelData"].VR = "OW" if int(described["bits_allocated"]) > 8 else "OB"
    ds.PhotometricInterpretation = str(described["photometric"])
    if int(described["samples_per_pixel"]) > 1:
        ds.PlanarConfiguration = int(described["planar_configuration"])
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in ds:
            delattr(ds, keyword)
