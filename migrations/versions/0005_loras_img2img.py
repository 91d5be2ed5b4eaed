"""loras and img2img: jobs.loras, jobs.init_image, jobs.strength

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-28
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: existing rows are text2img jobs without style LoRAs.
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("loras", sa.JSON, nullable=True))
        batch.add_column(sa.Column("init_image", sa.Text, nullable=True))
        batch.add_column(sa.Column("strength", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("strength")
        batch.drop_column("init_image")
        batch.drop_column("loras")
