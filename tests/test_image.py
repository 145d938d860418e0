"""The Docker image, built and run for real with podman (docker/podman-build): the relay in
the container (dcm4che engine, non-root, --init, spool on a volume, host network) between a
DCMTK modality and an Orthanc on the host; the compose file's test profile, which runs
the dcm4che suites inside the image with podman-compose; and the units `dicom-relay systemd`
renders, run by a real systemd (PID 1 of a container made from the image). One build per
test run.

Skipped, saying why, where podman or a dcm4che toolkit is missing (tests/run installs podman
on Debian; the toolkit is found as for the other dcm4che tests)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from dicomdata import ct_series, mixed_study
from peers import (
    DCM4CHE_HOME,
    EG_RULE,
    NO_DCM4CHE,
    REPO,
    Orthanc,
    dcmsend,
    free_port,
    relay_config,
    wait_for_port,
    wait_until,
)

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(shutil.which("podman") is None,
                       reason="podman is not installed (tests/run installs Debian's podman)"),
    pytest.mark.skipif(DCM4CHE_HOME is None, reason=NO_DCM4CHE),
]

BUILD = REPO / "docker" / "podman-build"
IMAGE = "localhost/dicom-relay:latest"
TEST_IMAGE = "localhost/dicom-relay:test"
SYSTEMD_IMAGE = "localhost/dicom-relay:systemd"


@pytest.fixture(scope="session")
def podman_env() -> dict[str, str]:
    out = subprocess.run([str(BUILD), "--print-env"], capture_output=True, text=True,
                         check=True).stdout
    key, _, value = out.strip().partition("=")
    assert key == "CONTAINERS_CONF"
    return {**os.environ, "CONTAINERS_CONF": value}


@pytest.fixture(scope="session")
def image(podman_env: dict[str, str]) -> str:
    started = time.monotonic()
    proc = subprocess.run([str(BUILD), "--toolkit", str(DCM4CHE_HOME)], capture_output=True,
                          text=True, env={**podman_env, "PYTHON": sys.executable},
                          timeout=1200, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    size = next(line for line in proc.stdout.splitlines() if line.startswith("podman-build: ")
                and line.endswith(" MB"))
    # Reported, not asserted (README and the closing note quote it).
    print(f"\nimage built in {time.monotonic() - started:.0f} s; {size}")
    return IMAGE


def podman(env: dict[str, str], *args: str, timeout: float = 120,
           check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["podman", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
    if check:
        assert proc.returncode == 0, f"podman {' '.join(args)}: {proc.stderr[-2000:]}"
    return proc


@pytest.fixture
def volume(podman_env: dict[str, str]) -> Iterator[str]:
    name = f"dicom-relay-test-{uuid.uuid4().hex[:12]}"
    podman(podman_env, "volume", "create", name)
    yield name
    podman(podman_env, "volume", "rm", "-f", name, check=False)


def test_the_image_relays_a_study_and_stops_cleanly(
        tmp_path: Path, image: str, podman_env: dict[str, str], volume: str,
        orthanc: Orthanc, dcmtk: Path) -> None:
    port = free_port()
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=Path("/srv/dicom_repo"),
                       engine="auto", destinations=[("central", orthanc.aet,
                                                     orthanc.dicom_port)], rules=EG_RULE)
    cfg.chmod(0o644)  # read by the container's unprivileged user
    name = f"relay-{uuid.uuid4().hex[:12]}"
    podman(podman_env, "run", "-d", "--init", "--network", "host", "--name", name,
           "-v", f"{volume}:/srv/dicom_repo", "-v", f"{cfg}:/etc/dicom-relay/relay.toml:ro",
           image)
    try:
        # Its HEALTHCHECK: a C-ECHO of the relay's own receiver.
        wait_until(lambda: podman(podman_env, "healthcheck", "run", name,
                                  check=False).returncode == 0, 90, interval=1.0,
                   what="the container's HEALTHCHECK")
        user = podman(podman_env, "exec", name, "id", "-u").stdout.strip()
        assert user != "0", "the relay runs as root in the container"

        sent = mixed_study(tmp_path / "study")
        series = ct_series(tmp_path / "ct", 40, ethnic_group="IMG-EG")
        files = sorted((tmp_path / "study").iterdir()) + sorted((tmp_path / "ct").iterdir())
        assert dcmsend(files, port, "DICOMRELAY").returncode == 0
        total = len(sent) + len(series)
        wait_until(lambda: orthanc.count() == total, 180, what="every instance at Orthanc")
        tags = orthanc.tags_by_sop_uid()
        for uid, info in sent.items():
            assert tags[uid]["PatientID"] == info["ethnic_group"]
        assert all(tags[uid]["PatientID"] == "IMG-EG" for uid in series)
        # SIGTERM (podman stop), then: exit 0 and nothing left in flight on the volume.
        podman(podman_env, "stop", "-t", "30", name, timeout=60)
        state = podman(podman_env, "inspect", "--format", "{{.State.ExitCode}}", name).stdout
        assert state.strip() == "0"
        logs = podman(podman_env, "logs", name).stdout + podman(podman_env, "logs",
                                                                name).stderr
        assert "engine auto: dcm4che" in logs and "SIGTERM" in logs
        mount = Path(podman(podman_env, "volume", "inspect", "--format", "{{.Mountpoint}}",
                            volume).stdout.strip())
        for folder in ("incoming", "receiving", "work", "out", "failed"):
            left = [p for p in (mount / folder).rglob("*") if p.is_file()]
            assert left == [], f"spool/{folder} in the volume: {left}"
    finally:
        podman(podman_env, "rm", "-f", name, check=False)


def test_the_compose_test_profile_runs_the_dcm4che_suites_in_the_image(
        image: str, podman_env: dict[str, str]) -> None:
    compose = Path(sys.executable).with_name("podman-compose")
    if not compose.exists():  # tests/run installs it with the test extra
        pytest.fail("podman-compose is not installed: run the suite with tests/run")
    proc = subprocess.run(
        [str(compose), "-f", str(REPO / "docker" / "compose.yml"), "--profile", "test", "run",
         "--rm", "tests"], capture_output=True, text=True, env=podman_env, timeout=900,
        check=False, cwd=REPO)
    out = re.sub(r"\x1b\[[0-9;]*m", "", proc.stdout + proc.stderr)  # pytest's colours (a tty)
    # On a failure, the in-image run's failure report (the assertion and its captured log)
    # first: the output's tail alone is mostly the slowest-durations table.
    report = out[out.find("= FAILURES ="):] if "= FAILURES =" in out else ""
    assert proc.returncode == 0, report[:12000] + "\n[...]\n" + out[-3000:]
    summary = [line for line in out.splitlines() if " passed" in line][-1]
    assert "skipped" not in summary and "failed" not in summary, summary
    assert "test_dcm4che_relay_end_to_end[toolkit] PASSED" in out


@pytest.fixture(scope="session")
def systemd_image(image: str, podman_env: dict[str, str],
                  tmp_path_factory: pytest.TempPathFactory) -> str:
    """The relay's image with systemd to run as PID 1, and procps (/bin/kill, which the
    units' ExecReload uses: on every Debian host, not in a slim image)."""
    context = tmp_path_factory.mktemp("systemd-image")
    (context / "Containerfile").write_text(
        f"FROM {image}\nUSER root\nRUN apt-get update && apt-get install -y "
        "--no-install-recommends systemd procps && rm -rf /var/lib/apt/lists/*\n")
    podman(podman_env, "build", "--format", "docker", "--quiet", "-t", SYSTEMD_IMAGE,
           str(context), timeout=900)
    return SYSTEMD_IMAGE


# What the operator does with `dicom-relay systemd`'s output (its last line says so).
INSTALL_UNITS = (
    "dicom-relay systemd --config /etc/dicom-relay/relay.toml --output /tmp/units"
    " && mkdir -p /etc/sysusers.d /etc/tmpfiles.d"
    " && cp /tmp/units/*.service /etc/systemd/system/"
    " && cp /tmp/units/dicom-relay.sysusers.conf /etc/sysusers.d/dicom-relay.conf"
    " && cp /tmp/units/dicom-relay.tmpfiles.conf /etc/tmpfiles.d/dicom-relay.conf"
    " && systemd-sysusers && systemd-tmpfiles --create && systemctl daemon-reload"
    " && systemctl enable --now dicom-relay")


def test_the_rendered_units_run_under_a_real_systemd(
        tmp_path: Path, systemd_image: str, podman_env: dict[str, str], orthanc: Orthanc,
        dcmtk: Path) -> None:
    """The unit with all its hardening (ProtectSystem=strict, no capabilities, the user from
    sysusers.d, the spool from tmpfiles.d) starts the relay on the dcm4che engine, which
    relays a study; `systemctl reload` re-reads the config; `systemctl stop` ends it cleanly,
    its children stopped by the relay (KillMode=mixed: with the default, systemd's SIGTERM to
    every process crashed the dcm4che helper JVM at each stop). Then the split pair of
    units, receive and process, on the same spool: a study, a reload, a clean stop."""
    port = free_port()
    spool = "/srv/relay-spool"
    cfg = relay_config(tmp_path / "relay.toml", port=port, spool=Path(spool), engine="auto",
                       destinations=[("central", orthanc.aet, orthanc.dicom_port)],
                       rules=EG_RULE)
    cfg.chmod(0o644)  # read by the service's own user
    name = f"relay-systemd-{uuid.uuid4().hex[:12]}"
    podman(podman_env, "run", "-d", "--systemd=always", "--network", "host", "--name", name,
           "--entrypoint", "/lib/systemd/systemd", systemd_image)

    def in_container(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return podman(podman_env, "exec", name, *argv, check=check, timeout=120)

    try:
        wait_until(lambda: in_container("systemctl", "is-system-running", check=False)
                   .stdout.strip() in ("running", "degraded"), 60, interval=0.5,
                   what="systemd up in the container")
        podman(podman_env, "cp", str(cfg), f"{name}:/etc/dicom-relay/relay.toml")
        in_container("sh", "-c", INSTALL_UNITS)
        wait_for_port(port, timeout=90)
        assert in_container("stat", "-c", "%U %a", spool).stdout.split() == [
            "dicom-relay", "700"]

        series = ct_series(tmp_path / "ct", 10, ethnic_group="SYSTEMD-EG")
        files = sorted((tmp_path / "ct").iterdir())
        assert dcmsend(files, port, "DICOMRELAY").returncode == 0
        wait_until(lambda: orthanc.count() == len(series), 120, what="the study at Orthanc")
        tags = orthanc.tags_by_sop_uid()
        assert all(tags[uid]["PatientID"] == "SYSTEMD-EG" for uid in series)

        in_container("systemctl", "reload", "dicom-relay")
        wait_until(lambda: "SIGHUP: reloading" in in_container(
            "journalctl", "-u", "dicom-relay", "--no-pager").stdout, 30, what="the reload")
        in_container("systemctl", "stop", "dicom-relay")
        shown = in_container("systemctl", "show", "dicom-relay", "-p", "Result",
                             "-p", "ExecMainStatus").stdout.split()
        assert sorted(shown) == ["ExecMainStatus=0", "Result=success"]
        journal = in_container("journalctl", "-u", "dicom-relay", "--no-pager").stdout
        assert "engine auto: dcm4che" in journal and "INFO relay: stopped" in journal
        assert "JVM exited" not in journal and "Traceback" not in journal, journal[-3000:]
        assert in_container("stat", "-c", "%U", f"{spool}/audit.jsonl").stdout.strip() == \
            "dicom-relay"
        left = in_container("find", *(f"{spool}/{f}" for f in ("incoming", "work", "out")),
                            "-type", "f", check=False).stdout.split()
        assert left == [], f"left in the spool: {left}"

        # The split pair (the original relay_init / relay_process services) on the same spool.
        in_container("systemctl", "enable", "--now", "dicom-relay-receive",
                     "dicom-relay-process")
        wait_for_port(port, timeout=90)
        more = ct_series(tmp_path / "ct2", 5, ethnic_group="SPLIT-EG")
        assert dcmsend(sorted((tmp_path / "ct2").iterdir()), port,
                       "DICOMRELAY").returncode == 0
        wait_until(lambda: orthanc.count() == len(series) + len(more), 120,
                   what="the second study at Orthanc")
        tags = orthanc.tags_by_sop_uid()
        assert all(tags[uid]["PatientID"] == "SPLIT-EG" for uid in more)
        in_container("systemctl", "reload", "dicom-relay-process")
        in_container("systemctl", "stop", "dicom-relay-process", "dicom-relay-receive")
        for unit in ("dicom-relay-receive", "dicom-relay-process"):
            shown = in_container("systemctl", "show", unit, "-p", "Result",
                                 "-p", "ExecMainStatus").stdout.split()
            assert sorted(shown) == ["ExecMainStatus=0", "Result=success"], unit
        journal = in_container("journalctl", "-u", "dicom-relay-receive", "-u",
                               "dicom-relay-process", "--no-pager").stdout
        assert "reload: /etc/dicom-relay/relay.toml applied" in journal
        assert "JVM exited" not in journal and "Traceback" not in journal, journal[-3000:]
    finally:
        podman(podman_env, "rm", "-f", name, check=False)
