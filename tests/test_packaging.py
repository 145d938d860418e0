"""What `pip install .` installs. The wheel is built from a copy of the checkout's files (not
from the checkout, whose build/ and egg-info from earlier installs can hide a file the build
leaves out), installed into a fresh virtualenv, and used there: every module of relay/
imports from the install (a stage package left out of the wheel fails here), every verb's
--help runs, and every template the commands render from is inside."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
VERBS = ["run", "receive", "process", "send", "echo", "edit", "check", "status", "retry",
         "systemd", "haproxy", "history import", "user add", "user remove", "user list",
         "token add"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    source = tmp / "src"
    for name in listed:
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(tmp), str(source)],
                   check=True, capture_output=True, timeout=300)
    [built] = tmp.glob("dicom_relay-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed. Its dependencies come from the test
    environment's site-packages (a path, not a site dir: the checkout's editable install
    there is not seen), so that nothing is downloaded."""
    venv = tmp_path_factory.mktemp("venv") / "fresh"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "test-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install",
                    "--quiet", "--no-deps", "--no-index", "--disable-pip-version-check",
                    str(wheel)], check=True, capture_output=True, timeout=300)
    return venv


def test_the_wheel_carries_every_template(wheel: Path) -> None:
    listed = subprocess.run(["git", "-C", str(REPO), "ls-files", "--cached", "--others",
                             "--exclude-standard"], capture_output=True, text=True,
                            check=True).stdout.splitlines()
    packaged = {name.removeprefix("relay/templates/")
                for name in zipfile.ZipFile(wheel).namelist()
                if name.startswith("relay/templates/") and not name.endswith("/")}
    templates = {name.removeprefix("templates/") for name in listed
                 if name.startswith("templates/")}
    assert templates, "the checkout lists its templates"
    assert templates <= packaged, f"not in the wheel: {sorted(templates - packaged)}"


def test_the_wheel_declares_the_projects_dependencies(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    required = {str(Requirement(line.removeprefix("Requires-Dist: ")))
                for line in text.splitlines()
                if line.startswith("Requires-Dist: ") and "extra ==" not in line}
    assert {str(Requirement(r)) for r in declared} == required


def test_every_module_imports_from_the_install(installed: Path) -> None:
    # The history's migrations are scripts alembic runs, not modules: they are proved by
    # upgrading a database from the install instead.
    migrations = REPO / "relay" / "history" / "migrations"
    modules = sorted(".".join(p.relative_to(REPO).with_suffix("").parts).removesuffix(".__init__")
                     for p in (REPO / "relay").rglob("*.py")
                     if p.name != "__main__.py" and migrations not in p.parents)
    assert len(modules) > 40
    script = ("import importlib, relay, sys, tempfile, pathlib\n"
              f"for name in {modules!r}:\n"
              "    importlib.import_module(name)\n"
              "from relay.history.store import HistoryStore, sqlite_url\n"
              "db = pathlib.Path(tempfile.mkdtemp()) / 'h.sqlite'\n"
              "store = HistoryStore(sqlite_url(db), 'r')\n"
              "store.upgrade()\n"
              "assert store.revision() == '0002', store.revision()\n"
              "print(relay.__file__)\n")
    done = subprocess.run([str(installed / "bin" / "python"), "-c", script], cwd=installed,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(installed)), "imported from the install"


@pytest.mark.parametrize("verb", VERBS)
def test_every_verb_has_help_in_the_install(installed: Path, verb: str) -> None:
    done = subprocess.run([str(installed / "bin" / "dicom-relay"), *verb.split(), "--help"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "Example:" in done.stdout and f"dicom-relay {verb}" in done.stdout
