"""Typed settings, built once: environment (`LCMQ_*`) over `lcmq.toml` over defaults.

With nothing set, lcmq runs embedded: SQLite and a filesystem broker under `./.lcmq/`, and
images under `./renders/`. The same code path serves a farm with Postgres, Redis and S3.
"""

from __future__ import annotations

import os
import tomllib
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from lcmq.errors import ConfigError

DEFAULT_CONFIG_FILE = "lcmq.toml"


def config_path() -> Path:
    return Path(os.environ.get("LCMQ_CONFIG", DEFAULT_CONFIG_FILE))


def read_config_file(path: Path | None = None) -> dict[str, Any]:
    """The parsed lcmq.toml (empty when the file does not exist)."""
    path = path or config_path()
    if not path.exists():
        return {}
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from exc


class _TomlSource(PydanticBaseSettingsSource):
    """Top-level keys of lcmq.toml, except the [profiles.*] tables (profiles.py reads those)."""

    def get_field_value(self, field, field_name):  # pragma: no cover - unused by pydantic here
        return None, field_name, False

    def __call__(self) -> dict[str, Any]:
        data = read_config_file()
        return {k: v for k, v in data.items() if k != "profiles" and k in self.settings_cls.model_fields}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="LCMQ_", extra="ignore", frozen=True)

    home: Path = Field(Path(".lcmq"), description="Folder for embedded state: SQLite, broker, model cache.")
    database_url: str | None = Field(None, description="SQLAlchemy URL; default SQLite under home.")
    broker_url: str | None = Field(None, description="Celery broker URL; default a filesystem broker under home.")
    storage_url: str = Field("file://renders", description="s3://bucket/prefix or file:///dir")
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto).")
    s3_region: str = "us-east-1"
    s3_timeout_s: float = Field(30, gt=0, description="Connect and read timeout of one S3 request.")
    s3_max_attempts: int = Field(
        3, ge=1, le=20, description="Tries of one S3 request before the task retries with backoff."
    )
    chunk_size: int = Field(
        32,
        ge=1,
        le=10_000,
        description="Jobs per queue message: a task of seconds, not "
        "milliseconds, so the broker and the claim are a small share of it.",
    )
    max_chunks_per_batch: int = Field(
        1000,
        ge=1,
        description="A larger batch gets larger chunks, so publishing 10^5 jobs costs 10^3 messages, not 10^4.",
    )
    batch_size: int = Field(4, ge=1, le=256, description="Images per pipeline call in a worker.")
    render_timeout_s: int = Field(1800, ge=10, description="Hard time limit of one chunk task.")
    visibility_timeout_s: int = Field(7200, ge=60, description="Redis redelivery timeout; > longest task.")
    lease_s: float = Field(
        120,
        ge=1,
        description="How long a claimed job stays owned without renewal; "
        "workers renew every lease_s/3, so a dead worker's jobs return after this.",
    )
    max_attempts: int = Field(
        3, ge=1, le=100, description="Workers a job may take down (crash, OOM, kill) before it is failed."
    )
    max_handbacks: int = Field(
        5,
        ge=0,
        le=100,
        description="Times a job may go back to the queue after "
        "a transient fault (S3 or the database away; no attempt is used) before "
        "it fails with the last fault as its reason.",
    )
    dispatch_grace_s: float = Field(
        30, ge=0, description="A queued job with no message this long after its commit is published by the sweeper."
    )
    redispatch_s: float = Field(
        120,
        ge=1,
        description="A queued job whose message is this old while its "
        "queue is empty lost its message (broker restart): the sweeper republishes.",
    )
    manifest_grace_s: float = Field(
        30,
        ge=0,
        description="A finished batch without manifest.jsonl whose "
        "last job finished this long ago gets it from the sweeper (its worker died).",
    )
    poll_s: float = Field(0.5, gt=0, description="Status polling interval of --wait.")
    scheduler_tick_s: float = Field(
        5, gt=0, le=60, description="How often `lcmq scheduler` looks for due schedules (cron has minute resolution)."
    )
    sweep_every_s: float = Field(10, gt=0, description="How often `lcmq scheduler` runs the sweeper.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="auto: cuda, then mps (Apple Metal), then cpu."
    )
    max_memory_mb: int | None = Field(
        None,
        ge=1,
        description="Memory budget of one worker process in MiB: "
        "at load it probes batch sizes up to batch_size and keeps the largest "
        "that fits (worker/memory.py).",
    )
    torch_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads per worker process; default its share of the host's cores (docs/farm.md).",
    )
    lora_cache_size: int = Field(
        8,
        ge=1,
        le=256,
        description="Style LoRAs a worker process keeps loaded; "
        "the least recently used one is deleted before another loads.",
    )
    control_cache_size: int = Field(
        4,
        ge=1,
        le=64,
        description="ControlNets and T2I-Adapters a worker process keeps loaded; "
        "the least recently used one is dropped before another loads.",
    )
    max_prompt_chars: int = Field(
        10_000, ge=1, description="Longer prompts and negative prompts are refused at submit, with their line."
    )
    max_init_image_bytes: int = Field(
        32 << 20, ge=1024, description="img2img and control images: larger ones fail their job."
    )
    models_dir: Path | None = Field(None, description="Cache for generated tiny models; default home/models.")
    png_compress_level: int = Field(
        1,
        ge=0,
        le=9,
        description="zlib level of PNG outputs: 1 is ~1.6x faster to encode than 4 for ~3 % more bytes "
        "(docs/benchmarks.md); the bytes are reproducible for a given level.",
    )
    null_images_dir: Path | None = Field(
        None,
        description="The null profile hands out the images of this folder, in turn, for requests of "
        "their size (bench/host.py); others, and without it, a flat grey image.",
    )
    null_images_per_s: float | None = Field(
        None,
        gt=0,
        description="The null profile renders at this rate, like a GPU: a call of n images takes n/rate seconds, "
        "asleep (bench/host.py); unset, it returns at once.",
    )
    # --- the HTTP face (lcmq api), webhooks and worker rows -----------------------------------
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs that resolve to loopback, private or link-local "
        "addresses (refused by default: a webhook must not reach into the farm's own network).",
    )
    webhook_timeout_s: float = Field(10, gt=0, le=120, description="One webhook attempt's connect+read timeout.")
    webhook_retry_for_s: float = Field(
        6 * 3600, ge=3600, description="A webhook is retried with backoff for this long before it is given up."
    )
    webhook_backoff_first_s: float = Field(
        5,
        gt=0,
        le=3600,
        description="Backoff after a webhook's first failed attempt; it doubles with each failure "
        "(full jitter), up to webhook_backoff_max_s.",
    )
    webhook_backoff_max_s: float = Field(600, gt=0, le=3600, description="The longest wait between webhook attempts.")
    webhook_poll_s: float = Field(
        1, gt=0, le=60, description="How often the webhook sender looks for final batches and due deliveries."
    )
    heartbeat_s: float = Field(
        10, gt=0, le=300, description="How often a worker updates its row; stale after 3x this without one."
    )
    metrics_final_counts_s: float = Field(
        60,
        ge=0,
        description="The API's /metrics recounts succeeded, failed and canceled jobs at most this often "
        "(a count over every job ever rendered); queued and running ones are counted at every scrape.",
    )
    api_events_min_interval_s: float = Field(
        0.5, ge=0.05, le=10, description="The events stream sends a batch's counts at most this often."
    )
    api_max_body_mb: float = Field(
        256, gt=0, description="The largest request body `lcmq api` reads (a prompt file upload), in MiB; 413 beyond."
    )
    # --- the edge gateway (lcmq/http/gateway.py): abuse limits, per API process -------------
    gateway_max_body_kb: int = Field(
        1024, ge=1, description="The largest request body the gateway reads from an edge worker, in KiB; 413 beyond."
    )
    gateway_max_claim: int = Field(32, ge=1, le=1000, description="The most jobs one gateway claim may ask for.")
    gateway_claims_per_s: float = Field(
        5, gt=0, description="Claims per second one worker token may make, per API process; 429 beyond."
    )
    gateway_max_failures_in_a_row: int = Field(
        20,
        ge=1,
        description="Failed jobs in a row (no success between) that pause a worker token until "
        "`lcmq workertoken resume`.",
    )
    gateway_url_ttl_s: int = Field(
        900, ge=60, le=7 * 86400, description="How long the presigned upload and download URLs of a claim live."
    )
    gateway_wait_max_s: float = Field(
        25, ge=0, le=120, description="The longest an idle edge worker's claim waits (long-poll) for a job."
    )
    gateway_max_object_mb: float = Field(
        64, gt=0, description="An uploaded image larger than this is refused at record without being read."
    )
    log_level: str = "INFO"
    log_json: bool = False

    @classmethod
    def settings_customise_sources(
        cls, settings_cls, init_settings, env_settings, dotenv_settings, file_secret_settings
    ):
        return (init_settings, env_settings, _TomlSource(settings_cls))

    @field_validator("storage_url")
    @classmethod
    def _storage_scheme(cls, value: str) -> str:
        if not value.startswith(("s3://", "file://")):
            raise ValueError("must start with s3:// or file://")
        return value

    @property
    def database_url_resolved(self) -> str:
        return self.database_url or f"sqlite:///{(self.home / 'lcmq.db').resolve()}"

    @property
    def broker_url_resolved(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return (self.home / "broker").resolve()

    @property
    def models_path(self) -> Path:
        return (self.models_dir or self.home / "models").resolve()

    @property
    def embedded_broker(self) -> bool:
        return self.broker_url_resolved.startswith("filesystem://")


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The settings of this process, built once."""
    try:
        return Settings()
    except ValidationError as exc:
        problems = "; ".join(f"LCMQ_{'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors())
        raise ConfigError(f"invalid settings: {problems}") from exc


def reset_settings() -> None:
    """Forget the cached settings (tests and the CLI's --config change the environment)."""
    get_settings.cache_clear()
