"""Style LoRAs and img2img fields without services: validation (file, line and field named),
the --lora flag, render shapes, chunking and micro-batches by adapter set and strength."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
from helpers import job_record

from lcmq.errors import InputError
from lcmq.loras import LoraProblem, lora_key, parse_lora_flag
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.repository import PendingJob
from lcmq.spec import BatchOptions, RowValidator, read_rows, validate_rows
from scheduler.batches import job_row
from scheduler.dispatch import chunk_pending
from worker.render import micro_batches

TINY = BUILTIN_PROFILES["tiny"]


@pytest.fixture
def files(tmp_path) -> Path:
    (tmp_path / "ink.safetensors").write_bytes(b"x")
    (tmp_path / "oil.safetensors").write_bytes(b"x")
    (tmp_path / "cat.png").write_bytes(b"x")
    return tmp_path


def load(folder: Path, rows: list[dict], **flags):
    path = folder / "batch.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    validator = RowValidator(BatchOptions(model="tiny", **flags), TINY, str(path), base_dir=folder)
    return validate_rows(read_rows(path), validator)


def refused(folder: Path, rows: list[dict], **flags) -> InputError:
    with pytest.raises(InputError) as caught:
        load(folder, rows, **flags)
    return caught.value


def test_row_loras_are_resolved_against_the_batch_folder_and_sorted(files):
    (spec,) = load(
        files,
        [
            {
                "prompt": "a fox",
                "loras": [
                    {"name": "oil", "path": "oil.safetensors", "weight": 0.5},
                    {"name": "ink", "path": "ink.safetensors"},
                ],
            }
        ],
    )
    assert spec.loras == (
        {"name": "ink", "path": str(files / "ink.safetensors"), "weight": 1.0},
        {"name": "oil", "path": str(files / "oil.safetensors"), "weight": 0.5},
    )
    assert "loras" not in spec.metadata
    assert job_row("j", spec, 0)["loras"] == list(spec.loras)


@pytest.mark.parametrize(
    "loras, message",
    [
        ([{"name": "lcm", "path": "ink.safetensors"}], "LCM-LoRA's own"),
        ([{"name": "not-an-id", "path": "ink.safetensors"}], "identifier"),
        ([{"name": "ink", "path": "ink.safetensors", "weight": 2.5}], "between -2 and 2"),
        ([{"name": "ink", "path": "ink.safetensors", "weight": "0.5"}], "must be a number"),
        ([{"name": "ink", "path": "ink.safetensors", "weight": True}], "must be a number"),
        ([{"name": "ink", "path": ""}], "non-empty"),
        ([{"name": "ink", "path": "missing.safetensors"}], "no such file"),
        (
            [{"name": "ink", "path": "ink.safetensors"}, {"name": "ink", "path": "oil.safetensors"}],
            "name 'ink' given twice",
        ),
        ([{"name": "a", "path": "ink.safetensors"}, {"name": "b", "path": "ink.safetensors"}], "given twice"),
        ([{"name": "ink", "path": "s3://bucket-only"}], "s3://bucket/key"),
        ([{"name": "ink", "path": "ink.safetensors", "scale": 1}], "unknown key"),
        ({"name": "ink", "path": "ink.safetensors"}, "must be a list"),
        (["ink.safetensors"], "each entry must be an object"),
    ],
)
def test_bad_loras_name_line_and_field(files, loras, message):
    error = refused(files, [{"prompt": "ok"}, {"prompt": "a fox", "loras": loras}])
    assert (error.line, error.field) == (2, "loras")
    assert message in error.message


def test_nan_weight_is_refused():
    from lcmq.loras import check_loras

    with pytest.raises(LoraProblem, match="between"):
        check_loras([{"name": "ink", "path": "s3://b/k", "weight": float("nan")}])


def test_batch_loras_are_the_default_and_a_row_replaces_them(files):
    flag = (parse_lora_flag(f"ink={files / 'ink.safetensors'}:0.7"),)
    plain, own, none = load(
        files,
        [
            {"prompt": "a"},
            {"prompt": "b", "loras": [{"name": "oil", "path": "oil.safetensors"}]},
            {"prompt": "c", "loras": []},
        ],
        loras=flag,
    )
    assert plain.loras == ({"name": "ink", "path": str(files / "ink.safetensors"), "weight": 0.7},)
    assert [e["name"] for e in own.loras] == ["oil"]
    assert none.loras == ()
    error = refused(files, [{"prompt": "a"}], loras=(parse_lora_flag("ink=nowhere.safetensors"),))
    assert (error.line, error.field) == (None, "--lora") and "no such file" in error.message


def test_lora_flag_syntax():
    assert parse_lora_flag("ink=/l/ink.safetensors:0.8") == {"name": "ink", "path": "/l/ink.safetensors", "weight": 0.8}
    assert parse_lora_flag("ink=s3://b/ink.safetensors") == {
        "name": "ink",
        "path": "s3://b/ink.safetensors",
        "weight": 1.0,
    }
    assert parse_lora_flag("ink=s3://b/ink.safetensors:-0.5")["weight"] == -0.5
    with pytest.raises(LoraProblem):
        parse_lora_flag("ink")


def test_csv_loras_cell_is_json(files):
    path = files / "batch.csv"
    path.write_text('prompt,loras\na fox,"[{""name"": ""ink"", ""path"": ""ink.safetensors""}]"\nplain,\n')
    validator = RowValidator(BatchOptions(model="tiny"), TINY, str(path), base_dir=files)
    first, second = validate_rows(read_rows(path), validator, from_text=True)
    assert [e["name"] for e in first.loras] == ["ink"] and second.loras == ()
    path.write_text("prompt,loras\na fox,ink.safetensors\n")
    with pytest.raises(InputError) as caught:
        validate_rows(read_rows(path), validator, from_text=True)
    assert (caught.value.line, caught.value.field) == (2, "loras")


def test_init_image_forms(files):
    rel, url, s3 = load(
        files,
        [
            {"prompt": "a", "init_image": "cat.png", "strength": 0.3},
            {"prompt": "b", "init_image": (files / "cat.png").as_uri()},
            {"prompt": "c", "init_image": "s3://bucket/in/cat.png", "strength": 1},
        ],
    )
    assert (rel.init_image, rel.upload_init, rel.strength) == ((files / "cat.png").as_uri(), True, 0.3)
    assert (url.upload_init, url.strength) == (False, 0.5)  # the default strength
    assert (s3.init_image, s3.upload_init, s3.strength) == ("s3://bucket/in/cat.png", False, 1.0)
    assert rel.render_shape != url.render_shape  # strength is part of the shape


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"init_image": "nowhere.png"}, "init_image", "no such file"),
        ({"init_image": "http://x/cat.png"}, "init_image", "s3:// or file://"),
        ({"init_image": "file://cat.png"}, "init_image", "absolute"),
        ({"init_image": ""}, "init_image", "must not be empty"),
        ({"init_image": 3}, "init_image", "must be a string"),
        ({"init_image": "cat.png", "strength": 0}, "strength", "above 0"),
        ({"init_image": "cat.png", "strength": 1.5}, "strength", "at most 1"),
        ({"init_image": "cat.png", "strength": "x"}, "strength", "must be a number"),
        ({"strength": 0.5}, "strength", "needs an init_image"),
        ({"init_image": "cat.png", "strength": 0.2, "steps": 4}, "strength", "leaves no step"),
    ],
)
def test_bad_img2img_fields_name_line_and_field(files, row, field, message):
    error = refused(files, [{"prompt": "ok"}, {"prompt": "a fox", **row}])
    assert (error.line, error.field) == (2, field)
    assert message in error.message


def test_chunks_and_micro_batches_group_by_adapter_set_and_strength():
    ink = ({"name": "ink", "path": "/l/ink.safetensors", "weight": 0.8},)
    ink_half = ({"name": "ink", "path": "/l/ink.safetensors", "weight": 0.4},)
    variants = [
        {},
        {"loras": ink},
        {"loras": ink_half},
        {"init_image": "s3://b/k.png", "strength": 0.5},
        {"init_image": "s3://b/k.png", "strength": 0.8},
    ]
    records = [job_record(i, **variants[i % 5]) for i in range(20)]
    groups = list(micro_batches(records, 8))
    assert len(groups) == 5 and all(len(g) == 4 for g in groups)
    for group in groups:
        assert len({(lora_key(j.loras), j.strength) for j in group}) == 1
    from worker.render import job_shape

    pending = [PendingJob(j.id, "b", job_shape(j), 0) for j in records]
    chunks = chunk_pending(pending, 3)
    shapes = {p.id: p.shape for p in pending}
    assert all(len({shapes[j] for j in chunk}) == 1 for _, chunk in chunks)
    assert len({shapes[chunk[0]] for _, chunk in chunks}) == 5


def test_the_same_set_in_another_order_is_one_shape(files):
    a = [{"name": "ink", "path": "ink.safetensors", "weight": 0.5}, {"name": "oil", "path": "oil.safetensors"}]
    first, second = load(files, [{"prompt": "x", "loras": a}, {"prompt": "y", "loras": a[::-1]}])
    assert first.render_shape == second.render_shape
    assert replace(first, loras=()).render_shape != first.render_shape
