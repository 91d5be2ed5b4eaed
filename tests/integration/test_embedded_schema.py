"""The embedded SQLite database migrates itself on first use; Postgres waits for `lcmq db upgrade`."""

from __future__ import annotations

import json
import subprocess

import pytest

from bench.harness import PG_ADMIN, VENV_BIN, create_database


def test_a_fresh_folder_needs_no_db_upgrade(embedded_env, tmp_path):
    from lcmq import api
    from lcmq.migrate import current, head
    from lcmq.settings import get_settings

    assert not (tmp_path / ".lcmq").exists()
    assert api.batches() == []
    assert current(get_settings().database_url_resolved) == head()


def test_an_old_embedded_database_is_brought_to_head(embedded_env):
    from lcmq import api
    from lcmq.migrate import current, head, upgrade
    from lcmq.settings import get_settings

    url = get_settings().database_url_resolved
    upgrade(url, "0004")  # as an older lcmq left it
    assert api.batches() == []
    assert current(url) == head()


def test_first_commands_started_together_migrate_once(embedded_env):
    command = [str(VENV_BIN / "lcmq"), "batches", "--json"]
    started = [
        subprocess.Popen(command, env=embedded_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for process in started:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err
        assert json.loads(out) == []


@pytest.fixture
def empty_pg_url():
    try:
        url, drop = create_database(PG_ADMIN)
    except Exception as exc:  # noqa: BLE001 - any driver error means the service is missing
        pytest.skip(f"PostgreSQL is not reachable: {exc}")
    yield url
    drop()


def test_postgres_is_left_to_an_explicit_upgrade(embedded_env, empty_pg_url, monkeypatch):
    from lcmq import api
    from lcmq.errors import SchemaError
    from lcmq.migrate import current
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_DATABASE_URL", empty_pg_url)
    reset_settings()
    with pytest.raises(SchemaError, match="lcmq db upgrade"):
        api.batches()
    assert current(empty_pg_url) is None
