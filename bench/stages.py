"""Each engine's receiving and sending alone, beside the direct send (nothing asserted):
how close to a direct dcmsend -> storescp a relay could come at best, on this machine.

The relay receives every object and sends it again; before any editing, each of those two
halves alone bounds it. Measured in one run, runs alternating, the median of `--repeat`:

  direct     dcmsend -> DCMTK storescp: the baseline of bench/run.py's ratios
  receive    dcmsend -> `dicom-relay receive` (the engine's receiver as the relay runs it:
             DCMTK's storescp with its completion marker, dcm4che's storescp, the embedded
             pynetdicom receiver with its fsync), timed until dcmsend has every response
  send       `dicom-relay send` of the same files -> storescp, the engine's own sender in one
             batch (its best case), timed from the first object stored to the last (the
             tool's and the JVM's start-up left out)

    .venv/bin/python bench/stages.py               # 500 CT_small, 3 runs of each
    .venv/bin/python bench/stages.py --large       # 20 x 24 MB multi-frame instead
    .venv/bin/python bench/stages.py --smoke       # tiny, one run: shape only

Machines here are noisy (2 cores, shared): read the ratios within one run.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import Sink, dcmsend, large_set, megabytes  # noqa: E402

from dicomdata import ct_series  # noqa: E402
from peers import (  # noqa: E402
    DCM4CHE_HOME,
    RelayProcess,
    free_port,
    proc_stats,
    relay_config,
    wait_until,
)


@dataclass
class Measured:
    seconds: float
    cpu: float | None = None  # CPU s of both ends (None: not measured, see `send`)


def direct(work: Path, files: list[Path]) -> Measured:
    sink = Sink(work / "sink")
    try:
        started = time.monotonic()
        cpu = dcmsend(files, sink.port, "SINK")
        wait_until(lambda: sink.count() >= len(files), 600, interval=0.01)
        return Measured(time.monotonic() - started, cpu + proc_stats(sink.proc.pid)[1])
    finally:
        sink.close()


def receive(work: Path, files: list[Path], engine: str) -> Measured:
    """dcmsend to the engine's receiver alone, until every C-STORE was answered."""
    port = free_port()
    cfg = relay_config(work / "relay.toml", port=port, spool=work / "spool", engine=engine,
                       destinations=[("sink", "SINK", free_port())])
    relay = RelayProcess(cfg, work, verb="receive").start(port)
    assert relay.proc is not None
    incoming = work / "spool" / "incoming"
    try:
        time.sleep(0.5)  # its start-up done (the embedded receiver's imports), not counted
        idle = proc_stats(relay.proc.pid)[1]
        started = time.monotonic()
        cpu = dcmsend(files, port, "DICOMRELAY")
        seconds = time.monotonic() - started
        # Every object answered is in the spool (not timed: the toolkits' are moved there
        # after their answer).
        wait_until(lambda: sum(not p.name.startswith(".") for p in incoming.iterdir())
                   >= len(files), 120, interval=0.05, what=f"{len(files)} in incoming/")
        return Measured(seconds, cpu + proc_stats(relay.proc.pid)[1] - idle)
    finally:
        relay.stop()


def send(work: Path, files: list[Path], engine: str) -> Measured:
    """`dicom-relay send` to a storescp: first stored to last stored, scaled to every object."""
    sink = Sink(work / "sink")
    cfg = relay_config(work / "relay.toml", port=free_port(), spool=work / "spool",
                       engine=engine, destinations=[("sink", "SINK", sink.port)])
    try:
        subprocess.run([sys.executable, "-m", "relay", "send", "sink", *map(str, files),
                        "--config", str(cfg)], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=600)
        wait_until(lambda: sink.count() >= len(files), 60, interval=0.01)
        times = sorted(sink.times().values())
    finally:
        sink.close()
    return Measured((times[-1] - times[0]) * len(files) / max(1, len(files) - 1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=None,
                        help="objects (500 CT_small; with --large, 20)")
    parser.add_argument("--large", action="store_true", help="24 MB multi-frame objects "
                        "instead of CT_small")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each, the median kept")
    parser.add_argument("--smoke", action="store_true", help="20 objects, one run (CI)")
    args = parser.parse_args()
    if args.count is not None and args.count < 2:
        parser.error("--count: at least 2 (the send stage is timed from the first object "
                     "stored to the last)")
    count, repeat = (20, 1) if args.smoke else (args.count, args.repeat)
    count = count or (20 if args.large else 500)
    what = "24 MB multi-frame" if args.large else "CT_small"
    engines = ["embedded", "dcmtk"] + (["dcm4che"] if DCM4CHE_HOME else [])
    steps: list[tuple[str, Callable[[Path, list[Path]], Measured]]] = [("direct", direct)]
    steps += [(f"{e} {stage}", partial(fn, engine=e)) for e in engines
              for stage, fn in (("receive", receive), ("send", send))]
    measured: dict[str, list[Measured]] = {name: [] for name, _ in steps}
    with tempfile.TemporaryDirectory(prefix="dicom-relay-stages-") as tmp:
        if args.large:
            files = large_set(Path(tmp) / "data", count, 2 if args.smoke else 24)
        else:
            ct_series(Path(tmp) / "data", count)
            files = sorted((Path(tmp) / "data").iterdir())
        size = megabytes(files)
        for run in range(repeat):
            for name, step in steps:
                print(f"stages: {name} ({run + 1}/{repeat}) ...", file=sys.stderr, flush=True)
                work = Path(tempfile.mkdtemp(dir=tmp, prefix=name.replace(" ", "-")))
                measured[name].append(step(work, files))
    base = statistics.median(m.seconds for m in measured["direct"])
    print(f"| stage, {count} x {what} | seconds (runs) | objects/s | MB/s | time ratio to "
          "direct | CPU s, both ends |")
    print("|---|---|---|---|---|---|")
    for name, _ in steps:
        s = statistics.median(m.seconds for m in measured[name])
        runs = ", ".join(f"{m.seconds:.2f}" for m in measured[name])
        cpus = [m.cpu for m in measured[name] if m.cpu is not None]
        cpu = f"{statistics.median(cpus):.2f}" if cpus else "-"
        print(f"| {name} | {s:.2f} ({runs}) | {count / s:.0f} | {size / s:.0f} | "
              f"{s / base:.2f} | {cpu} |")


if __name__ == "__main__":
    main()
