"""What `pip install .` installs: every template the commands render from (systemd units,
the HAProxy config, the example config, the Grafana dashboard) is inside the wheel, so an
installed relay finds them as a checkout does. The wheel is built from a copy of the
checkout's files (not from the checkout, whose build/ and egg-info from earlier installs
can hide a file the package data leaves out)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_the_wheel_carries_every_template(tmp_path: Path) -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    source = tmp_path / "src"
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(tmp_path), str(source)],
                   check=True, capture_output=True, timeout=300)
    [wheel] = tmp_path.glob("dicom_relay-*.whl")
    packaged = {name.removeprefix("relay/templates/")
                for name in zipfile.ZipFile(wheel).namelist()
                if name.startswith("relay/templates/") and not name.endswith("/")}
    templates = {name.removeprefix("templates/") for name in listed
                 if name.startswith("templates/")}
    assert templates, "the checkout lists its templates"
    assert templates <= packaged, f"not in the wheel: {sorted(templates - packaged)}"
