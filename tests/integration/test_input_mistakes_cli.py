"""Input mistakes through the real CLI (a subprocess against Postgres, Redis and S3): a batch
file named relative to the working directory with a relative init image, a canceled batch
submitted again, and the canceled counts of `lcmq batches`."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

pytestmark = pytest.mark.services


def test_relative_batch_file_with_a_relative_init_image_submits(services_env, cli, tmp_path):
    """`lcmq submit rows.jsonl` (as the docs write it) printed a ValueError traceback and exit 1."""
    Image.new("RGB", (64, 64), (200, 40, 40)).save(tmp_path / "init.png")
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a red fox", "init_image": "init.png"}\n')
    assert Path.cwd() == tmp_path  # services_env works in tmp_path; the CLI inherits it
    result = cli(services_env, "submit", "rows.jsonl", "--model", "tiny")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr

    import lcmq

    (job,) = lcmq.jobs(result.stdout.strip())
    assert job["state"] == "queued"


def test_resubmitting_a_canceled_batch_says_so_and_how_to_resume_it(services_env, cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\na blue owl\n")
    first = cli(services_env, "submit", str(prompts), "--model", "tiny")
    assert first.returncode == 0, first.stderr
    batch_id = first.stdout.strip()
    assert "canceled" not in first.stderr
    assert cli(services_env, "cancel", batch_id).returncode == 0

    again = cli(services_env, "submit", str(prompts), "--model", "tiny")
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == batch_id  # the same batch, as before: scripts keep working
    assert f"batch {batch_id} was submitted before" in again.stderr
    assert "canceled (2 of 2 jobs)" in again.stderr
    assert f"lcmq resume {batch_id}" in again.stderr

    listed = cli(services_env, "batches", "--limit", "100")
    assert listed.returncode == 0, listed.stderr
    header, *rows = listed.stdout.splitlines()
    assert "canceled" in header.split()
    (row,) = [line for line in rows if line.startswith(batch_id)]
    column = header.split().index("canceled")
    assert row.split()[column] == "2"


def test_the_api_tells_a_resubmit_from_a_new_batch(services_env, tmp_path):
    import lcmq

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red fox\n")
    first = lcmq.submit(prompts, model="tiny")
    assert not first.resubmitted and "resubmitted" not in first.to_dict()
    again = lcmq.submit(prompts, model="tiny")
    assert again.batch_id == first.batch_id and again.resubmitted
    assert again.to_dict()["resubmitted"] is True
