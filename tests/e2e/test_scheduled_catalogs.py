"""Scheduled catalog renders with real processes: only what changed is rendered again, under
stable per-item keys; of two `lcmq scheduler` processes exactly one fires a due schedule."""

from __future__ import annotations

import csv
import json
import time
from datetime import timedelta

import boto3
import pytest

from bench.harness import wait_until
from lcmq import api
from lcmq.repository import utcnow
from scheduler.cron import parse_cron

TEMPLATE = "{name}, {color}, studio photo on white"


def _write_catalog(path, rows: list[dict]) -> None:
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["id", "name", "color"])
        writer.writeheader()
        writer.writerows(rows)


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_catalog_run_twice_renders_only_the_changed_items(isolated_env, procs, cli, tmp_path):
    env = isolated_env  # a Redis of its own: the worker renders this test's jobs only
    procs(env, "worker", "--model", "null").wait_ready()
    catalog = tmp_path / "items.csv"
    rows = [{"id": f"item-{i:02d}", "name": f"chair {i}", "color": "red"} for i in range(30)]
    _write_catalog(catalog, rows)
    _json(
        cli(
            env,
            "schedule",
            "add",
            "shop",
            "--catalog",
            str(catalog),
            "--template",
            TEMPLATE,
            "--cron",
            "0 3 * * *",
            "--model",
            "null",
            "--steps",
            "2",
        )
    )

    first = _json(cli(env, "schedule", "run", "shop", "--wait", "--json"))
    assert first["items"] == {"new": 30, "changed": 0, "unchanged": 0, "removed": 0}
    assert first["total"] == first["succeeded"] == 30

    # Between runs: 5 items change, 2 are removed.
    for row in rows[:5]:
        row["color"] = "blue"
    _write_catalog(catalog, rows[:28])
    second = _json(cli(env, "schedule", "run", "shop", "--wait", "--json"))
    assert second["items"] == {"new": 0, "changed": 5, "unchanged": 23, "removed": 2}
    assert second["total"] == second["succeeded"] == 5

    # The job rows: only the 5 changed items, each with its stable key and a new render key.
    repo = api.repository()
    jobs_1 = {job.key: job for job in repo.jobs(first["batch_id"])}
    jobs_2 = {job.key: job for job in repo.jobs(second["batch_id"])}
    changed_keys = {f"shop/item-{i:02d}.png" for i in range(5)}
    assert set(jobs_1) == {f"shop/item-{i:02d}.png" for i in range(30)}
    assert set(jobs_2) == changed_keys
    for key, job in jobs_2.items():
        assert job.state == "succeeded" and job.prompt.startswith(f"chair {int(key[10:12])}, blue")
        assert job.render_key != jobs_1[key].render_key and job.seed == jobs_1[key].seed  # seeds follow ids

    # The objects: one per item at <prefix>/shop/<id>.png; the run that made each is in its metadata.
    bucket, prefix = env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    assert second["output"] == f"s3://{bucket}/{prefix}/shop/"
    s3 = boto3.client("s3", endpoint_url=env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    listed = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
    images = [key for key in listed if not key.endswith("/manifest.jsonl")]
    assert sorted(images) == sorted(f"{prefix}/{key}" for key in jobs_1)  # no copies
    # Each run's manifest.jsonl (under its batch id) lists what that run rendered.
    for run, jobs in ((first, jobs_1), (second, jobs_2)):
        body = s3.get_object(Bucket=bucket, Key=f"{prefix}/{run['batch_id']}/manifest.jsonl")["Body"].read()
        assert sorted(json.loads(line)["key"] for line in body.decode().splitlines()) == sorted(jobs)
    for key in jobs_1:
        meta = s3.head_object(Bucket=bucket, Key=f"{prefix}/{key}")["Metadata"]
        made_by = jobs_2.get(key) or jobs_1[key]
        assert (meta["batch-id"], meta["job-id"], meta["sha256"]) == (made_by.batch_id, made_by.id, made_by.sha256)

    # Status of the run's batch and the catalog's state show the counts.
    status = _json(cli(env, "status", second["batch_id"], "--json"))
    assert status == second
    shown = _json(cli(env, "schedule", "show", "shop"))
    assert shown["items"] == second["items"] and shown["last_batch_id"] == second["batch_id"]
    assert shown["catalog_items"] == {"active": 28, "removed": 2}

    # A bad edit is refused with its line and field, and writes nothing.
    _write_catalog(catalog, rows[:3] + [{"id": "item-03", "name": "chair 3", "color": ""}] + rows[4:28])
    refused = cli(env, "schedule", "run", "shop", "--json")
    assert refused.returncode == 2 and f"{catalog}:5:color: missing" in refused.stderr
    assert _json(cli(env, "schedule", "show", "shop"))["last_batch_id"] == second["batch_id"]

    # Nothing changed: nothing rendered, nothing uploaded again, and no empty batch or manifest.
    _write_catalog(catalog, rows[:28])
    third = _json(cli(env, "schedule", "run", "shop", "--wait", "--json"))
    assert third == {
        "schedule": "shop",
        "batch_id": None,
        "submitted": 0,
        "unchanged": True,
        "items": {"new": 0, "changed": 0, "unchanged": 28, "removed": 0},
    }
    shown = _json(cli(env, "schedule", "show", "shop"))
    assert shown["last_batch_id"] == second["batch_id"] and shown["items"] == third["items"]
    assert [b.id for b, _ in repo.recent_batches(100)] == [second["batch_id"], first["batch_id"]]
    relisted = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/")["Contents"]]
    assert sorted(relisted) == sorted(listed)


def test_schedule_cli_time_zones_and_a_run_with_nothing_new(embedded_env, cli, tmp_path):
    """No worker: the first run's jobs stay queued ("on their way"), so a second run finds
    nothing new or changed, and says so instead of submitting an empty batch."""
    from lcmq.migrate import upgrade

    env = embedded_env
    upgrade(api.repository().url)  # the embedded SQLite file
    catalog = tmp_path / "items.csv"
    _write_catalog(catalog, [{"id": "mug", "name": "mug", "color": "white"}])
    flags = ["--catalog", str(catalog), "--template", TEMPLATE, "--model", "null"]

    bad_zone = cli(env, "schedule", "add", "shop", *flags, "--cron", "0 6 * * *", "--tz", "Europe/Berln")
    assert bad_zone.returncode == 2 and "Traceback" not in bad_zone.stderr
    assert "lcmq: error: schedule shop:--tz: unknown time zone 'Europe/Berln'" in bad_zone.stderr
    bad_cron = cli(env, "schedule", "add", "shop", *flags, "--cron", "0 6 * * fri-mon-x")
    assert bad_cron.returncode == 2 and "Traceback" not in bad_cron.stderr
    assert "lcmq: error: schedule shop:--cron: day-of-week: 'fri-mon-x' is not valid" in bad_cron.stderr

    cron = "0 6 * * mon-fri"  # a shop renders at 06:00 Berlin time on weekdays
    shown = _json(cli(env, "schedule", "add", "shop", *flags, "--cron", cron, "--tz", "Europe/Berlin"))
    assert shown["timezone"] == "Europe/Berlin" and shown["cron"] == cron
    assert shown["next_run_at"] == parse_cron(cron, "Europe/Berlin").next_after(utcnow()).isoformat()
    assert _json(cli(env, "schedule", "show", "shop"))["timezone"] == "Europe/Berlin"
    listed = cli(env, "schedule", "list")
    assert listed.returncode == 0 and "Europe/Berlin" in listed.stdout.splitlines()[1], listed.stdout
    assert _json(cli(env, "schedule", "list", "--json"))[0]["timezone"] == "Europe/Berlin"

    first = cli(env, "schedule", "run", "shop")
    assert first.returncode == 0 and len(first.stdout.split()) == 1  # the batch id
    again = cli(env, "schedule", "run", "shop", "--wait")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        "schedule shop: unchanged, nothing submitted (nothing new or changed)",
        "items: new=0 changed=0 unchanged=1 removed=0",
    ]
    as_json = _json(cli(env, "schedule", "run", "shop", "--json"))
    assert as_json["unchanged"] is True and as_json["batch_id"] is None and as_json["submitted"] == 0
    batches = _json(cli(env, "batches", "--json"))
    assert [b["batch_id"] for b in batches] == [first.stdout.strip()]  # no empty 0/0 batches
    assert _json(cli(env, "schedule", "show", "shop"))["last_batch_id"] == first.stdout.strip()
    api.cancel(first.stdout.strip())


@pytest.fixture(params=["postgres", "sqlite"])
def scheduler_env(request):
    """Postgres with a database and a Redis of this test's own, or the embedded SQLite default."""
    return request.getfixturevalue("isolated_env" if request.param == "postgres" else "embedded_env")


def test_two_schedulers_fire_a_due_schedule_exactly_once(scheduler_env, procs, tmp_path):
    env = scheduler_env | {"LCMQ_SCHEDULER_TICK_S": "0.2", "LCMQ_SWEEP_EVERY_S": "1", "LCMQ_LOG_LEVEL": "INFO"}
    if "LCMQ_DATABASE_URL" not in env:
        from lcmq.migrate import upgrade

        upgrade(api.repository().url)  # the embedded SQLite file
    catalog = tmp_path / "items.csv"
    _write_catalog(catalog, [{"id": f"i{i}", "name": f"lamp {i}", "color": "green"} for i in range(3)])
    api.schedule_add("nightly", catalog=str(catalog), template=TEMPLATE, cron="0 3 * * *", model="null")
    schedulers = [procs(env, "scheduler") for _ in range(2)]
    for scheduler in schedulers:
        scheduler.wait_ready()

    # Missed for three days while no scheduler ran: due now, and both schedulers are ticking.
    repo = api.repository()
    repo.update_schedule("nightly", next_run_at=utcnow() - timedelta(days=3))
    wait_until(lambda: repo.get_schedule("nightly").last_batch_id, 30, interval_s=0.1, what="the schedule firing")
    time.sleep(2.0)  # ten more ticks each

    runs = [b for b, _ in repo.recent_batches(100) if b.options.get("schedule") == "nightly"]
    assert len(runs) == 1, [b.id for b in runs]
    assert runs[0].total == 3 and runs[0].options["items"]["new"] == 3
    schedule = repo.get_schedule("nightly")
    assert schedule.last_batch_id == runs[0].id and schedule.version == 1
    # Fired once for all the missed ticks; next at the first cron time after now.
    assert schedule.next_run_at == parse_cron("0 3 * * *").next_after(utcnow())
    logs = [s.log for s in schedulers]
    assert sum(log.count("schedule ran") for log in logs) == 1, logs
    for scheduler in schedulers:
        assert scheduler.terminate(timeout_s=20) == 0  # SIGTERM: a clean stop
        assert "scheduler stopped" in scheduler.log
