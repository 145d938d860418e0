"""The history's tables (SQLAlchemy Core). Migrations (alembic, migrations/versions/) create
and upgrade them; this module is what the code reads and writes.

An object is named as the spool names it (`obj`), per relay: `objects` holds what it was when
it was received (identity as received: what an administrator searches by), `deliveries` its
state at each destination, `events` everything that happened to it, `studies` one row per
StudyInstanceUID as received (shared by every relay of one history)."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

metadata = MetaData()

# Long enough for every value a DICOM header may hold in these attributes (LO 64, PN 5×64,
# UI 64) and for hostile values that are not valid (kept, truncated to fit).
UID = 128
VALUE = 400

events = Table(
    "events", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True,
           autoincrement=True),
    Column("relay", String(UID), nullable=False),
    Column("time", Float, nullable=False),
    Column("step", String(32), nullable=False),
    Column("obj", String(VALUE), nullable=False),
    Column("destination", String(UID)),
    Column("status", String(64)),
    Column("reason", String(VALUE)),
    Column("detail", Text),
    Column("actor", String(UID)),  # the console user or API token behind an action
    Index("ix_events_obj", "relay", "obj"),
    Index("ix_events_time", "time"),
    Index("ix_events_destination_time", "destination", "time"),
    Index("ix_events_destination_step_time", "destination", "step", "time"),  # 0002
    Index("ix_events_step_time", "step", "time"),  # 0002
)

objects = Table(
    "objects", metadata,
    Column("relay", String(UID), primary_key=True),
    Column("obj", String(VALUE), primary_key=True),
    Column("sop_instance_uid", String(UID)),
    Column("sop_class_uid", String(UID)),
    Column("series_instance_uid", String(UID)),
    Column("study_instance_uid", String(UID)),
    Column("modality", String(16)),
    Column("calling_ae", String(64)),
    Column("size", BigInteger),
    Column("received", Float),
    Column("state", String(32)),  # received | failed | unrouted | deleted
    Column("updated", Float),
    Index("ix_objects_study", "study_instance_uid"),
    Index("ix_objects_sop", "sop_instance_uid"),
    Index("ix_objects_updated", "updated"),
)

deliveries = Table(
    "deliveries", metadata,
    Column("relay", String(UID), primary_key=True),
    Column("obj", String(VALUE), primary_key=True),
    Column("destination", String(UID), primary_key=True),
    Column("state", String(32), nullable=False),  # queued | held | delivered | failed
    Column("status", String(64)),
    Column("updated", Float, nullable=False),
    Index("ix_deliveries_updated", "updated"),
)

studies = Table(
    "studies", metadata,
    Column("study_instance_uid", String(UID), primary_key=True),
    Column("patient_id", String(VALUE)),  # as received
    Column("patient_id_sent", String(VALUE)),  # as the global rules made it
    Column("patient_name", String(VALUE)),
    Column("patient_name_folded", String(VALUE)),  # lower case, for the search
    Column("accession_number", String(VALUE)),
    Column("calling_ae", String(64)),
    Column("first_received", Float),
    Column("last_event", Float),
    Index("ix_studies_patient_id", "patient_id"),
    Index("ix_studies_patient_id_sent", "patient_id_sent"),
    Index("ix_studies_accession", "accession_number"),
    Index("ix_studies_name", "patient_name_folded"),
    Index("ix_studies_last_event", "last_event"),
)
