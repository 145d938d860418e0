"""Decompressing one destination's copy when it refuses the object's transfer syntax
(`transcode = "on-refusal"`): to Explicit VR Little Endian, with pydicom and pylibjpeg's
decoders (libjpeg: JPEG baseline, extended, lossless and LS; OpenJPEG: JPEG 2000; RLE).

Lossless syntaxes give back the original pixels exactly; lossy ones are decoded, never
encoded again (the loss already happened: the header says so with LossyImageCompression).
Only the destination's own copy in out/<dest>/ is replaced: other destinations keep the
object as it arrived (their hard links point to the original).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_file_meta_info
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLSNearLossless,
)

from relay.spool import transcoding_path

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
        reason = " ".join(str(exc).split())
        raise CannotDecode(f"no decoder could decode {before.name}: {reason[:300]}") from None
    if before in ALWAYS_LOSSY and ds.get("LossyImageCompression") != "01":
        ds.LossyImageCompression = "01"  # PS3.3 C.7.6.1.1.5: it has been lossy compressed
    tmp = transcoding_path(path)
    try:
        with open(tmp, "wb") as fp:
            ds.save_as(fp, enforce_file_format=True)
            fp.flush()
            os.fsync(fp.fileno())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)  # this destination's entry only: other links keep the original
    finally:
        tmp.unlink(missing_ok=True)
    return str(before), str(ExplicitVRLittleEndian)
