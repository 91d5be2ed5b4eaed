"""One error hierarchy for lcmq.

Transient errors (network, broker, database disconnects, S3 5xx) are worth retrying; permanent
ones (an invalid spec, a model that cannot load) fail at once with the reason stored.
"""

from __future__ import annotations


class LcmqError(Exception):
    """Base of every error lcmq raises on purpose."""

    transient = False


class PermanentError(LcmqError):
    """Retrying cannot help: the job fails at once and the reason is stored."""


class TransientError(LcmqError):
    """A passing fault: retry with backoff."""

    transient = True


class InputError(PermanentError):
    """A bad row or flag in a submitted batch; names where it is and which field."""

    def __init__(self, source: str, line: int | None, field: str | None, message: str):
        self.source = source
        self.line = line
        self.field = field
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = [self.source]
        if self.line is not None:
            where.append(str(self.line))
        if self.field:
            where.append(self.field)
        return f"{':'.join(where)}: {self.message}"


class ProfileError(PermanentError):
    """A model profile is unknown, malformed, or cannot be loaded."""


class ConfigError(PermanentError):
    """Settings or the lcmq.toml file are invalid."""


class NotFoundError(PermanentError):
    """A batch or job id that does not exist."""


class DatabaseError(TransientError):
    """The database could not be reached or dropped the connection."""


class RecordError(PermanentError):
    """The database refused a write for its content (a constraint, a value out of range)."""


class QueryError(PermanentError):
    """The database refused a statement as written (a bug, not an outage): retrying repeats it."""


class SchemaError(PermanentError):
    """The database has no lcmq schema (run `lcmq db upgrade`)."""


class StorageError(TransientError):
    """Object storage failed in a way a retry may fix (5xx, timeouts, connection loss)."""


class PermanentStorageError(PermanentError):
    """Object storage refused for good (no such bucket, access denied, bad key)."""


class MissingObjectError(PermanentStorageError):
    """No object at the key or URL read (a deleted image, a mistyped catalog URL)."""


class BrokerError(TransientError):
    """The message broker could not be reached."""


class ModelLoadError(PermanentError):
    """The pipeline for a profile could not be loaded."""


def is_transient(exc: BaseException) -> bool:
    return bool(getattr(exc, "transient", False))
