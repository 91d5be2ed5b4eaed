"""`GET /readyz`: the database, the broker and the storage each answer, within a short time.

The checks are a worker's start-up checks where they fit (worker.startup.check_storage: a HEAD
of a key no job writes, or a write to the storage folder), with short timeouts: a probe answers
in seconds or names the part that did not.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from lcmq.errors import LcmqError
from lcmq.queue import check_broker
from lcmq.repository import Repository
from lcmq.settings import Settings

CHECK_TIMEOUT_S = 3.0
OK = "ok"

# Probes that hang (a host that drops packets) keep their thread until the driver gives up; a
# small pool of their own keeps them from taking the request threads.
_probes = ThreadPoolExecutor(max_workers=6, thread_name_prefix="lcmq-readyz")


def check_database(repo: Repository) -> None:
    repo.ping()


def check_broker_reachable(settings: Settings) -> None:
    if settings.embedded_broker:  # the filesystem broker: its folder is there or can be made
        try:
            settings.broker_folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise LcmqError(f"cannot make the broker folder {settings.broker_folder}: {exc}") from exc
        return
    check_broker(timeout_s=CHECK_TIMEOUT_S)


def check_storage_reachable(settings: Settings) -> None:
    from worker.startup import check_storage  # no torch: the device check is not imported

    quick = settings.model_copy(update={"s3_timeout_s": CHECK_TIMEOUT_S, "s3_max_attempts": 1})
    check_storage(quick)


def checks(repo: Repository, settings: Settings) -> dict[str, Callable[[], None]]:
    return {
        "database": lambda: check_database(repo),
        "broker": lambda: check_broker_reachable(settings),
        "storage": lambda: check_storage_reachable(settings),
    }


def readiness(repo: Repository, settings: Settings) -> dict[str, str]:
    """Each part's "ok" or what went wrong; run side by side, each given CHECK_TIMEOUT_S."""
    futures = {name: _probes.submit(probe) for name, probe in checks(repo, settings).items()}
    results = {}
    for name, future in futures.items():
        try:
            future.result(timeout=CHECK_TIMEOUT_S + 1)
            results[name] = OK
        except FutureTimeout:
            results[name] = f"no answer within {CHECK_TIMEOUT_S:g} s"
        except LcmqError as exc:
            results[name] = str(exc)
        except Exception as exc:  # noqa: BLE001 - any failure of a probe means "not ready", named
            results[name] = f"{type(exc).__name__}: {exc}"
    return results
