"""Migrations applied to an empty database leave no drift from the models (SQLite and Postgres)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from lcmq.migrate import current, head, upgrade
from lcmq.models import Base
from lcmq.repository import normalize_url


def _drift(url: str) -> list:
    engine = create_engine(normalize_url(url))
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        diff = compare_metadata(context, Base.metadata)
    engine.dispose()
    return diff


def test_sqlite_migrations_match_models(tmp_path):
    url = f"sqlite:///{tmp_path / 'fresh.db'}"
    upgrade(url)
    assert current(url) == head()
    assert _drift(url) == []
    tables = set(inspect(create_engine(url)).get_table_names())
    assert {"batches", "jobs", "alembic_version"} <= tables


def test_postgres_migrations_match_models(migrated_pg_url):
    assert current(migrated_pg_url) == head()
    assert _drift(migrated_pg_url) == []


def test_upgrade_twice_is_a_no_op(tmp_path):
    url = f"sqlite:///{tmp_path / 'twice.db'}"
    upgrade(url)
    upgrade(url)
    assert current(url) == head()


def test_missing_schema_says_to_upgrade(tmp_path):
    from lcmq.errors import SchemaError
    from lcmq.repository import Repository

    repo = Repository(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SchemaError, match="lcmq db upgrade"):
        repo.recent_batches()
