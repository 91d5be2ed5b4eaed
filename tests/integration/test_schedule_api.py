"""Schedules through the API, without workers: an s3:// catalog read afresh, the lifecycle
(add, pause, resume, rm), and what a scheduled run does with a catalog that became invalid."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import boto3
import pytest

from lcmq import api
from lcmq.errors import InputError, NotFoundError
from lcmq.migrate import upgrade
from lcmq.repository import utcnow
from lcmq.settings import get_settings
from scheduler.cron import parse_cron
from scheduler.schedules import fire_due

TEMPLATE = "{name} in {color}"


def _csv(rows: list[tuple[str, str, str]]) -> bytes:
    return ("id,name,color\n" + "".join(f"{i},{n},{c}\n" for i, n, c in rows)).encode()


def test_an_s3_catalog_is_read_afresh_at_every_run(services_env):
    bucket, prefix = services_env["LCMQ_STORAGE_URL"].removeprefix("s3://").split("/", 1)
    s3 = boto3.client("s3", endpoint_url=services_env["LCMQ_S3_ENDPOINT_URL"], region_name="us-east-1")
    key = f"{prefix}-catalogs/items.csv"
    s3.put_object(Bucket=bucket, Key=key, Body=_csv([("a", "mug", "white"), ("b", "cup", "red")]))
    name = f"s3shop-{prefix}"
    shown = api.schedule_add(name, catalog=f"s3://{bucket}/{key}", template=TEMPLATE, cron="@daily", model="null")
    assert shown["catalog"] == f"s3://{bucket}/{key}" and shown["output"].endswith(f"/{name}/")

    first = api.schedule_run(name)
    assert (first.total, first.items) == (2, {"new": 2, "changed": 0, "unchanged": 0, "removed": 0})
    jobs = api.repository().jobs(first.batch_id)
    assert [(j.key, j.prompt) for j in jobs] == [(f"{name}/a.png", "mug in white"), (f"{name}/b.png", "cup in red")]

    s3.put_object(Bucket=bucket, Key=key, Body=_csv([("a", "mug", "black"), ("c", "bowl", "blue")]))
    second = api.schedule_run(name)  # the first batch is not rendered yet: b and a are "on their way"
    assert second.items == {"new": 1, "changed": 1, "unchanged": 0, "removed": 1}
    assert [j.key for j in api.repository().jobs(second.batch_id)] == [f"{name}/a.png", f"{name}/c.png"]

    s3.delete_object(Bucket=bucket, Key=key)
    with pytest.raises(InputError, match="cannot read the catalog"):
        api.schedule_run(name)
    api.schedule_rm(name)
    for batch in (first, second):  # no worker here: leave no jobs for another test's null worker
        api.cancel(batch.batch_id)


def test_schedule_lifecycle_and_refusals(embedded_env, tmp_path):
    upgrade(get_settings().database_url_resolved)
    catalog = tmp_path / "items.csv"
    catalog.write_bytes(_csv([("a", "mug", "white")]))
    shown = api.schedule_add("shop", catalog=str(catalog), template=TEMPLATE, cron="0 3 * * *", model="null")
    assert shown["next_run_at"] == parse_cron("0 3 * * *").next_after(utcnow()).isoformat()
    assert shown["paused"] is False and shown["items"] is None and shown["catalog_items"] == {"active": 0, "removed": 0}
    assert shown["timezone"] == "UTC"
    for bad, match in [
        (dict(name="shop"), "shop:name: a schedule of this name exists"),
        (dict(name="a/b"), "schedule:name: must not contain '/'"),
        (dict(cron="0 25 * * *"), "schedule x:--cron: hour: '25' is not valid in '0 25 * * *' (takes 0-23"),
        (dict(tz="Europe/Berln"), "schedule x:--tz: unknown time zone 'Europe/Berln'"),
        (dict(template="{name} {size}"), "items.csv:2:size: missing: the template uses {size}"),
        (dict(model="nope"), "schedule x:model: unknown model profile 'nope'"),
        (dict(steps=20), "items.csv:--steps: must be between 1 and 8"),
        (dict(catalog=str(tmp_path / "items.txt")), "--catalog: unknown catalog type '.txt'"),
    ]:
        args = dict(name="x", catalog=str(catalog), template=TEMPLATE, cron="@daily", model="null") | bad
        name = args.pop("name")
        with pytest.raises(InputError) as raised:
            api.schedule_add(name, timezone=args.pop("tz", "UTC"), **args)
        assert match in str(raised.value)
    assert [s["name"] for s in api.schedules()] == ["shop"]  # nothing written by the refusals

    assert api.schedule_pause("shop")["paused"] is True
    repo = api.repository()
    repo.update_schedule("shop", next_run_at=utcnow() - timedelta(hours=1))
    settings = get_settings()
    assert fire_due(repo, api.storage(), settings) == []  # paused: not fired
    resumed = api.schedule_resume("shop")
    assert resumed["paused"] is False and resumed["next_run_at"] > utcnow().isoformat()
    api.schedule_rm("shop")
    with pytest.raises(NotFoundError):
        api.schedule_show("shop")


def test_a_scheduled_run_of_a_broken_catalog_records_why_and_waits(embedded_env, tmp_path):
    upgrade(get_settings().database_url_resolved)
    catalog = tmp_path / "items.csv"
    catalog.write_bytes(_csv([("a", "mug", "white"), ("b", "cup", "red")]))
    api.schedule_add("shop", catalog=str(catalog), template=TEMPLATE, cron="*/5 * * * *", model="null")
    repo, store, settings = api.repository(), api.storage(), get_settings()
    now = utcnow()
    repo.update_schedule("shop", next_run_at=now - timedelta(days=1))

    catalog.write_bytes(_csv([("a", "mug", "white"), ("a", "cup", "red")]))
    assert fire_due(repo, store, settings, now=now) == []
    schedule = repo.get_schedule("shop")
    assert "items.csv:3:id: duplicate id 'a' (first on line 2)" in schedule.last_error
    assert schedule.next_run_at == parse_cron("*/5 * * * *").next_after(now) and schedule.last_batch_id is None
    assert repo.recent_batches() == []
    assert fire_due(repo, store, settings, now=now) == []  # not due again before its next time

    catalog.write_bytes(_csv([("a", "mug", "white")]))
    later = schedule.next_run_at + timedelta(seconds=1)
    fired = fire_due(repo, store, settings, now=later)
    assert len(fired) == 1 and repo.get_schedule("shop").last_error is None
    assert repo.get_batch(fired[0]).total == 1


def test_a_webp_schedule_keeps_stable_webp_keys_and_its_format_is_in_the_render_key(embedded_env, tmp_path):
    from scheduler.schedules import run_schedule

    upgrade(get_settings().database_url_resolved)
    catalog = tmp_path / "items.csv"
    catalog.write_bytes(_csv([("a", "mug", "white"), ("b", "cup", "red")]))
    for name, fmt, quality in (("png-shop", "png", None), ("webp-shop", "webp", 85)):
        api.schedule_add(
            name,
            catalog=str(catalog),
            template=TEMPLATE,
            cron="@daily",
            model="null",
            image_format=fmt,
            quality=quality,
        )
    with pytest.raises(InputError, match="--quality: applies to webp and jpeg only"):
        api.schedule_add("x", catalog=str(catalog), template=TEMPLATE, cron="@daily", model="null", quality=50)
    repo, settings = api.repository(), get_settings()
    keys = {}
    for name in ("png-shop", "webp-shop"):
        result = run_schedule(repo, api.storage(), settings, repo.get_schedule(name), scheduled=False)
        keys[name] = {job.key: job.render_key for job in repo.jobs(result.batch_id)}
    assert sorted(keys["png-shop"]) == ["png-shop/a.png", "png-shop/b.png"]
    assert sorted(keys["webp-shop"]) == ["webp-shop/a.webp", "webp-shop/b.webp"]
    # The same items, another format: another render key (a format change re-renders).
    assert set(keys["png-shop"].values()).isdisjoint(keys["webp-shop"].values())
    assert repo.get_batch(result.batch_id).options["image_format"] == "webp"


def test_a_schedule_fires_at_six_local_time_in_its_zone_across_dst(embedded_env, tmp_path):
    """A shop renders at 06:00 Berlin time: next_run_at is stored in UTC, computed in the zone,
    and each scheduled run moves it to the next 06:00 local (04:00 UTC in summer, 05:00 in winter)."""
    upgrade(get_settings().database_url_resolved)
    catalog = tmp_path / "items.csv"
    catalog.write_bytes(_csv([("a", "mug", "white")]))
    shown = api.schedule_add(
        "berlin", catalog=str(catalog), template=TEMPLATE, cron="0 6 * * *", model="null", timezone="Europe/Berlin"
    )
    assert shown["timezone"] == "Europe/Berlin" and api.schedules()[0]["timezone"] == "Europe/Berlin"
    assert shown["next_run_at"] == parse_cron("0 6 * * *", "Europe/Berlin").next_after(utcnow()).isoformat()
    assert api.schedule_show("berlin")["next_run_at"].endswith("+00:00")

    repo, store, settings = api.repository(), api.storage(), get_settings()
    # The night before the spring change (Saturday 28 March 2026, 06:00 CET = 05:00 UTC) ...
    repo.update_schedule("berlin", next_run_at=datetime(2026, 3, 28, 5, tzinfo=UTC))
    fired = fire_due(repo, store, settings, now=datetime(2026, 3, 28, 5, 0, 20, tzinfo=UTC))
    assert len(fired) == 1
    # ... the next run is Sunday 06:00 CEST, 04:00 UTC.
    assert repo.get_schedule("berlin").next_run_at == datetime(2026, 3, 29, 4, tzinfo=UTC)
    # And in autumn: after Saturday 24 October's 06:00 CEST comes Sunday's 06:00 CET (05:00 UTC).
    repo.update_schedule("berlin", next_run_at=datetime(2026, 10, 24, 4, tzinfo=UTC))
    fire_due(repo, store, settings, now=datetime(2026, 10, 24, 4, 0, 20, tzinfo=UTC))
    assert repo.get_schedule("berlin").next_run_at == datetime(2026, 10, 25, 5, tzinfo=UTC)

    assert api.schedule_pause("berlin")["timezone"] == "Europe/Berlin"
    resumed = api.schedule_resume("berlin")
    assert resumed["next_run_at"] == parse_cron("0 6 * * *", "Europe/Berlin").next_after(utcnow()).isoformat()


def test_a_run_with_nothing_new_or_changed_submits_no_batch_and_still_counts_as_fired(embedded_env, tmp_path):
    upgrade(get_settings().database_url_resolved)
    catalog = tmp_path / "items.csv"
    catalog.write_bytes(_csv([("a", "mug", "white"), ("b", "cup", "red")]))
    api.schedule_add("shop", catalog=str(catalog), template=TEMPLATE, cron="0 3 * * *", model="null")
    repo, store, settings = api.repository(), api.storage(), get_settings()
    first = api.schedule_run("shop")  # a and b are queued now: "on their way", so unchanged next time
    assert first.total == 2

    # `lcmq schedule run`: the same catalog again makes no empty 0/0 batch.
    again = api.schedule_run("shop")
    assert isinstance(again, api.UnchangedRun)
    assert again.to_dict() == {
        "schedule": "shop",
        "batch_id": None,
        "submitted": 0,
        "unchanged": True,
        "items": {"new": 0, "changed": 0, "unchanged": 2, "removed": 0},
    }
    assert [b.id for b, _ in repo.recent_batches(100)] == [first.batch_id]
    schedule = repo.get_schedule("shop")
    assert schedule.last_batch_id == first.batch_id and schedule.last_counts == again.items
    assert schedule.version == 2 and schedule.last_run_at is not None

    # An item removed, none new or changed: still no batch; the removal is recorded.
    catalog.write_bytes(_csv([("a", "mug", "white")]))
    removed = api.schedule_run("shop")
    assert isinstance(removed, api.UnchangedRun)
    assert removed.items == {"new": 0, "changed": 0, "unchanged": 1, "removed": 1}
    assert repo.catalog_counts("shop") == {"active": 1, "removed": 1}
    assert len(repo.recent_batches(100)) == 1

    # The scheduler service: due, nothing changed -> fired (next_run_at moves on), no batch.
    now = utcnow()
    repo.update_schedule("shop", next_run_at=now - timedelta(minutes=1))
    assert fire_due(repo, store, settings, now=now) == []
    schedule = repo.get_schedule("shop")
    assert schedule.next_run_at == parse_cron("0 3 * * *").next_after(now) and schedule.version == 4
    assert schedule.last_counts == {"new": 0, "changed": 0, "unchanged": 1, "removed": 0}
    assert schedule.last_batch_id == first.batch_id and schedule.last_error is None
    assert len(repo.recent_batches(100)) == 1
    assert fire_due(repo, store, settings, now=now) == []  # not due again: it counted as fired
    assert repo.get_schedule("shop").version == 4
    api.cancel(first.batch_id)
