"""control: jobs.control, the ControlNets / T2I-Adapters of a job

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-04
"""

import sqlalchemy as sa
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: existing rows are jobs without controls.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("control", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("control")
