"""Write an edited object by splicing the changed top-level elements into the original file.

The common edit changes one or two short top-level attributes of an object whose pixel data
is megabytes. Rewriting the whole data set with pydicom costs most of an edit; splicing copies
the untouched byte ranges with copy_file_range (in the kernel, never through our memory) and
encodes only the changed elements. Anything it cannot do exactly (nested changes, file meta,
group lengths, undefined lengths, deflate) returns False and the caller writes with pydicom.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import UID

DEFLATED = "1.2.840.10008.1.2.1.99"
UNDEFINED = 0xFFFFFFFF
# Explicit VR elements with a 4-byte length field (PS3.5 7.1.2): 12-byte header.
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}


def _extent(raw: RawDataElement, implicit: bool) -> tuple[int, int] | None:
    """(start, end) of a raw element in the file, header included; None if not knowable."""
    if raw.length == UNDEFINED or raw.value_tell is None:
        return None
    header = 8 if implicit or raw.VR not in LONG_VRS else 12
    return raw.value_tell - header, raw.value_tell + raw.length


def splice_file(src: Path, dst: Path, ds: FileDataset, before: dict[int, Any],
                changed: set[int], sync: bool = True) -> bool:
    """Write `ds` to `dst` as `src` with only the `changed` top-level tags re-encoded.
    `before` is the data set's element dict as read, before the rules ran."""
    if str(ds.file_meta.get("TransferSyntaxUID", "")) == DEFLATED:
        return False
    if any(tag >> 16 == 0x0002 for tag in changed):
        return False  # the file meta is re-encoded as a whole by pydicom
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax.is_transfer_syntax:
        return False
    implicit, little = syntax.is_implicit_VR, syntax.is_little_endian
    # pydicom leaves the VR of raw elements read as implicit VR empty: if that does not match
    # the transfer syntax, the data set is not encoded as its meta says. Rewrite it properly.
    raws = [r for r in before.values() if isinstance(r, RawDataElement)]
    if any((r.VR is None) != implicit for r in raws):
        return False
    groups = {tag >> 16 for tag in changed}
    if any((g << 16) in before for g in groups):
        return False  # a group length would go stale
    tags = sorted(before)
    edits: list[tuple[int, int, bytes]] = []  # (start, end, new bytes) in file order
    for tag in sorted(changed):
        old = before.get(tag)
        if old is not None:
            if not isinstance(old, RawDataElement):
                return False
            extent = _extent(old, implicit)
            if extent is None:
                return False
            start, end = extent
        else:
            # A new element goes right after the last element with a smaller tag.
            previous = [t for t in tags if t < tag]
            if not previous:
                return False
            prev = before[previous[-1]]
            if not isinstance(prev, RawDataElement):
                return False
            extent = _extent(prev, implicit)
            if extent is None:
                return False
            start = end = extent[1]
        data = b""
        if tag in ds:
            fp = DicomBytesIO()
            fp.is_implicit_VR = implicit
            fp.is_little_endian = little
            write_data_element(fp, ds[tag], ds._character_set)
            data = fp.getvalue()
        edits.append((start, end, data))
    edits.sort()
    for (_, end1, _), (start2, _, _) in zip(edits, edits[1:], strict=False):
        if start2 < end1:
            return False
    size = src.stat().st_size
    fd_out = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with open(src, "rb") as fin:
            position = 0
            for start, end, data in edits:
                _copy(fin, fd_out, position, start - position)
                _write_all(fd_out, data)
                position = end
            _copy(fin, fd_out, position, size - position)
        if sync:
            os.fsync(fd_out)
    finally:
        os.close(fd_out)
    return True


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _copy(fin: Any, out_fd: int, offset: int, count: int) -> None:
    """Copy count bytes from fin at offset to out_fd's position, in the kernel when it can."""
    while count > 0:
        try:
            done = os.copy_file_range(fin.fileno(), out_fd, count, offset)
        except OSError:
            done = 0
        if done <= 0:  # not supported here: fall back to read/write in chunks
            fin.seek(offset)
            while count > 0:
                chunk = fin.read(min(count, 1 << 20))
                if not chunk:
                    raise EOFError("source file shorter than its elements claim")
                _write_all(out_fd, chunk)
                count -= len(chunk)
            return
        offset += done
        count -= done
