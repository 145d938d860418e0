"""Decompressing one destination's copy when it refuses the object's transfer syntax
(`transcode = "on-refusal"`): to Explicit VR Little Endian, with every decoder we have
(relay.edit.pixels: pydicom's, then GDCM on the whole file). An object goes to
failed/cannot-decode/ only when every decoder failed; the reason names each one's error.

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
from pydicom.uid import UID, ExplicitVRLittleEndian

from relay.edit.pixels import CannotDecode, decompress
from relay.spool import transcoding_path

__all__ = ["CannotDecode", "decompress_in_place", "is_compressed"]


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
    before = str(ds.file_meta.TransferSyntaxUID)
    decompress(ds, path)
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
    return before, str(ExplicitVRLittleEndian)
