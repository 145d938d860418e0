"""Associations from the relay to the PACS that answers queries ([query].destination)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, evt
from pynetdicom.presentation import PresentationContext

from relay.toolkits.associations import set_nodelay
from relay.toolkits.tls import client_context

if TYPE_CHECKING:
    from relay.config.model import Config, Destination

# "Unable to process" (a C-FIND, C-GET or C-MOVE failure in the Cxxx range), with an
# ErrorComment: what the relay answers when the PACS behind it cannot.
UNABLE_TO_PROCESS = 0xC001


class PacsUnavailable(Exception):
    """The PACS could not be reached, refused the association, or broke it off."""


class Upstream:
    """Opens associations to the query destination as [sender].calling_ae_title, with the
    sender's timeout, the destination's TLS, and TCP_NODELAY (design.md)."""

    def __init__(self, config: Config) -> None:
        assert config.query is not None
        self.destination: Destination = config.destination(config.query.destination)
        self.calling_ae = config.sender.calling_ae_title
        self.timeout = config.sender.timeout

    def describe(self) -> str:
        d = self.destination
        return f"{d.name} ({d.ae_title}@{d.host}:{d.port})"

    def associate(self, contexts: Sequence[PresentationContext],
                  handlers: Sequence[tuple[Any, Any]] = (), roles: Sequence[Any] = ()) -> Any:
        """An established association proposing `contexts`; raise PacsUnavailable."""
        ae = AE(ae_title=self.calling_ae)
        for timeout in ("acse_timeout", "dimse_timeout", "network_timeout",
                        "connection_timeout"):
            setattr(ae, timeout, self.timeout)
        ae.maximum_pdu_size = 0
        ae.requested_contexts = list(contexts)
        d = self.destination
        try:
            tls_args = (client_context(d.tls), d.host) if d.tls else None
        except (OSError, ValueError) as exc:
            raise PacsUnavailable(f"cannot load {d.name}'s TLS files: {exc}") from None
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title,
                             ext_neg=list(roles) or None, tls_args=tls_args,
                             evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay), *handlers])
        if not assoc.is_established:
            why = ("association rejected" if assoc.is_rejected else
                   "cannot connect or association aborted")
            raise PacsUnavailable(f"{self.describe()}: {why}")
        return assoc
