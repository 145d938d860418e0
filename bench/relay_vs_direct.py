"""Relay throughput against a direct send, measured in the same run on 127.0.0.1.

    .venv/bin/python bench/relay_vs_direct.py [--count 500] [--engine embedded]

DCMTK dcmsend sends N copies of CT_small (new UIDs) once straight to an Orthanc, once through
`dicom-relay run` (rule PatientID := EthnicGroup) to another Orthanc. The relay is timed from
the first byte sent until Orthanc has stored the last instance. Prints instances/s and the
ratio; machines here are noisy (2 cores shared by sender, relay and PACS), so read ratios,
not absolute figures. Nothing here asserts a threshold.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from dicomdata import ct_series  # noqa: E402
from peers import (  # noqa: E402
    EG_RULE,
    Orthanc,
    RelayProcess,
    dcmsend,
    free_port,
    relay_config,
    wait_until,
)


def stored(pacs: Orthanc) -> int:
    return int(pacs.rest("/statistics")["CountInstances"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=500)
    parser.add_argument("--engine", default="embedded")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ct_series(work / "ct", args.count)
        files = sorted((work / "ct").iterdir())
        mb = sum(f.stat().st_size for f in files) / 1e6

        direct = Orthanc(work / "direct").start()
        started = time.monotonic()
        result = dcmsend(files, direct.dicom_port, direct.aet, timeout=1800)
        wait_until(lambda: stored(direct) == args.count, 600, interval=0.05)
        direct_s = time.monotonic() - started
        direct.close()
        assert result.returncode == 0, result.stderr

        pacs = Orthanc(work / "via-relay").start()
        port = free_port()
        cfg = relay_config(work / "relay.toml", port=port, spool=work / "spool",
                           engine=args.engine, rules=EG_RULE,
                           destinations=[("pacs", pacs.aet, pacs.dicom_port)])
        relay = RelayProcess(cfg, work).start(port)
        started = time.monotonic()
        result = dcmsend(files, port, "DICOMRELAY", timeout=1800)
        sent_s = time.monotonic() - started
        wait_until(lambda: stored(pacs) == args.count, 1200, interval=0.05)
        relay_s = time.monotonic() - started
        relay.stop()
        pacs.close()
        assert result.returncode == 0, result.stderr

    print("| scenario | instances | seconds | instances/s | MB/s | ratio to direct |")
    print("|---|---|---|---|---|---|")
    for name, secs in (("dcmsend -> Orthanc (direct)", direct_s),
                       (f"dcmsend -> dicom-relay ({args.engine}) -> Orthanc", relay_s)):
        print(f"| {name} | {args.count} | {secs:.2f} | {args.count / secs:.1f} | "
              f"{mb / secs:.2f} | {secs / direct_s:.2f} |")
    print(f"\n(the modality's dcmsend into the relay finished after {sent_s:.2f} s)")


if __name__ == "__main__":
    main()
