"""C-FIND through the relay: the requester's identifier goes to the PACS as it came, and each
pending match comes back as the PACS sends it; a C-CANCEL is passed on."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from pydicom.dataset import Dataset
from pynetdicom import build_context
from pynetdicom.sop_class import ModalityWorklistInformationFind

from relay.ops.logs import shown
from relay.services.upstream import UNABLE_TO_PROCESS, PacsUnavailable, Upstream

log = logging.getLogger("relay.services")

PENDING = (0xFF00, 0xFF01)
CANCEL = 0xFE00
MSG_ID = 1  # one request per association to the PACS


def status(code: int, comment: str) -> Dataset:
    """A response status with its ErrorComment (64 characters at most: LO)."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def forward_find(upstream: Upstream, identifier: Dataset, model: str,
                 cancelled: Callable[[], bool]
                 ) -> Iterator[tuple[int | Dataset, Dataset | None]]:
    """The EVT_C_FIND handler's body: (status, identifier) pairs for pynetdicom, a pending
    status with each match passed on."""
    what = "worklist" if model == ModalityWorklistInformationFind else "query"
    try:
        assoc = upstream.associate([build_context(model)])
    except PacsUnavailable as exc:
        log.error("C-FIND: %s", exc)
        yield status(UNABLE_TO_PROCESS, f"PACS unavailable: {exc}"), None
        return
    try:
        if not any(cx.abstract_syntax == model for cx in assoc.accepted_contexts):
            yield status(UNABLE_TO_PROCESS, f"the PACS does not answer this {what} model"), None
            return
        context_id = assoc.accepted_contexts[0].context_id
        responses = assoc.send_c_find(identifier, model, msg_id=MSG_ID)
        for rsp, match in responses:
            if "Status" not in rsp:
                yield status(UNABLE_TO_PROCESS, "the PACS stopped answering (timed out or "
                             "aborted)"), None
                return
            code = int(rsp.Status)
            if code not in PENDING:
                yield _final(code, rsp), None
                return
            if cancelled():
                log.info("C-FIND cancelled by the requester: C-CANCEL passed on to %s",
                         upstream.describe())
                assoc.send_c_cancel(MSG_ID, context_id)
                for rsp, _ in responses:  # what the PACS sends until its final response
                    if "Status" not in rsp or int(rsp.Status) not in PENDING:
                        break
                yield CANCEL, None
                return
            yield code, match
        yield status(UNABLE_TO_PROCESS, "the PACS gave no final response"), None
    except (OSError, ValueError, RuntimeError) as exc:
        log.error("C-FIND through %s failed: %s", upstream.describe(), shown(str(exc)))
        yield status(UNABLE_TO_PROCESS, f"query to the PACS failed: {exc}"), None
    finally:
        if assoc.is_established:
            assoc.release()


def _final(code: int, rsp: Dataset) -> int | Dataset:
    """The PACS's final status as the requester gets it: the code, and its comment if any."""
    comment = str(rsp.get("ErrorComment", "") or "")
    return status(code, comment) if comment else code
