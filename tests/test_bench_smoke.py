"""The benchmark's smoke run: every scenario runs and delivers everything (each step waits
for all instances at its sink and fails otherwise). No timing is asserted: speed is measured
by bench/run.py, not tested."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from peers import DCM4CHE_HOME

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.e2e


def test_bench_smoke_runs_every_scenario(dcmtk: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "run.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    for scenario in ("direct: dcmsend -> storescp", "direct: dcmsend -> Orthanc",
                     "relay (embedded)", "relay (dcmtk)",
                     "original per-file pipeline (DCMTK tools)", "Orthanc auto-router (Lua)",
                     "direct: dcmsend -> Orthanc (C-STORE)",
                     "relay (embedded) -> Orthanc (STOW-RS)"):
        assert f"| {scenario} |" in result.stdout, scenario
    # The dcm4che engine has its rows wherever a toolkit is found (in CI: ../shared).
    assert ("| relay (dcm4che) |" in result.stdout) == (DCM4CHE_HOME is not None)
    rows = [line for line in result.stdout.splitlines() if line.startswith("| relay (")]
    assert {line.split(" | ")[1] for line in rows} == {"small", "large", "backlog", "stream"}
    assert all("| 1.00 |" in line for line in result.stdout.splitlines()
               if line.startswith("| direct: dcmsend -> storescp"))


def test_the_history_bench_smoke_runs(dcmtk: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "history.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| history on / off, 20 small objects" in result.stdout
    for engine in ("SQLite", "PostgreSQL"):
        assert f"| search, 500 studies, {engine}: PatientID |" in result.stdout, engine
    assert "| overview page, 500 studies in the history |" in result.stdout


def test_the_query_bench_smoke_runs(dcmtk: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "query.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    for scenario in ("direct: Orthanc", "relay (embedded, retrieve = get)",
                     "relay (embedded, retrieve = move)",
                     "relay (dcmtk, [query].port, retrieve = get)"):
        assert f"| {scenario} |" in result.stdout, scenario
    assert "| direct: Orthanc | " in result.stdout and "| 1.00 |" in result.stdout


def test_the_per_object_bench_smoke_runs(dcmtk: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "per_object.py"), "--smoke",
                             "--engine", "embedded", "--engine", "dcmtk"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    assert [row.split(" | ")[0] for row in rows[1:]] == ["| embedded", "| dcmtk"]
    assert all(row.endswith("| 20 and 60, 1 each |") for row in rows[1:])


def test_the_stages_bench_smoke_runs(dcmtk: Path) -> None:
    result = subprocess.run([sys.executable, str(REPO / "bench" / "stages.py"), "--smoke"],
                            capture_output=True, text=True, timeout=900, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split(" | ")[0] for line in result.stdout.splitlines()
            if line.startswith("| ") and not line.startswith("| stage")]
    engines = ["embedded", "dcmtk"] + (["dcm4che"] if DCM4CHE_HOME else [])
    assert rows == ["| direct"] + [f"| {e} {s}" for e in engines for s in ("receive", "send")]
    assert "| direct | " in result.stdout and "| 1.00 |" in result.stdout
