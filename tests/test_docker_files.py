"""Static checks of docker/ that hold for Docker users too (the image is built and run with
podman in tests/test_image.py, from a local toolkit; the download path is checked here)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from relay.config.load import load_config

DOCKER = Path(__file__).resolve().parent.parent / "docker"


def test_image_config_is_valid_and_uses_the_toolkit() -> None:
    cfg = load_config(DOCKER / "relay.toml")
    assert cfg.toolkit.engine == "auto"
    assert str(cfg.toolkit.dcm4che_home) == "/opt/dcm4che-toolkit"
    assert str(cfg.spool.path) == "/srv/dicom_repo"
    assert [d.host for d in cfg.destinations] == ["orthanc"]


def test_dockerfile_pins_and_verifies_dcm4che_and_runs_unprivileged() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^ARG DCM4CHE_VERSION=5\.\d+\.\d+$", text, re.M)
    assert "sha256sum -c -" in text and "ARG DCM4CHE_SHA256" in text
    assert "ARG DCM4CHE_SOURCE=download" in text  # Docker users get the verified download
    assert "mv \"/opt/dcm4che-${DCM4CHE_VERSION}\" /opt/dcm4che-toolkit" in text
    stages = text.split("FROM runtime AS test")[0]
    assert re.search(r"^USER relay$", stages, re.M)
    assert 'VOLUME ["/srv/dicom_repo"]' in stages
    assert 'CMD ["dicom-relay", "echo", "--receiver"]' in stages  # HEALTHCHECK: C-ECHO
    assert 'CMD ["dicom-relay", "run"]' in stages


def test_compose_has_relay_pacs_and_test_profile() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"orthanc", "relay", "tests"}
    assert services["tests"]["profiles"] == ["test"]
    assert services["tests"]["build"]["target"] == "test"
    assert services["relay"]["build"]["target"] == "runtime"
    assert "spool:/srv/dicom_repo" in services["relay"]["volumes"]
