"""The Celery app both sides share: task names, routing (`render.<profile>`), publishing.

Messages carry job ids only; the worker reads everything else from the database. JSON only.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError

from lcmq.errors import BrokerError
from lcmq.settings import Settings, get_settings

RENDER_TASK = "lcmq.render_chunk"


def queue_name(profile: str) -> str:
    return f"render.{profile}"


def _transport_options(settings: Settings) -> dict:
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {"data_folder_in": str(folder / "queue"), "data_folder_out": str(folder / "queue"),
                "processed_folder": str(folder / "processed"), "store_processed": False}
    # A message unacked this long is handed to another worker: keep it above the longest task.
    return {"visibility_timeout": settings.visibility_timeout_s}


def make_app(settings: Settings) -> Celery:
    app = Celery("lcmq", broker=settings.broker_url_resolved, set_as_current=True)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,  # a crash mid-render leaves the message for another worker
        task_reject_on_worker_lost=True,  # ... also when the child is SIGKILLed or OOM-killed
        worker_prefetch_multiplier=1,
        task_time_limit=settings.render_timeout_s,
        task_soft_time_limit=max(settings.render_timeout_s - 30, settings.render_timeout_s * 9 // 10),
        broker_transport_options=_transport_options(settings),
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=True,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        task_default_queue="render.default",
        task_create_missing_queues=True,
        enable_utc=True,
    )
    return app


@lru_cache(maxsize=1)
def get_app() -> Celery:
    return make_app(get_settings())


def publish_chunks(profile: str, batch_id: str, chunks: Sequence[Sequence[str]]) -> int:
    """Send one render task per chunk of job ids over a single broker connection."""
    app = get_app()
    queue = queue_name(profile)
    try:
        with app.producer_or_acquire() as producer:
            for number, job_ids in enumerate(chunks):
                app.send_task(RENDER_TASK, args=[batch_id, list(job_ids)], queue=queue,
                              task_id=f"{batch_id}-{number:06d}", producer=producer)
    except (KombuOperationalError, OSError) as exc:
        raise BrokerError(f"publishing to {queue}: {exc}") from exc
    return len(chunks)
