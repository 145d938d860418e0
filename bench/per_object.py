"""CPU per object of a queued backlog, and where it goes (nothing asserted):

For each engine, a backlog of CT_small copies is queued in the spool before the relay starts
and timed until the sink has them all; run at two sizes, the difference over the difference
in objects is the CPU each object costs past start-up (start-up, ~1 s, cancels out). Given
apart: the relay's own Python process (user, system) and the tools it ran and waited for
(dcmsend on the DCMTK engine; the dcm4che engine's JVM and the embedded engine's receiving
child are counted with the process tree, not apart).

    .venv/bin/python bench/per_object.py                      # 1,000 and 4,000, every engine
    .venv/bin/python bench/per_object.py --engine dcmtk --runs 3
    .venv/bin/python bench/per_object.py --smoke              # tiny sizes, for CI: shape only

Machines here are noisy (2 cores, shared): +-0.3 ms per object between runs is usual.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from run import Sink  # noqa: E402

from dicomdata import ct_series  # noqa: E402
from peers import (  # noqa: E402
    DCM4CHE_HOME,
    EG_RULE,
    free_port,
    proc_stats,
    relay_config,
    wait_until,
)

TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Cpu:
    """CPU seconds of one backlog run."""

    tree: float  # the relay and every live or waited-for descendant
    user: float  # the relay's own process
    system: float
    waited: float  # its children that ended (dcmsend batches)


def backlog_run(work: Path, engine: str, files: list[Path]) -> Cpu:
    sink = Sink(work / "sink")
    port = free_port()
    spool = work / "spool"
    cfg = relay_config(work / "relay.toml", port=port, spool=spool, engine=engine,
                       rules=EG_RULE, destinations=[("sink", "SINK", sink.port)])
    (spool / "incoming").mkdir(parents=True)
    for f in files:
        os.link(f, spool / "incoming" / f.name)
    with open(work / "relay.log", "wb") as log:
        relay = subprocess.Popen([sys.executable, "-m", "relay", "run", "--config", str(cfg)],
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: sink.count() >= len(files), 1800, interval=0.05,
                   what=f"{len(files)} at the sink")
        tree = proc_stats(relay.pid)[1]
        fields = Path(f"/proc/{relay.pid}/stat").read_text().rsplit(")", 1)[1].split()
        user, system, cuser, csystem = (int(x) / TICKS for x in fields[11:15])
    finally:
        relay.terminate()
        relay.wait(60)
        sink.close()
    return Cpu(tree, user, system, cuser + csystem)


def marginal_ms(few: list[Cpu], many: list[Cpu], part: str, more: int) -> float:
    """ms of CPU per object past start-up: the medians' difference over `more` objects."""
    a = statistics.median(getattr(c, part) for c in few)
    b = statistics.median(getattr(c, part) for c in many)
    return (b - a) / more * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", action="append", help="embedded, dcmtk, dcm4che "
                        "(repeatable; default: each one found)")
    parser.add_argument("--sizes", type=int, nargs=2, default=None, metavar=("FEW", "MANY"),
                        help="the two backlog sizes (default 1000 4000)")
    parser.add_argument("--runs", type=int, default=2, help="runs of each size (medians)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one run (CI)")
    args = parser.parse_args()
    few, many = args.sizes or ((20, 60) if args.smoke else (1000, 4000))
    runs = 1 if args.smoke else args.runs
    engines = args.engine or ["embedded", "dcmtk"] + (["dcm4che"] if DCM4CHE_HOME else [])
    rows = ["| engine | ms of CPU per object, relay tree | its Python process: user / system "
            "| tools it waited for (dcmsend) | backlog sizes, runs |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory(prefix="dicom-relay-per-object-") as tmp:
        data = Path(tmp) / "data"
        ct_series(data, many)
        files = sorted(data.iterdir())
        for engine in engines:
            measured: dict[int, list[Cpu]] = {few: [], many: []}
            for run in range(runs):
                for size in (few, many):
                    print(f"per-object: {engine}, {size} queued ({run + 1}/{runs}) ...",
                          file=sys.stderr, flush=True)
                    started = time.monotonic()
                    work = Path(tempfile.mkdtemp(dir=tmp, prefix=f"{engine}-{size}-"))
                    measured[size].append(backlog_run(work, engine, files[:size]))
                    print(f"  {time.monotonic() - started:.1f} s", file=sys.stderr)
            ms = {part: marginal_ms(measured[few], measured[many], part, many - few)
                  for part in ("tree", "user", "system", "waited")}
            rows.append(f"| {engine} | {ms['tree']:.2f} | {ms['user']:.2f} / "
                        f"{ms['system']:.2f} | {ms['waited']:.2f} | "
                        f"{few} and {many}, {runs} each |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
