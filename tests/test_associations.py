"""relay.toolkits.associations: the file head written for each received object."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event

from relay.toolkits.associations import file_head


def received(sop_class: str, sop_instance: str, syntax: str, calling: str) -> Event:
    """An EVT_C_STORE event as pynetdicom makes it (its request and context; the
    association faked: only its requestor's AE title is read)."""
    request = C_STORE()
    request.AffectedSOPClassUID = sop_class
    request.AffectedSOPInstanceUID = sop_instance
    context = SimpleNamespace(transfer_syntax=syntax)
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title=calling))
    return Event(assoc, SimpleNamespace(description="C-STORE", is_intervention=True),
                 {"request": request, "context": context})


@pytest.mark.parametrize(("sop_class", "sop_instance", "syntax", "calling"), [
    ("1.2.840.10008.5.1.4.1.1.2", "1.2.3.4.5", ExplicitVRLittleEndian, "MODALITY"),
    ("1.2.840.10008.5.1.4.1.1.4", "1.2.3.44", JPEGBaseline8Bit, "CT01"),  # odd lengths
    ("1.2.840.10008.5.1.4.1.1.7", "2.25.1", ExplicitVRLittleEndian, "A"),
])
def test_file_head_is_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str,
                                          calling: str) -> None:
    event = received(sop_class, sop_instance, syntax, calling)
    meta = event.file_meta
    meta.SourceApplicationEntityTitle = calling
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta, enforce_standard=True)
    assert file_head(event) == b"\x00" * 128 + b"DICM" + buffer.getvalue()
