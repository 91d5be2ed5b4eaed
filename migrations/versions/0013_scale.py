"""scale: per-batch job counters kept by triggers, and the batch index that carries dispatched_at

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-02

batch_counts holds each batch's jobs per state, so `lcmq status`, GET /v1/batches/{id} and
/metrics read a row per batch instead of counting 10^6 jobs. On Postgres three statement-level
triggers on jobs (INSERT, UPDATE, DELETE, each with its transition table) add every statement's
moves: one counter write per batch a statement touched, in that statement's transaction, so the
counts are exact under any concurrency (the counter row's lock serialises the additions) and a
micro-batch of 32 records costs one write, not 32. An UPDATE that moves no job between states
(a lease renewal, a dispatch stamp) writes nothing. Existing jobs are counted once here, with
writers to jobs held off meanwhile. SQLite keeps the table empty: it counts (embedded, small).

ix_jobs_batch_state (batch_id, state) becomes (batch_id, state, dispatched_at): the same prefix
for every query that used it, and the oldest queued message of a batch (/metrics' queue age) in
one index probe instead of a scan of the batch's queued jobs.
"""

import sqlalchemy as sa
from alembic import op

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

# JobState's values as of this revision: a column each (a migration is a snapshot).
STATES = ("queued", "running", "succeeded", "failed", "canceled")
EVENTS = ("insert", "update", "delete")


def _moves(event: str) -> str:
    """The statement's jobs as (batch_id, state, ±1): a new row adds to its state, an old one
    takes from it (an UPDATE is both)."""
    new = "SELECT batch_id, state, 1 AS n FROM new_jobs"
    old = "SELECT batch_id, state, -1 AS n FROM old_jobs"
    return {"insert": new, "update": f"{new} UNION ALL {old}", "delete": old}[event]


def _function_sql(event: str) -> str:
    per_batch = ", ".join(f"coalesce(sum(n) FILTER (WHERE state = '{state}'), 0) AS {state}" for state in STATES)
    moved = f"""
        WITH moved AS (
            SELECT batch_id, state, sum(n) AS n FROM ({_moves(event)}) AS m
            GROUP BY batch_id, state HAVING sum(n) <> 0
        )"""
    if event == "delete":
        # Deleting a batch cascades to its counter row and its jobs: only rows still there are
        # updated (inserting one for a deleted batch would break its foreign key).
        added = ", ".join(f"{state} = c.{state} + d.{state}" for state in STATES)
        body = f"""{moved}
        UPDATE batch_counts AS c SET {added}
        FROM (SELECT batch_id, {per_batch} FROM moved GROUP BY batch_id) AS d
        WHERE c.batch_id = d.batch_id;"""
    else:
        added = ", ".join(f"{state} = c.{state} + excluded.{state}" for state in STATES)
        # ORDER BY: a statement that touches several batches locks their rows in one order.
        body = f"""{moved}
        INSERT INTO batch_counts AS c (batch_id, {", ".join(STATES)})
        SELECT batch_id, {per_batch} FROM moved GROUP BY batch_id ORDER BY batch_id
        ON CONFLICT (batch_id) DO UPDATE SET {added};"""
    return f"""
        CREATE FUNCTION lcmq_count_jobs_{event}() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN{body}
            RETURN NULL;
        END $$"""


def _trigger_sql(event: str) -> str:
    tables = {"insert": "NEW TABLE AS new_jobs", "update": "NEW TABLE AS new_jobs OLD TABLE AS old_jobs"}
    referencing = tables.get(event, "OLD TABLE AS old_jobs")
    return f"""
        CREATE TRIGGER lcmq_count_jobs_{event} AFTER {event.upper()} ON jobs
        REFERENCING {referencing} FOR EACH STATEMENT EXECUTE FUNCTION lcmq_count_jobs_{event}()"""


def upgrade() -> None:
    op.create_table(
        "batch_counts",
        sa.Column("batch_id", sa.String(32), sa.ForeignKey("batches.id", ondelete="CASCADE"), primary_key=True),
        *(sa.Column(state, sa.BigInteger, nullable=False, server_default=sa.text("0")) for state in STATES),
    )
    op.drop_index("ix_jobs_batch_state", table_name="jobs")
    op.create_index("ix_jobs_batch_state_dispatched", "jobs", ["batch_id", "state", "dispatched_at"])
    if op.get_bind().dialect.name != "postgresql":
        return
    # Count what is there and start the triggers with no write to jobs in between (readers go on).
    op.execute("LOCK TABLE jobs IN SHARE ROW EXCLUSIVE MODE")
    sums = ", ".join(f"count(*) FILTER (WHERE state = '{state}')" for state in STATES)
    op.execute(
        f"INSERT INTO batch_counts (batch_id, {', '.join(STATES)}) SELECT batch_id, {sums} FROM jobs GROUP BY batch_id"
    )
    for event in EVENTS:
        op.execute(_function_sql(event))
        op.execute(_trigger_sql(event))
    # TRUNCATE jobs (tests, a wiped install) leaves no job to count.
    op.execute(
        "CREATE FUNCTION lcmq_count_jobs_truncate() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN DELETE FROM batch_counts; RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER lcmq_count_jobs_truncate AFTER TRUNCATE ON jobs "
        "FOR EACH STATEMENT EXECUTE FUNCTION lcmq_count_jobs_truncate()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for event in (*EVENTS, "truncate"):
            op.execute(f"DROP TRIGGER IF EXISTS lcmq_count_jobs_{event} ON jobs")
            op.execute(f"DROP FUNCTION IF EXISTS lcmq_count_jobs_{event}()")
    op.drop_index("ix_jobs_batch_state_dispatched", table_name="jobs")
    op.create_index("ix_jobs_batch_state", "jobs", ["batch_id", "state"])
    op.drop_table("batch_counts")
