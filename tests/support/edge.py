"""Edge workers for tests: a worker token, the bare environment an edge worker gets (no database,
broker or bucket settings: the test asserts so) and a real `lcmq worker --gateway` process."""

from __future__ import annotations

import os
from pathlib import Path

from bench.harness import Process, wait_until

# What an edge worker must never be given: the farm's database, broker and bucket credentials.
SECRET_PREFIXES = ("LCMQ_DATABASE_URL", "LCMQ_BROKER_URL", "LCMQ_S3_", "LCMQ_STORAGE_URL", "AWS_")


def worker_token(name: str, profiles: str = "tiny", cost_per_hour: float | None = None) -> str:
    """A new worker token in the database the test process's settings name (the token, once)."""
    from lcmq import api, workertokens

    return workertokens.create_token(api.repository(), name, workertokens.parse_profiles(profiles), cost_per_hour).token


def edge_env(farm_env: dict[str, str], home: Path, **settings: str) -> dict[str, str]:
    """What a rented machine has: a PATH, a home, the models cache, nothing of the farm's."""
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(home),
        "LCMQ_HOME": str(home / ".lcmq"),
        "LCMQ_CONFIG": str(home / "lcmq.toml"),
        "LCMQ_MODELS_DIR": farm_env["LCMQ_MODELS_DIR"],
        "LCMQ_TORCH_THREADS": "1",
        "LCMQ_BATCH_SIZE": farm_env.get("LCMQ_BATCH_SIZE", "2"),
        **settings,
    }
    if "PYTHONPATH" in farm_env:
        env["PYTHONPATH"] = farm_env["PYTHONPATH"]
    assert not [key for key in env if key.startswith(SECRET_PREFIXES)], env
    return env


def start_edge(procs, env: dict[str, str], gateway: str, token: str, node: str, *extra: str) -> Process:
    """Started, not waited for (`wait_ready()`): several start side by side."""
    return procs(env, "worker", "--model", "tiny", "--gateway", gateway, "--token", token, "--name", node, *extra)


def running_of(batch_id: str, worker: str) -> list[str]:
    from lcmq import api

    return [j.id for j in api.repository().jobs(batch_id) if j.state == "running" and j.worker == worker]


def when_rendering(batch_id: str, worker: str, timeout_s: float = 60) -> None:
    """Once a job of the batch is done and `worker` holds some (rendering or storing them)."""
    from lcmq import api

    def rendering() -> bool:
        jobs = api.repository().jobs(batch_id)
        return any(j.state == "succeeded" for j in jobs) and any(
            j.worker == worker and j.state == "running" for j in jobs
        )

    wait_until(rendering, timeout_s, interval_s=0.01, what=f"{worker} to render")
