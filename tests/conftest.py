from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peers import DCMTK_BIN, ORTHANC, Orthanc  # noqa: E402


def _require(tool: str) -> None:
    # The test command installs these (tests/run); missing means a broken set-up, which must
    # fail loudly rather than skip quietly.
    if not Path(tool).exists() and shutil.which(tool) is None:
        pytest.fail(f"{tool} is not installed: run the suite with tests/run, which installs "
                    "Debian's dcmtk and orthanc")


@pytest.fixture
def orthanc(tmp_path: Path):
    _require(ORTHANC)
    pacs = Orthanc(tmp_path / "orthanc").start()
    yield pacs
    pacs.close()


@pytest.fixture
def dcmtk() -> Path:
    _require(str(DCMTK_BIN / "dcmsend"))
    return DCMTK_BIN
