"""Which engine runs: the one the config names; with `engine = "auto"` dcm4che if
`dcm4che_home` exists, else DCMTK if its storescp is in `dcmtk_bin`, else the embedded engine
(pydicom + pynetdicom), saying which at start-up. The engines' modules are imported only
when chosen: a relay on DCMTK never loads the others."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from relay.config.model import ConfigError
from relay.toolkits.base import Engine

if TYPE_CHECKING:
    from relay.config.model import Config
    from relay.toolkits.dcm4che import Dcm4cheEngine

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


def _prepare_dcm4che_tls(config: Config, engine: Dcm4cheEngine) -> None:
    """Make the Java key stores for every [tls] table now, so that a bad PEM file or a missing
    keytool stops the start-up with the key named, not the first send."""
    tables = [("receiver.tls", config.receiver.tls)] + [
        (f"[[destinations]][{i}].tls", d.tls) for i, d in enumerate(config.destinations)]
    for key, tls in tables:
        if tls is None:
            continue
        if key != "receiver.tls" and not tls.require_peer_certificate:
            raise ConfigError(f"{config.source}: {key}.require_peer_certificate: dcm4che's "
                              "sender always verifies the destination's certificate; "
                              "expected true, with ca")
        try:
            engine.stores(tls)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{config.source}: {key}: cannot make the Java key stores "
                              f"dcm4che needs: {exc}") from None


def _check_filters(config: Config, engine: Engine) -> Engine:
    """Refuse a filter key the engine cannot know, naming it."""
    if not engine.knows_called_ae:
        for i, dest in enumerate(config.destinations):
            if dest.filter is not None and any(k.key == "called_ae" for k in dest.filter.keys):
                raise ConfigError(
                    f"{config.source}: [[destinations]][{i}].filter.called_ae: the "
                    f"{engine.name} engine cannot know the called AE title (its storescp "
                    "accepts any): expected no called_ae filter, or engine = \"embedded\" "
                    "or \"dcm4che\"")
    return engine


def select_engine(config: Config) -> Engine:
    """The engine the config asks for; config errors name the file and the key."""
    return _check_filters(config, _select_engine(config))


def _select_engine(config: Config) -> Engine:
    tk = config.toolkit
    wanted = tk.engine
    if wanted == "auto":
        wanted, why = _auto(config)
        log.info("engine auto: %s (%s)", wanted, why)
    if tk.converter == "toolkit" and wanted != "dcm4che":
        raise ConfigError(f"{config.source}: toolkit.converter: 'toolkit' needs engine dcm4che "
                          f"(engine is {wanted}; DCMTK's xml2dcm cannot read PS3.19 native "
                          "XML): expected 'embedded'")
    try:
        if wanted == "dcm4che":
            from relay.toolkits.dcm4che import Dcm4cheEngine

            engine = Dcm4cheEngine(tk.dcm4che_home)
            _prepare_dcm4che_tls(config, engine)
            return engine
        if wanted == "dcmtk":
            from relay.toolkits.dcmtk import DcmtkEngine

            return DcmtkEngine(tk.dcmtk_bin)
    except FileNotFoundError as exc:
        key = "dcm4che_home" if wanted == "dcm4che" else "dcmtk_bin"
        raise ConfigError(f"{config.source}: toolkit.{key}: {exc}") from None
    from relay.toolkits.embedded import EmbeddedEngine

    return EmbeddedEngine()
