"""lcmq: a distributed batch rendering queue for few-step (LCM-LoRA) diffusion.

The contract package: settings, profiles, job specs, tables, repository, queue, storage, and
the Python API below. It imports neither `worker` nor `scheduler` at import time, nor torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

# `lcmq.submit(...)` and friends come from lcmq.api, imported on first use: `import lcmq.errors`
# (a worker's, a script's) and `lcmq --help` then load no Celery, SQLAlchemy or pydantic.
_API_NAMES = frozenset({"BatchStatus", "batches", "export", "jobs", "manifest", "models", "status", "submit", "wait"})

__all__ = ["BatchStatus", "__version__", "batches", "export", "jobs", "manifest", "models", "status", "submit", "wait"]


def __getattr__(name: str) -> Any:
    if name in _API_NAMES:
        from lcmq import api

        return getattr(api, name)
    raise AttributeError(f"module 'lcmq' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API_NAMES))
