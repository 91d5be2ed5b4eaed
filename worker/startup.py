"""What a worker checks before it consumes anything: its device, database, broker and storage.

A worker that says "ready" takes messages; one that cannot render, record or store them would
fail or retry every job it takes. Each check raises an LcmqError that names what is missing, so
`lcmq worker` exits non-zero with the reason (lcmq/cli.py) and the queue keeps its messages.
"""

from __future__ import annotations

import logging
import tempfile

from lcmq.errors import ConfigError, DatabaseError, PermanentStorageError, SchemaError, StorageError
from lcmq.migrate import ensure_embedded_schema
from lcmq.profiles import NULL_FAMILY, Profile
from lcmq.queue import check_broker
from lcmq.repository import Repository
from lcmq.settings import Settings
from lcmq.storage import FileStorage, storage_from_settings
from worker.pipeline import check_device

log = logging.getLogger("lcmq.worker")

# A key no job writes (job keys start with a batch id): HEAD on it proves the bucket answers and
# these credentials may read it, without writing anything.
STORAGE_PROBE_KEY = "lcmq-worker-start-check"


def check_database(settings: Settings) -> None:
    from sqlalchemy import inspect
    from sqlalchemy.exc import SQLAlchemyError

    # The embedded database migrates itself on first use, and a worker started first is a use;
    # Postgres stays explicit (`lcmq db upgrade`), which the check below asks for.
    ensure_embedded_schema(settings.database_url_resolved)
    try:
        repo = Repository(settings.database_url_resolved)
    except SQLAlchemyError as exc:  # a URL that does not parse, a driver that is not installed
        raise ConfigError(f"LCMQ_DATABASE_URL: {exc}") from exc
    safe_url, engine = repo.safe_url, repo.engine
    try:
        with engine.connect() as conn:
            migrated = inspect(conn).has_table("alembic_version")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc  # the driver's own message, when there is one
        raise DatabaseError(f"cannot reach the database at {safe_url}: {cause}") from exc
    finally:
        engine.dispose()  # the prefork children must not inherit this process's pooled connection
    if not migrated:
        raise SchemaError(f"the database at {safe_url} has no lcmq schema: run `lcmq db upgrade`")


def check_storage(settings: Settings) -> None:
    storage = storage_from_settings(settings)
    if isinstance(storage, FileStorage):
        try:
            storage.root.mkdir(parents=True, exist_ok=True)
            # Images are written as a temporary file then renamed; list_keys skips ".tmp-" names.
            with tempfile.NamedTemporaryFile(dir=storage.root, prefix=".tmp-"):
                pass
        except OSError as exc:
            raise StorageError(f"cannot write to the storage folder {storage.root}: {exc}") from exc
        return
    try:
        storage.exists(STORAGE_PROBE_KEY)
    except (StorageError, PermanentStorageError) as exc:
        raise type(exc)(f"cannot reach the storage at {settings.storage_url}: {exc}") from exc


def check_dependencies(profile: Profile, settings: Settings) -> None:
    """Every check, cheapest first; the first missing dependency stops the start."""
    check_database(settings)
    check_broker()
    check_storage(settings)
    if profile.family != NULL_FAMILY:  # the null renderer uses no device; this one imports torch
        check_device(settings.device)
    log.info(
        "worker dependencies reachable",
        extra={"profile": profile.name, "device": settings.device, "storage": settings.storage_url},
    )
