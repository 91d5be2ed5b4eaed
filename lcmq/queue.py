"""The Celery app both sides share: task names, routing (`render.<profile>`), publishing.

Messages carry job ids only; the worker reads everything else from the database. JSON only.
"""

from __future__ import annotations

import ssl
import uuid
from collections.abc import Iterable, Sequence
from functools import lru_cache
from urllib.parse import urlsplit, urlunsplit

from celery import Celery
from kombu.exceptions import ChannelError
from kombu.exceptions import OperationalError as KombuOperationalError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from lcmq.errors import BrokerError
from lcmq.profiles import queue_name
from lcmq.settings import Settings, get_settings

RENDER_TASK = "lcmq.render_chunk"


FILESYSTEM_POLL_S = 0.05


def _transport_options(settings: Settings) -> dict:
    if settings.embedded_broker:
        folder = settings.broker_folder
        for sub in ("queue", "processed", "control"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        return {
            "data_folder_in": str(folder / "queue"),
            "data_folder_out": str(folder / "queue"),
            "processed_folder": str(folder / "processed"),
            # Exchange tables (the workers' pidbox): kombu's default is ./control, in the user's folder.
            "control_folder": str(folder / "control"),
            "store_processed": False,
            # How long a consumer sleeps when it may not take a message (one is unacked, with
            # prefetch 1) or none is there: kombu's 1 s default made every message cost a
            # second, however short its task. A poll lists one folder.
            "polling_interval": FILESYSTEM_POLL_S,
        }
    return {
        # A message unacked this long is handed to another worker: keep it above the longest task.
        "visibility_timeout": settings.visibility_timeout_s,
        # Batch priority: Redis keeps one list per step; 0 is served first on Redis.
        "queue_order_strategy": "priority",
        "priority_steps": list(range(10)),
    }


def _tls_options(url: str) -> dict:
    """rediss:// needs the certificate policy stated; verify certificates unless the URL says otherwise."""
    if url.startswith("rediss://") and "ssl_cert_reqs" not in url:
        return {"broker_use_ssl": {"ssl_cert_reqs": ssl.CERT_REQUIRED}}
    return {}


def _broker_url(settings: Settings) -> str:
    """The broker URL with a host: kombu warns "No hostname was supplied" at every connection to
    a URL without one, as the filesystem broker's `filesystem://` is."""
    url = settings.broker_url_resolved
    if settings.embedded_broker and not urlsplit(url).netloc:
        return "filesystem://localhost//"  # its folders come from the transport options, not the URL
    return url


def make_app(settings: Settings) -> Celery:
    app = Celery("lcmq", broker=_broker_url(settings), set_as_current=True)
    app.conf.update(_tls_options(settings.broker_url_resolved))
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


# What a lost broker raises, depending on where the loss hits kombu.
BROKER_DOWN = (KombuOperationalError, OSError, RedisConnectionError, RedisTimeoutError)
MAX_PRIORITY = 9
PUBLISH_PIPELINE = 500  # messages per Redis pipeline when publishing chunks


def redis_priority(priority: int) -> int:
    """lcmq's priority (0-9, 9 most urgent) as Redis's (0 served first)."""
    return MAX_PRIORITY - max(0, min(MAX_PRIORITY, priority))


def publish_chunks(
    profile: str, chunks: Sequence[tuple[str, Sequence[str]]], priority: int = 0, countdown_s: float | None = None
) -> int:
    """Send one render task per (batch id, job ids) chunk over a single broker connection
    (`countdown_s`: not before that many seconds, for a hand-back after a transient fault)."""
    app = get_app()
    queue = queue_name(profile)
    try:
        with app.producer_or_acquire() as producer, producer.batch(max_size=PUBLISH_PIPELINE):
            # One Redis pipeline per PUBLISH_PIPELINE messages, not a round trip each. A failed
            # flush loses nothing: the caller marks the batch published only after this returns.
            for batch_id, job_ids in chunks:
                app.send_task(
                    RENDER_TASK,
                    args=[batch_id, list(job_ids)],
                    queue=queue,
                    task_id=f"{batch_id}-{uuid.uuid4().hex[:12]}",
                    producer=producer,
                    priority=redis_priority(priority),
                    countdown=countdown_s,
                )
    except BROKER_DOWN as exc:
        raise BrokerError(f"publishing to {queue}: {exc}") from exc
    return len(chunks)


def check_broker(timeout_s: float = 10.0) -> None:
    """Connect once (a worker does, before it consumes): BrokerError names the broker when it
    cannot be reached, instead of Celery retrying the connection forever in the background."""
    conn = get_app().connection_for_read()
    try:
        with conn:
            conn.ensure_connection(max_retries=1, interval_start=0.5, timeout=timeout_s)
            conn.default_channel  # noqa: B018 - Redis connects on the first channel, not before
    except BROKER_DOWN as exc:
        raise BrokerError(f"cannot reach the broker at {safe_url(get_settings().broker_url_resolved)}: {exc}") from exc


def safe_url(url: str) -> str:
    """A broker URL with its password, if any, hidden, for messages and logs."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def queue_length(profile: str) -> int:
    """Messages waiting in a profile's queue (not those a worker holds unacked)."""
    app = get_app()
    try:
        with app.connection_for_write() as conn:
            return conn.default_channel.queue_declare(queue_name(profile), passive=True).message_count
    except BROKER_DOWN as exc:
        raise BrokerError(f"reading the length of {queue_name(profile)}: {exc}") from exc
    except Exception as exc:  # a queue never declared yet holds nothing
        if "NOT_FOUND" in str(exc) or "not found" in str(exc).lower():
            return 0
        raise


def queue_depths(profiles: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each profile's queue, over one broker connection (a metrics scrape).

    On Redis a queue is one list per priority step (`render.tiny`, `render.tiny\x06\x161`, ...
    `\x06\x169`): kombu's message_count sums every one of them, as Flower does (a scaler that
    reads only the bare list misses every prioritised batch). On the filesystem broker it counts
    the queue's message files. Messages a worker holds unacked (prefetched) are not counted.

    The connection comes from the app's broker pool and goes back to it: a new connection per
    scrape (connect, handshake, ping) was most of a scrape's time. One that failed is reset
    first, so the next scrape connects afresh."""
    depths: dict[str, int] = {}
    conn = get_app().pool.acquire(block=True)
    try:
        channel = conn.default_channel
        for profile in profiles:
            try:
                depths[profile] = channel.queue_declare(queue_name(profile), passive=True).message_count
            except ChannelError:  # no list of the queue exists: nothing was ever left waiting in it
                depths[profile] = 0
    except BROKER_DOWN as exc:
        conn.collect()  # drop its sockets and channels: a broken connection is not reused
        raise BrokerError(f"reading queue lengths: {exc}") from exc
    finally:
        conn.release()
    return depths
