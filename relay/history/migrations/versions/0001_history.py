"""The history's first schema: events, objects, deliveries, studies.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

UID = 128
VALUE = 400


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True,
                  autoincrement=True),
        sa.Column("relay", sa.String(UID), nullable=False),
        sa.Column("time", sa.Float, nullable=False),
        sa.Column("step", sa.String(32), nullable=False),
        sa.Column("obj", sa.String(VALUE), nullable=False),
        sa.Column("destination", sa.String(UID)),
        sa.Column("status", sa.String(64)),
        sa.Column("reason", sa.String(VALUE)),
        sa.Column("detail", sa.Text),
        sa.Column("actor", sa.String(UID)),
    )
    op.create_index("ix_events_obj", "events", ["relay", "obj"])
    op.create_index("ix_events_time", "events", ["time"])
    op.create_index("ix_events_destination_time", "events", ["destination", "time"])
    op.create_table(
        "objects",
        sa.Column("relay", sa.String(UID), primary_key=True),
        sa.Column("obj", sa.String(VALUE), primary_key=True),
        sa.Column("sop_instance_uid", sa.String(UID)),
        sa.Column("sop_class_uid", sa.String(UID)),
        sa.Column("series_instance_uid", sa.String(UID)),
        sa.Column("study_instance_uid", sa.String(UID)),
        sa.Column("modality", sa.String(16)),
        sa.Column("calling_ae", sa.String(64)),
        sa.Column("size", sa.BigInteger),
        sa.Column("received", sa.Float),
        sa.Column("state", sa.String(32)),
        sa.Column("updated", sa.Float),
    )
    op.create_index("ix_objects_study", "objects", ["study_instance_uid"])
    op.create_index("ix_objects_sop", "objects", ["sop_instance_uid"])
    op.create_index("ix_objects_updated", "objects", ["updated"])
    op.create_table(
        "deliveries",
        sa.Column("relay", sa.String(UID), primary_key=True),
        sa.Column("obj", sa.String(VALUE), primary_key=True),
        sa.Column("destination", sa.String(UID), primary_key=True),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("status", sa.String(64)),
        sa.Column("updated", sa.Float, nullable=False),
    )
    op.create_index("ix_deliveries_updated", "deliveries", ["updated"])
    op.create_table(
        "studies",
        sa.Column("study_instance_uid", sa.String(UID), primary_key=True),
        sa.Column("patient_id", sa.String(VALUE)),
        sa.Column("patient_id_sent", sa.String(VALUE)),
        sa.Column("patient_name", sa.String(VALUE)),
        sa.Column("patient_name_folded", sa.String(VALUE)),
        sa.Column("accession_number", sa.String(VALUE)),
        sa.Column("calling_ae", sa.String(64)),
        sa.Column("first_received", sa.Float),
        sa.Column("last_event", sa.Float),
    )
    for name, column in (("ix_studies_patient_id", "patient_id"),
                         ("ix_studies_patient_id_sent", "patient_id_sent"),
                         ("ix_studies_accession", "accession_number"),
                         ("ix_studies_name", "patient_name_folded"),
                         ("ix_studies_last_event", "last_event")):
        op.create_index(name, "studies", [column])


def downgrade() -> None:
    for table in ("studies", "deliveries", "objects", "events"):
        op.drop_table(table)
