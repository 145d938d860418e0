"""Text burned into the pixels: which objects may carry it (the gate a de-identified
destination puts before its copies) and blanking known regions of them (`redact`, the way
CTP's pixel anonymizer scripts do).

Why a gate: de-identification changes attributes; a patient's name written into an
ultrasound frame or a scanned form by the device goes through it untouched. An object may
carry such text when BurnedInAnnotation says YES, or when it does not say and it is of a
kind where burned-in text is common (ultrasound, secondary capture, photographs, scanned and
encapsulated documents). A de-identified destination sends neither: they go to
failed/burned-in/, unless a `redact` rule of that destination blanked the regions where the
text is, which sets BurnedInAnnotation to NO.

A region is [x, y, width, height] in pixels from the top left corner, as in CTP's scripts.
Blanked pixels are zero, in every frame. The copy keeps its transfer syntax where it is
uncompressed little endian or one pydicom encodes losslessly (RLE up to 16 bits, JPEG 2000
lossless for monochrome images); any other (lossy, JPEG lossless, JPEG-LS, big endian) leaves
as Explicit VR Little Endian. Black is zero, or Y = 0 with neutral chroma in a YBR model.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from relay.config.model import Filter
from relay.edit.pixels import CannotDecode, decompress
from relay.route.filters import value_as_text

# Modalities where text in the image is common (PS3.3 C.7.3.1.1.1 terms).
RISKY_MODALITIES = frozenset({"US", "IVUS", "SC", "OT", "XC", "ES", "GM", "SM", "DOC"})

# SOP classes where text in the image (or the document) is common.
_STORAGE = "1.2.840.10008.5.1.4.1.1."
RISKY_SOP_CLASSES: Mapping[str, str] = {
    _STORAGE + "7": "Secondary Capture",
    _STORAGE + "7.1": "Multi-frame Single Bit Secondary Capture",
    _STORAGE + "7.2": "Multi-frame Grayscale Byte Secondary Capture",
    _STORAGE + "7.3": "Multi-frame Grayscale Word Secondary Capture",
    _STORAGE + "7.4": "Multi-frame True Color Secondary Capture",
    _STORAGE + "6.1": "Ultrasound",
    _STORAGE + "3.1": "Ultrasound Multi-frame",
    _STORAGE + "6.2": "Enhanced US Volume",
    _STORAGE + "77.1.1": "VL Endoscopic",
    _STORAGE + "77.1.1.1": "Video Endoscopic",
    _STORAGE + "77.1.2": "VL Microscopic",
    _STORAGE + "77.1.2.1": "Video Microscopic",
    _STORAGE + "77.1.4": "VL Photographic",
    _STORAGE + "77.1.4.1": "Video Photographic",
    _STORAGE + "104.1": "Encapsulated PDF",
    _STORAGE + "104.2": "Encapsulated CDA",
}
DOCUMENTS = frozenset({_STORAGE + "104.1", _STORAGE + "104.2"})

# Syntaxes a redacted copy keeps: pydicom writes them back without loss.
KEPT_SYNTAXES = frozenset({ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless,
                           JPEG2000Lossless})


def burned_in_risk(ds: Dataset) -> str | None:
    """Why `ds` may carry burned-in identifying text, or None. Pure: looks at the header."""
    flag = str(ds.get("BurnedInAnnotation", "") or "").strip().upper()
    sop_class = str(ds.get("SOPClassUID", "") or "")
    has_content = "PixelData" in ds or "FloatPixelData" in ds or sop_class in DOCUMENTS \
        or "EncapsulatedDocument" in ds
    if not has_content or flag == "NO":
        return None
    if flag == "YES":
        return "BurnedInAnnotation is YES"
    modality = str(ds.get("Modality", "") or "")
    kind = RISKY_SOP_CLASSES.get(sop_class) or (modality if modality in RISKY_MODALITIES
                                                else None)
    if kind is None:
        return None
    return (f"BurnedInAnnotation is {'empty' if 'BurnedInAnnotation' in ds else 'absent'} "
            f"on this {kind} object (Modality {modality or 'absent'}), where text burned into "
            "the image is common")


@dataclass(frozen=True)
class RedactRegion:
    """[x, y, width, height] in pixels, from the top left corner."""

    x: int
    y: int
    width: int
    height: int

    def __str__(self) -> str:
        return f"[{self.x}, {self.y}, {self.width}, {self.height}]"


@dataclass(frozen=True)
class RedactEntry:
    """One entry of a `redact` rule: the objects it is for, and their regions."""

    match: Filter  # keys of the object's top-level attributes (relay.route.filters)
    regions: tuple[RedactRegion, ...]
    written: str  # as in the configuration, for describe()

    def matches(self, ds: Dataset) -> bool:
        values = {k: value_as_text(ds.get(k)) for k in self.match.attribute_keywords}
        return self.match.failing_key(values) is None


@dataclass(frozen=True)
class Redaction:
    """A `redact = [...]` rule of a destination: blank the regions of the entries an object
    matches (every matching entry's regions)."""

    entries: tuple[RedactEntry, ...]

    def describe(self) -> str:
        return "redact " + "; ".join(e.written for e in self.entries)

    def regions_for(self, ds: Dataset) -> tuple[RedactRegion, ...]:
        return tuple(r for e in self.entries if e.matches(ds) for r in e.regions)

    def apply(self, ds: Dataset, path: Path) -> str | None:
        """Blank the matching regions of `ds` (read from `path`) in place; what was done
        (for the audit), or None when no entry matches. ValueError says why it cannot."""
        regions = self.regions_for(ds)
        if not regions:
            return None
        return blank(ds, path, regions)


def blank(ds: Dataset, path: Path, regions: tuple[RedactRegion, ...]) -> str:
    """Set the regions' pixels to zero in every frame; BurnedInAnnotation becomes NO."""
    if "PixelData" not in ds:
        raise ValueError("a redact rule matched an object without pixel data (a document "
                         "cannot be redacted by regions)")
    if int(ds.get("BitsAllocated", 0) or 0) == 1:
        raise ValueError("single-bit pixel data cannot be redacted")
    before = UID(str(ds.file_meta.TransferSyntaxUID))
    if before.is_compressed:
        try:
            decompress(ds, path)
        except CannotDecode as exc:
            raise ValueError(f"cannot decode the pixels to redact them: {exc}") from None
    elif not before.is_little_endian:
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian  # pixels written native (LE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds.pixel_array_options(as_rgb=False)  # the values as stored: no colour conversion
        pixels = ds.pixel_array.copy()
    rows, columns = int(ds.Rows), int(ds.Columns)
    color = int(ds.get("SamplesPerPixel", 1) or 1) > 1
    # Black: zero, but in a YBR colour model the chroma's middle (zero is dark green).
    ybr = str(ds.get("PhotometricInterpretation", "")).startswith("YBR")
    chroma = 1 << (int(ds.get("BitsStored", 8) or 8) - 1)
    for r in regions:
        x0, y0 = min(r.x, columns), min(r.y, rows)
        x1, y1 = min(r.x + r.width, columns), min(r.y + r.height, rows)
        if color:
            pixels[..., y0:y1, x0:x1, :] = 0
            if ybr:
                pixels[..., y0:y1, x0:x1, 1:] = chroma
        else:
            pixels[..., y0:y1, x0:x1] = 0
    if color:
        ds.PlanarConfiguration = 0  # pixel_array is colour-by-pixel
        if ds.PhotometricInterpretation == "YBR_FULL_422":
            ds.PhotometricInterpretation = "YBR_FULL"  # pixel_array is no longer subsampled
    ds.BurnedInAnnotation = "NO"
    # JPEG 2000 lossless only for one sample per pixel: colour would need the YBR_RCT
    # transform, which validators expect and pydicom's encoder leaves to us.
    kept = before if before in KEPT_SYNTAXES and not (color and before == JPEG2000Lossless) \
        else ExplicitVRLittleEndian
    if kept.is_compressed:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds.compress(kept, pixels, generate_instance_uid=False)
        except (ValueError, RuntimeError, NotImplementedError):
            kept = ExplicitVRLittleEndian  # what the encoder refuses (32-bit RLE) goes plain
    if not kept.is_compressed:
        ds.file_meta.TransferSyntaxUID = kept
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if int(ds.BitsAllocated) > 8 else "OB"
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    done = f"blanked {', '.join(map(str, regions))} in {frames} frame(s) of {columns}x{rows}"
    return done if kept == before else f"{done}; {before.name} -> {kept.name}"

