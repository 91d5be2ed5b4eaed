"""`lcmq db upgrade`: Alembic migrations to head, configured in code (no alembic.ini needed).

An embedded SQLite database also migrates itself on first use (`ensure_embedded_schema`);
Postgres, shared by a farm, changes on an explicit `lcmq db upgrade` only.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from alembic.config import Config

log = logging.getLogger("lcmq.migrate")


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    import migrations  # a package so that an installed lcmq carries its migrations

    config = Config()
    config.set_main_option("script_location", str(Path(migrations.__file__).parent))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    from lcmq.repository import engine_for

    with engine_for(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head() -> str:
    """The newest revision this lcmq carries (one head: migrations form a single line)."""
    from alembic.script import ScriptDirectory

    newest = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    assert newest is not None  # the package ships its migrations
    return newest


def is_embedded(url: str) -> bool:
    """A SQLite database: a file of this machine's, which lcmq may create and migrate by itself."""
    return url.startswith("sqlite")


# The embedded databases this process has seen at head (one check per process, not per call).
_AT_HEAD: set[str] = set()


def ensure_embedded_schema(url: str) -> None:
    """Bring an embedded database to head: created by the first command that needs it, and
    upgraded by the first one after an lcmq upgrade. Any other database is left as it is."""
    if url in _AT_HEAD or not is_embedded(url):
        return
    with _migration_lock(url):  # two first commands at once: one migrates, the other sees head
        if current(url) != head():
            log.info("migrating the embedded database", extra={"url": url})
            upgrade(url)
    _AT_HEAD.add(url)


@contextlib.contextmanager
def _migration_lock(url: str) -> Iterator[None]:
    from sqlalchemy.engine import make_url

    database = make_url(url).database
    if not database or database == ":memory:":  # private to this process: nobody to race
        yield
        return
    path = Path(database).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".migrate-lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if this process dies
        yield
