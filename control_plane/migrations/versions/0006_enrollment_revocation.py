"""enrollment tokens can be revoked before they are used

Revision ID: 0006_enrollment_revocation
Revises: 0005_personalisation
Create Date: 2026-12-07 23:40:00
"""

import sqlalchemy as sa
from alembic import op

revision = "0006_enrollment_revocation"
down_revision = "0005_personalisation"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.add_column(sa.Column("revoked_at", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("revoked_by", sa.String(length=32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("enrollment_tokens", schema=None) as batch_op:
        batch_op.drop_column("revoked_by")
        batch_op.drop_column("revoked_at")
