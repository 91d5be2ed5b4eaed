"""schedule time zones: schedules.timezone (the IANA zone its cron fields are wall-clock times in)

Revision ID: 0007
Revises: 0005
Create Date: 2026-12-01
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Existing schedules were evaluated in UTC: the default keeps their fire times.
    with op.batch_alter_table("schedules") as batch:
        batch.add_column(sa.Column("timezone", sa.String(64), nullable=False, server_default="UTC"))


def downgrade() -> None:
    with op.batch_alter_table("schedules") as batch:
        batch.drop_column("timezone")
