"""DICOM toolkit adapters behind one interface (relay.toolkits.base.Engine).

`engine = "auto"` picks dcm4che if `dcm4che_home` exists, else DCMTK if its storescp is in
`dcmtk_bin`, else the embedded engine (pydicom + pynetdicom), and says which at start-up.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from relay.config import ConfigError
from relay.toolkits.base import Engine

if TYPE_CHECKING:
    from relay.config import Config

log = logging.getLogger("relay.toolkits")


def _auto(config: Config) -> tuple[str, str]:
    from relay.toolkits.dcmtk import find_tool

    tk = config.toolkit
    if tk.dcm4che_home.is_dir():
        return "dcm4che", f"{tk.dcm4che_home} exists"
    try:
        find_tool(tk.dcmtk_bin, "storescp")
    except FileNotFoundError:
        return "embedded", (f"no dcm4che at {tk.dcm4che_home}, no DCMTK storescp in "
                            f"{tk.dcmtk_bin}")
    return "dcmtk", f"no dcm4che at {tk.dcm4che_home}; DCMTK found in {tk.dcmtk_bin}"


def _check_tls(config: Config, engine: str) -> None:
    """Refuse TLS settings an engine cannot honour, rather than send in the clear."""
    if engine == "dcm4che" and (config.receiver.tls is not None
                                or any(d.tls for d in config.destinations)):
        raise ConfigError(f"{config.source}: tls: the dcm4che engine does not support TLS yet "
                          "(its tools need Java key stores); expected engine = \"embedded\"")


def select_engine(config: Config) -> Engine:
    """The engine the config asks for; config errors name the file and the key."""
    tk = config.toolkit
    wanted = tk.engine
    if wanted == "auto":
        wanted, why = _auto(config)
        log.info("engine auto: %s (%s)", wanted, why)
    if tk.converter == "toolkit" and wanted != "dcm4che":
        raise ConfigError(f"{config.source}: toolkit.converter: 'toolkit' needs engine dcm4che "
                          f"(engine is {wanted}; DCMTK's xml2dcm cannot read PS3.19 native "
                          "XML): expected 'embedded'")
    _check_tls(config, wanted)
    try:
        if wanted == "dcm4che":
            from relay.toolkits.dcm4che import Dcm4cheEngine

            return Dcm4cheEngine(tk.dcm4che_home)
        if wanted == "dcmtk":
            from relay.toolkits.dcmtk import DcmtkEngine

            return DcmtkEngine(tk.dcmtk_bin)
    except FileNotFoundError as exc:
        key = "dcm4che_home" if wanted == "dcm4che" else "dcmtk_bin"
        raise ConfigError(f"{config.source}: toolkit.{key}: {exc}") from None
    from relay.toolkits.embedded import EmbeddedEngine

    return EmbeddedEngine()
