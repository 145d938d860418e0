from __future__ import annotations

import shutil
import sys
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from peers import (  # noqa: E402
    DCM4CHE_HOME,
    DCMTK_BIN,
    ORTHANC,
    PG_BIN,
    REQUIRE_ALL,
    Link,
    Orthanc,
    PostgreSQL,
    with_dcm4che,
)

# Under REQUIRE_ALL=1 (CI) a test that would skip for something missing (a toolkit, podman,
# HAProxy, systemd-analyze, root) fails instead, since tests/run installs all of it and a
# skip would hide a broken set-up. Elsewhere (a user's machine) it skips, saying why.


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Generator[None, Any, None]:
    outcome = yield
    report = outcome.get_result()
    if REQUIRE_ALL and report.skipped:
        longrepr = report.longrepr
        why = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        report.outcome = "failed"
        report.longrepr = (f"{item.nodeid} would be skipped ({why}), and REQUIRE_ALL=1 "
                           "(CI) demands that everything runs: install what it needs "
                           "(tests/run does).")


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
def postgresql() -> Generator[PostgreSQL, None, None]:
    _require(str(PG_BIN / "initdb"))
    db = PostgreSQL().start()
    yield db
    db.close()


@pytest.fixture
def dcmtk() -> Path:
    _require(str(DCMTK_BIN / "dcmsend"))
    return DCMTK_BIN


@pytest.fixture(params=["embedded", "dcmtk", "dcmtk-tls",
                        *with_dcm4che("dcm4che", "dcm4che-tls")])
def link(request: pytest.FixtureRequest, dcmtk: Path, tmp_path: Path) -> Link:
    """Each engine's sender against the same real peers, also over TLS for the toolkits
    (DCMTK then sends with storescu where plain sending uses dcmsend)."""
    from relay.toolkits.base import Engine
    from relay.toolkits.dcm4che import Dcm4cheEngine
    from relay.toolkits.dcmtk import DcmtkEngine
    from relay.toolkits.embedded import EmbeddedEngine

    engine: Engine
    if request.param == "embedded":
        return Link(EmbeddedEngine())
    if request.param.startswith("dcm4che"):
        assert DCM4CHE_HOME is not None
        engine = Dcm4cheEngine(DCM4CHE_HOME)
    else:
        engine = DcmtkEngine(dcmtk)
    if not request.param.endswith("-tls"):
        return Link(engine)
    from security.pki import make_pki

    from relay.config.model import TLSConfig
    from relay.toolkits.tls import server_context

    pki = make_pki(tmp_path / "pki")
    return Link(engine,
                server_ssl=server_context(TLSConfig(ca=pki.ca, certificate=pki.server_cert,
                                                    private_key=pki.server_key)),
                tls=TLSConfig(ca=pki.ca, certificate=pki.client_cert,
                              private_key=pki.client_key))
