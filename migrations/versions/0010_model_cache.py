"""worker rows: how the load found its s3:// models (cache hit, miss or partial) and the fetch time

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-02
"""

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.add_column(sa.Column("model_cache", sa.String(length=10), nullable=True))
        batch.add_column(sa.Column("fetch_s", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("workers") as batch:
        batch.drop_column("fetch_s")
        batch.drop_column("model_cache")
