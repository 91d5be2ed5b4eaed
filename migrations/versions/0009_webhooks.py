"""webhook outbox scan: a partial index on the batches whose final webhook is still to be queued

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# The sender looks every second for batches that carry a webhook not yet queued: only those
# rows are in the index, so the scan costs the batches waiting for a webhook, not all batches.
WAITING = sa.text("webhook_url IS NOT NULL AND webhook_queued_at IS NULL")


def upgrade() -> None:
    op.create_index(
        "ix_batches_webhook_waiting",
        "batches",
        ["created_at"],
        postgresql_where=WAITING,
        sqlite_where=WAITING,
    )


def downgrade() -> None:
    op.drop_index("ix_batches_webhook_waiting", table_name="batches")
