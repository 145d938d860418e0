"""Disk almost full (a small tmpfs the test mounts; CI runs as root): the receiver answers
Out of Resources instead of acknowledging what it cannot store, and recovers when space
returns. Nothing acknowledged is lost (DCMTK: see the exception in the test)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from dicomdata import ct_series
from peers import (
    DCMTK_BIN,
    ENGINES,
    RelayProcess,
    ScriptedSCP,
    dcmtk_env,
    free_port,
    relay_config,
    wait_until,
)
from relay.send.results import Outcome
from relay.toolkits.dcmtk import parse_dcmsend_report

pytestmark = pytest.mark.e2e


@pytest.fixture
def small_disk(tmp_path: Path):  # noqa: ANN201
    mount = tmp_path / "small"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1500k", "tmpfs", str(mount)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _send(files: list[Path], port: int, report: Path) -> dict[str, Outcome]:
    report.unlink(missing_ok=True)
    subprocess.run([str(DCMTK_BIN / "dcmsend"), "-aec", "DICOMRELAY", "--no-halt",
                    "--create-report-file", str(report), "127.0.0.1", str(port),
                    *map(str, files)], capture_output=True, env=dcmtk_env(), timeout=300,
                   check=False)
    return {name: answer.outcome for name, answer in
            parse_dcmsend_report(report.read_text()).items()}


def _cut(spool: Path) -> dict[Path, str]:
    """Objects quarantined as truncated, with their SOP Instance UIDs."""
    import warnings

    from pydicom import dcmread

    folder = spool / "failed" / "truncated"
    if not folder.is_dir():
        return {}
    out = {}
    for path in folder.iterdir():
        if path.name.startswith(".") or path.suffix == ".json":
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = dcmread(path, force=True, stop_before_pixels=True)
        out[path] = str(ds.SOPInstanceUID)
    return out


@pytest.mark.parametrize("engine", ENGINES)
def test_full_disk_answers_out_of_resources_and_recovers(
        tmp_path: Path, small_disk: Path, dcmtk: Path, engine: str) -> None:
    sink_port = free_port()
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=small_disk / "spool",
                       engine=engine, destinations=[("sink", "SCRIPTED", sink_port)])
    uids = ct_series(tmp_path / "ct", 60)  # 60 x 39 KB: more than the 1.5 MB disk holds
    files = sorted((tmp_path / "ct").iterdir())
    relay = RelayProcess(cfg, tmp_path).start(port)
    sink = None
    try:
        # The destination is down, so the spool fills up.
        first = _send(files, port, tmp_path / "report1.txt")
        refused = [Path(f) for f, o in first.items() if o is not Outcome.DELIVERED]
        stored = [Path(f) for f, o in first.items() if o is Outcome.DELIVERED]
        assert refused, "a full disk must refuse, not acknowledge"
        assert stored, "what fitted was stored"
        # Space returns: the destination comes up and the spool drains.
        sink = ScriptedSCP(ae_title="SCRIPTED", port=sink_port)
        spool = small_disk / "spool"
        wait_until(lambda: len(sink.counts()) + len(_cut(spool)) >= len(stored), 120,
                   interval=0.3, what="what was acknowledged reaches the destination")
        cut = _cut(spool)
        if engine in ("dcmtk", "dcm4che"):
            # The toolkits' storescp may answer success for the object being written when the
            # disk fills (seen on both: one object cut at a page boundary, acknowledged); the
            # embedded receiver fsyncs before it answers. The relay never forwards such an
            # object: it is kept in failed/truncated/ with an ERROR line naming it, for the
            # modality to send again (README, Guarantees).
            assert len(cut) <= 1
        else:
            assert cut == {}, "the embedded receiver acknowledges only what it wrote"
        # The modality sends again what was refused; now it fits.
        second = _send(refused, port, tmp_path / "report2.txt")
        assert all(o is Outcome.DELIVERED for o in second.values()), second
        wait_until(lambda: set(sink.counts()) == set(uids) - set(cut.values()), 120,
                   interval=0.3, what="everything at the destination")
    finally:
        relay.stop()
        if sink is not None:
            sink.close()
