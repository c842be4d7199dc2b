"""on-device fine-tuning: device labels, the per-device label counter and the operator's
per-device and per-group personalisation switch

Revision ID: 0005_personalisation
Revises: 0004_rollouts
Create Date: 2026-12-10 12:00:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_personalisation"
down_revision = "0004_rollouts"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.add_column(sa.Column("personalisation", sa.Boolean(), nullable=True))
        batch_op.add_column(
            sa.Column("label_seq", sa.BigInteger(), server_default="0", nullable=False)
        )

    op.create_table(
        "device_labels",
        sa.Column("device_id", sa.String(length=64), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sample_id", sa.String(length=128), nullable=False),
        sa.Column("label", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.id"], name=op.f("fk_device_labels_device_id_devices")
        ),
        sa.PrimaryKeyConstraint("device_id", "seq", name=op.f("pk_device_labels")),
    )
    op.create_table(
        "group_settings",
        sa.Column("group", sa.String(length=64), nullable=False),
        sa.Column("personalisation", sa.Boolean(), nullable=True),
        sa.Column("updated_at", sa.Float(), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=False),
        sa.PrimaryKeyConstraint("group", name=op.f("pk_group_settings")),
    )


def downgrade() -> None:
    op.drop_table("group_settings")
    op.drop_table("device_labels")
    with op.batch_alter_table("devices", schema=None) as batch_op:
        batch_op.drop_column("label_seq")
        batch_op.drop_column("personalisation")
