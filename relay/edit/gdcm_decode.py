"""GDCM's whole-file decoder, run as a child process by pixels.py when pydicom's decoders
(pylibjpeg, and GDCM per frame) all failed: `python -m relay.edit.gdcm_decode IN OUT`.

Why GDCM, and why whole files: GDCM carries libjpeg builds for 8, 12 and 16 bits and
CharLS, so it decodes what pylibjpeg refuses (12-bit JPEG Extended, odd vendor streams);
pydicom's GDCM plugin hands it single frames and refuses 12-bit JPEG Extended, while
gdcm.ImageReader with ImageChangeTransferSyntax decodes the same file as DCMTK's dcmdjpeg
(the tests compare both). Why a child process: it is C++ reading attacker-supplied
streams; should it crash or hang, the relay goes on and the object is set aside.

It writes the decoded pixels (Explicit VR Little Endian order, every frame) to OUT and
prints one line of JSON with what describes them; on failure it prints the reason on stderr
and exits 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def decode(source: Path, target: Path) -> dict[str, object]:
    import gdcm  # python-gdcm

    gdcm.Trace.WarningOff()  # it tries 8-bit JPEG before 12-bit and says so
    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    if not reader.Read():
        raise ValueError("GDCM cannot read the file as an image")
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.ExplicitVRLittleEndian))
    change.SetInput(reader.GetImage())
    if not change.Change():
        raise ValueError("GDCM cannot decode the pixel data")
    image = change.GetOutput()
    # GDCM hands the buffer over as str: back to the bytes it was.
    target.write_bytes(image.GetBuffer().encode("utf-8", "surrogateescape"))
    pixel = image.GetPixelFormat()
    return {"photometric": str(image.GetPhotometricInterpretation()).strip(),
            "planar_configuration": int(image.GetPlanarConfiguration()),
            "samples_per_pixel": int(pixel.GetSamplesPerPixel()),
            "bits_allocated": int(pixel.GetBitsAllocated())}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m relay.edit.gdcm_decode IN OUT", file=sys.stderr)
        return 2
    try:
        print(json.dumps(decode(Path(argv[0]), Path(argv[1]))))
    except Exception as exc:  # noqa: BLE001 - the reason goes to the parent, whatever it is
        print(" ".join(str(exc).split()) or type(exc).__name__, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
