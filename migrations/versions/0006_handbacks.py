"""jobs.handbacks: the times a job was handed back to the queue after a transient fault

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing rows were never counted: they start from zero, as a new job does.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("handbacks", sa.Integer, nullable=False, server_default=sa.text("0")))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("handbacks")
