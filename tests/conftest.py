from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peers import DCMTK_BIN, ORTHANC, Link, Orthanc  # noqa: E402


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


@pytest.fixture(params=["embedded", "dcmtk", "dcmtk-tls"])
def link(request: pytest.FixtureRequest, dcmtk: Path, tmp_path: Path) -> Link:
    """Each engine's sender against the same real peers; DCMTK's also over TLS (storescu,
    where plain sending uses dcmsend)."""
    from relay.toolkits.dcmtk import DcmtkEngine
    from relay.toolkits.embedded import EmbeddedEngine

    if request.param == "embedded":
        return Link(EmbeddedEngine())
    if request.param == "dcmtk":
        return Link(DcmtkEngine(dcmtk))
    from security.pki import make_pki

    from relay.config import TLSConfig
    from relay.tls import server_context

    pki = make_pki(tmp_path / "pki")
    return Link(DcmtkEngine(dcmtk),
                server_ssl=server_context(TLSConfig(ca=pki.ca, certificate=pki.server_cert,
                                                    private_key=pki.server_key)),
                tls=TLSConfig(ca=pki.ca, certificate=pki.client_cert,
                              private_key=pki.client_key))
