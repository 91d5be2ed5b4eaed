"""reliability: idempotency keys, priority, cancel, outbox markers, warnings

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("idempotency_key", sa.String(64), nullable=True))
        batch.add_column(sa.Column("priority", sa.Integer, nullable=False, server_default=sa.text("0")))
        batch.add_column(sa.Column("canceled_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("published_at", sa.DateTime(timezone=True), nullable=True))
        batch.create_unique_constraint("uq_batches_idempotency_key", ["idempotency_key"])
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("warning", sa.Text, nullable=True))
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
    # Batches and jobs that existed before this revision were published when they were submitted.
    op.execute("UPDATE jobs SET dispatched_at = created_at")
    op.execute("UPDATE batches SET published_at = created_at")
    op.create_index("ix_jobs_state_lease", "jobs", ["state", "lease_until"])
    op.create_index("ix_jobs_state_dispatched", "jobs", ["state", "dispatched_at"])


def downgrade() -> None:
    op.drop_index("ix_jobs_state_dispatched", table_name="jobs")
    op.drop_index("ix_jobs_state_lease", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatched_at")
        batch.drop_column("warning")
    with op.batch_alter_table("batches") as batch:
        batch.drop_constraint("uq_batches_idempotency_key", type_="unique")
        batch.drop_column("published_at")
        batch.drop_column("canceled_at")
        batch.drop_column("priority")
        batch.drop_column("idempotency_key")
