"""DICOM toolkit adapters behind one interface (relay.toolkits.base.Engine)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from relay.config import ConfigError
from relay.toolkits.base import Engine

if TYPE_CHECKING:
    from relay.config import Config

log = logging.getLogger("relay.toolkits")


def select_engine(config: Config) -> Engine:
    """The engine the config asks for; `auto` takes the embedded one where no supported
    toolkit adapter is available, and says which it picked."""
    wanted = config.toolkit.engine
    if wanted in ("auto", "embedded"):
        from relay.toolkits.embedded import EmbeddedEngine

        if wanted == "auto":
            log.info("engine auto: using the embedded engine (pydicom + pynetdicom)")
        return EmbeddedEngine()
    raise ConfigError(f"{config.source}: toolkit.engine: {wanted!r} is not available in this "
                      "version yet; expected 'auto' or 'embedded'")
