"""Decoding an object's pixel data, for whoever must see the pixels: transcoding for a PACS
that refuses a syntax (relay.send.transcode) and pixel redaction (relay.edit.redact).

pydicom's decoders first (pylibjpeg's libjpeg: JPEG baseline, extended, lossless and LS;
OpenJPEG: JPEG 2000; RLE; and GDCM frame by frame), then, where they all fail, GDCM on the
whole file in a child process (gdcm_decode.py: 12-bit JPEG Extended and the odd vendor
stream). CannotDecode only when every decoder failed; its message names each one's error.
Lossy syntaxes are decoded, never encoded again: the header says the loss happened.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

GDCM_TIMEOUT = 300  # seconds for GDCM to decode one object (a hang must not hold the queue)

# Syntaxes that are always lossy (JPEG 2000 and others may be either: their header says).
ALWAYS_LOSSY = frozenset({JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless})


class CannotDecode(Exception):
    """No codec available could decode the object's pixel data."""


def decompress(ds: Dataset, path: Path) -> None:
    """Decode `ds` (read from `path`, which GDCM reads if it must) in place to Explicit VR
    Little Endian, the same instance (its SOP Instance UID kept). CannotDecode says why not."""
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


def _decompress_with_gdcm(path: Path, ds: Dataset) -> None:
    """Decode `path` with GDCM in a child process and put the pixels into `ds` (as
    ds.decompress() would: Explicit VR Little Endian, the colour model GDCM decoded to)."""
    with tempfile.TemporaryDirectory(prefix="relay-gdcm-") as tmp:
        pixels = Path(tmp) / "pixels"
        try:
            result = subprocess.run(
                [sys.executable, "-m", "relay.edit.gdcm_decode", str(path), str(pixels)],
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
