"""lcmq: a distributed batch rendering queue for few-step (LCM-LoRA) diffusion.

The contract package: settings, profiles, job specs, tables, repository, queue, storage, and
the Python API below. It imports neither `worker` nor `scheduler` at import time, nor torch.
"""

from __future__ import annotations

__version__ = "0.1.0"

from lcmq.api import BatchStatus, batches, export, jobs, manifest, models, status, submit, wait  # noqa: E402

__all__ = ["BatchStatus", "batches", "export", "jobs", "manifest", "models", "status", "submit", "wait", "__version__"]
