"""Query/retrieve through the relay, measured (nothing asserted):

  C-MOVE of 500 small instances (one study) to a DCMTK storescp, asked by DCMTK's movescu of
  Orthanc directly, and of the relay in front of the same Orthanc, alternating runs, the
  median kept (goal: relay >= 0.5x the direct throughput). Asked on [query].port, where the
  relay serves C-MOVE itself: the embedded engine (retrieving by C-GET and by C-MOVE to
  itself), DCMTK (getscu fetches, dcmsend stores), dcm4che where a toolkit is found
  (pynetdicom fetches, its JVM stores).
  C-FIND at IMAGE level of the same study (500 matches), the same way.

    .venv/bin/python bench/query.py            # the full run (about a minute)
    .venv/bin/python bench/query.py --smoke    # tiny sizes, for CI: shape, not speed
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import Sink  # noqa: E402

from dicomdata import ct_series  # noqa: E402
from peers import (  # noqa: E402
    DCM4CHE_HOME,
    DCMTK_BIN,
    Orthanc,
    RelayProcess,
    dcmsend,
    dcmtk_env,
    free_port,
    relay_config,
    wait_for_port,
    wait_until,
)

QR = {"DicomAlwaysAllowFind": True, "DicomAlwaysAllowGet": True, "DicomAlwaysAllowMove": True}


def move(port: int, aec: str, study: str) -> None:
    run = subprocess.run([str(DCMTK_BIN / "movescu"), "-aet", "WORKSTATION", "-aec", aec, "-S",
                          "-aem", "SINK", "-k", "QueryRetrieveLevel=STUDY",
                          "-k", f"StudyInstanceUID={study}", "127.0.0.1", str(port)],
                         env=dcmtk_env(), capture_output=True, text=True, timeout=3600,
                         check=False)
    if run.returncode != 0:
        raise SystemExit(f"movescu to port {port} failed:\n{run.stdout}{run.stderr}")


def find(port: int, aec: str, study: str) -> None:
    subprocess.run([str(DCMTK_BIN / "findscu"), "-aet", "WORKSTATION", "-aec", aec, "-S",
                    "-k", "QueryRetrieveLevel=IMAGE", "-k", f"StudyInstanceUID={study}",
                    "-k", "SOPInstanceUID", "127.0.0.1", str(port)],
                   env=dcmtk_env(), check=True, capture_output=True, timeout=3600)


def timed_move(sink: Sink, count: int, port: int, aec: str, study: str) -> float:
    start_count = sink.count()
    started = time.monotonic()
    move(port, aec, study)
    wait_until(lambda: sink.count() - start_count >= count, 600, interval=0.02)
    return time.monotonic() - started




def relay(work: Path, name: str, pacs: Orthanc, sink: Sink, engine: str,
          retrieve: str) -> tuple[RelayProcess, int]:
    """A relay in front of the PACS; returns it and the port to ask."""
    port, query_port = free_port(), free_port()
    cfg = relay_config(
        work / f"{name}.toml", port=port, spool=work / f"spool-{name}", engine=engine,
        destinations=[("central", pacs.aet, pacs.dicom_port)],
        extra=f"""
[query]
destination = "central"
port = {query_port}
retrieve = "{retrieve}"
move_ae_title = "RELAYQR"

[[modalities]]
ae_title = "SINK"
host = "127.0.0.1"
port = {sink.port}
""")
    process = RelayProcess(cfg, work).start(port)
    wait_for_port(query_port, 60, process.proc)
    if retrieve == "move":  # the PACS stores to the relay's own AE: where it takes them
        pacs.add_modality("relayqr", "RELAYQR", port if engine == "embedded" else query_port)
    # Asked on [query].port: with retrieve = "move" on the embedded engine the PACS's
    # sub-operations then arrive in the receiver's process, and the two halves of a retrieve
    # run on two cores.
    return process, query_port


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--count", type=int, default=500, help="instances in the study")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the median kept")
    args = parser.parse_args()
    count, repeat = (20, 1) if args.smoke else (args.count, args.repeat)
    with tempfile.TemporaryDirectory(prefix="bench-query-") as tmp:
        work = Path(tmp)
        pacs = Orthanc(work / "orthanc", extra=QR).start()
        sink = Sink(work / "sink")
        pacs.add_modality("sink", "SINK", sink.port)
        ct_series(work / "study", count, PatientID="BENCH-QR")
        files = sorted((work / "study").iterdir())
        dcmsend(files, pacs.dicom_port, pacs.aet)
        from pydicom import dcmread

        study = str(dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
        setups = [("relay (embedded, retrieve = get)", "embedded", "get"),
                  ("relay (embedded, retrieve = move)", "embedded", "move"),
                  ("relay (dcmtk, [query].port, retrieve = get)", "dcmtk", "get")]
        if DCM4CHE_HOME is not None:
            setups.append(("relay (dcm4che, [query].port, retrieve = get)", "dcm4che", "get"))
        relays = {name: relay(work, f"r{i}", pacs, sink, engine, retrieve)
                  for i, (name, engine, retrieve) in enumerate(setups)}
        asks: dict[str, tuple[int, str]] = {"direct: movescu -> Orthanc": (pacs.dicom_port,
                                                                          pacs.aet)}
        asks.update({name: (port, "DICOMRELAY") for name, (_, port) in relays.items()})
        moves: dict[str, list[float]] = {name: [] for name in asks}
        finds: dict[str, list[float]] = {name: [] for name in asks}
        try:
            for _ in range(repeat):  # alternating: each run of each under the same noise
                for name, (port, aec) in asks.items():
                    moves[name].append(timed_move(sink, count, port, aec, study))
                    finds[name].append(_timed(lambda p=port, a=aec: find(p, a, study)))
        finally:
            for process, _ in relays.values():
                process.stop()
            sink.close()
            pacs.close()
    direct_move = statistics.median(moves["direct: movescu -> Orthanc"])
    direct_find = statistics.median(finds["direct: movescu -> Orthanc"])
    print(f"C-MOVE of {count} instances to storescp, C-FIND of {count} matches "
          f"(median of {repeat})\n")
    print("| scenario | C-MOVE s | instances/s | ratio to direct | C-FIND s | ratio |")
    print("|---|---|---|---|---|---|")
    for name in asks:
        m, f = statistics.median(moves[name]), statistics.median(finds[name])
        label = name if name.startswith("relay") else "direct: Orthanc"
        print(f"| {label} | {m:.2f} | {count / m:.0f} | {direct_move / m:.2f} | {f:.2f} | "
              f"{direct_find / f:.2f} |")


def _timed(action: Callable[[], None]) -> float:
    started = time.monotonic()
    action()
    return time.monotonic() - started


if __name__ == "__main__":
    main()
