"""Catalogs without services: template checks, item ids, seeds, render keys, the run plan."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from lcmq.errors import InputError
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.repository import ItemState
from lcmq.settings import Settings
from lcmq.spec import BatchOptions
from scheduler.catalog import build_items, check_item_id, item_seed, load_items, render_key, template_fields
from scheduler.schedules import plan_run

TEMPLATE = "{name}, {color}, studio photo on white"
TINY = BUILTIN_PROFILES["tiny"]


def items(rows: list[dict], template: str = TEMPLATE, profile=TINY, **options):
    numbered = [(line, row) for line, row in enumerate(rows, start=2)]  # line 1 is a CSV header
    return build_items(
        numbered, template, BatchOptions(model=profile.name, **options), profile, "items.csv", from_text=True
    )


def chairs(n: int = 3) -> list[dict]:
    return [{"id": f"sku-{i}", "name": f"chair {i}", "color": "red"} for i in range(n)]


def test_template_fills_prompts_and_keeps_columns_as_metadata():
    built = items(chairs(2))
    assert [i.item_id for i in built] == ["sku-0", "sku-1"]
    assert built[1].spec.prompt == "chair 1, red, studio photo on white"
    assert built[1].spec.metadata == {"id": "sku-1", "name": "chair 1", "color": "red"}
    assert (built[1].spec.width, built[1].spec.steps) == (64, 4)  # the profile's defaults


@pytest.mark.parametrize(
    "template, message",
    [
        ("", "must not be empty"),
        ("a plain prompt", "uses no {column}"),
        ("{name} {", "Single '{'"),
        ("{0}", "must be a column name"),
        ("{}", "must be a column name"),
        ("{item.name}", "must be a column name"),
        ("{name!r}", "no conversion or format spec"),
        ("{price:.2f}", "no conversion or format spec"),
    ],
)
def test_bad_templates_are_named_as_the_flag(template, message):
    with pytest.raises(InputError, match=r"^items\.csv:--template: .*" + message.replace("{", r"\{")):
        template_fields(template, "items.csv")


@pytest.mark.parametrize(
    "row, field, message",
    [
        ({"id": "sku-9", "name": "chair"}, "color", "missing: the template uses {color}"),
        ({"id": "sku-9", "name": "chair", "color": ""}, "color", "missing: the template uses {color}"),
        ({"id": "sku-9", "name": "chair", "color": ["red"]}, "color", "not text or a number"),
        ({"name": "chair", "color": "red"}, "id", "missing: every item needs an id"),
        ({"id": "", "name": "chair", "color": "red"}, "id", "must not be empty"),
        ({"id": "sku-9", "name": "chair", "color": "red", "steps": "12"}, "steps", "must be between 1 and 8"),
        ({"id": "sku-9", "name": "chair", "color": "red", "seed": "x"}, "seed", "must be an integer"),
        ({"id": "sku-9", "name": "chair\x07", "color": "red"}, "name", "control character (U+0007)"),
    ],
)
def test_a_bad_item_names_its_line_and_field(row, field, message):
    rows = chairs(2) + [row]
    with pytest.raises(InputError) as caught:
        items(rows)
    error = caught.value
    assert (error.source, error.line, error.field) == ("items.csv", 4, field)
    assert message in error.message


def test_duplicate_ids_name_both_lines():
    with pytest.raises(InputError, match=r"^items\.csv:4:id: duplicate id 'sku-0' \(first on line 2\)"):
        items(chairs(2) + [{"id": "sku-0", "name": "x", "color": "y"}])


@pytest.mark.parametrize(
    "item_id, message",
    [
        ("a/b", "must not contain '/'"),
        ("a\\b", "must not contain '/'"),
        ("a..b", "must not contain '..'"),
        ("..", "must not contain '..'"),
        ("bad\nid", "control character (U+000A)"),
        ("x" * 201, "at most 200 characters"),
        ("chair red", "may hold only letters, digits"),
        (".hidden", "starting with a letter or digit"),
        ("caf\u00e9", "may hold only letters, digits"),
        ("  ", "must not be empty"),
        (1.5, "must be a string"),
    ],
)
def test_unsafe_item_ids_are_refused(item_id, message):
    def fail(text):
        raise InputError("items.csv", 3, "id", text)

    with pytest.raises(InputError, match=r"^items\.csv:3:id: ") as caught:
        check_item_id(item_id, fail)
    assert message in caught.value.message


def test_safe_item_ids_pass():
    for item_id in ("sku-1", "A.b_c-9", "x" * 200, "42"):
        assert check_item_id(item_id, lambda m: pytest.fail(m)) == item_id
    assert check_item_id(7, lambda m: pytest.fail(m)) == "7"  # JSONL numbers


def test_seeds_and_render_keys_are_stable_per_item():
    first = {i.item_id: i for i in items(chairs(5))}
    reordered = {i.item_id: i for i in items(list(reversed(chairs(5))) + [{"id": "new", "name": "n", "color": "c"}])}
    for item_id, item in first.items():
        # Another row order, another index: the same seed and render key.
        assert reordered[item_id].spec.seed == item.spec.seed == item_seed(None, item_id)
        assert reordered[item_id].render_key == item.render_key
    assert len({i.spec.seed for i in first.values()}) == 5
    assert items(chairs(1))[0].render_key == items(chairs(1))[0].render_key  # deterministic
    assert items(chairs(1), seed=7)[0].spec.seed == item_seed(7, "sku-0") != item_seed(None, "sku-0")
    given = items([{"id": "sku-0", "name": "chair 0", "color": "red", "seed": "99"}])[0]
    assert given.spec.seed == 99


def test_render_key_covers_what_decides_the_pixels():
    spec = items(chairs(1))[0].spec
    base = render_key(spec, TINY)
    changes = [
        replace(spec, prompt="other"),
        replace(spec, negative_prompt="blurry"),
        replace(spec, seed=1),
        replace(spec, steps=2),
        replace(spec, guidance=1.5),
        replace(spec, width=128),
        replace(spec, height=128),
    ]
    keys = {render_key(changed, TINY) for changed in changes}
    keys |= {
        render_key(spec, replace(TINY, lcm_lora="other-lora")),
        render_key(spec, replace(TINY, base="b")),
        render_key(spec, BUILTIN_PROFILES["null"]),
        render_key(spec, TINY, output_format="webp"),
    }
    assert base not in keys and len(keys) == len(changes) + 4
    # What does not decide the pixels does not move the key: the row's place, its other columns.
    assert render_key(replace(spec, index=9, metadata={"price": 3}), TINY) == base


def test_flag_defaults_and_item_columns():
    built = items(
        chairs(1) + [{"id": "big", "name": "sofa", "color": "grey", "width": "128", "steps": ""}],
        steps=2,
        negative_prompt="blurry",
    )
    assert (built[0].spec.steps, built[0].spec.negative_prompt, built[0].spec.width) == (2, "blurry", 64)
    assert (built[1].spec.steps, built[1].spec.width) == (2, 128)
    with pytest.raises(InputError, match=r"^items\.csv:--steps: must be between 1 and 8"):
        items(chairs(1), steps=9)


def test_catalog_files_csv_and_jsonl(tmp_path):
    settings = Settings(_env_file=None)
    options = BatchOptions(model="tiny")
    csv_file = tmp_path / "items.csv"
    csv_file.write_text("id,name,color\nsku-1,chair,red\nsku-2,table,\n")
    with pytest.raises(InputError, match=r"items\.csv:3:color: missing"):
        load_items(str(csv_file), TEMPLATE, options, TINY, settings)
    no_id = tmp_path / "noid.csv"
    no_id.write_text("name,color\nchair,red\n")
    with pytest.raises(InputError, match=r"noid\.csv:1:id: header has no 'id' column"):
        load_items(str(no_id), TEMPLATE, options, TINY, settings)
    jsonl = tmp_path / "items.jsonl"
    jsonl.write_text(
        "\n".join(
            json.dumps(r)
            for r in [{"id": 1, "name": "chair", "color": "red"}, {"id": "2", "name": "desk", "color": "oak"}]
        )
        + "\n"
    )
    assert [i.item_id for i in load_items(str(jsonl), TEMPLATE, options, TINY, settings)] == ["1", "2"]
    empty = tmp_path / "empty.csv"
    empty.write_text("id,name,color\n")
    with pytest.raises(InputError, match="no items in the catalog"):
        load_items(str(empty), TEMPLATE, options, TINY, settings)
    with pytest.raises(InputError, match="no such file"):
        load_items(str(tmp_path / "gone.csv"), TEMPLATE, options, TINY, settings)


def test_plan_counts_new_changed_unchanged_removed():
    current = items(chairs(6))
    keys = {i.item_id: i.render_key for i in current}
    state = {
        "sku-0": ItemState(keys["sku-0"], "succeeded", False),  # unchanged
        "sku-1": ItemState(keys["sku-1"], "running", False),  # unchanged: on its way
        "sku-2": ItemState("old-key", "succeeded", False),  # changed
        "sku-3": ItemState(keys["sku-3"], "failed", False),  # its last render failed: again
        "sku-4": ItemState(keys["sku-4"], "succeeded", True),  # back after removal, image intact
        "gone-1": ItemState("k", "succeeded", False),  # removed now
        "gone-2": ItemState("k", "succeeded", True),  # removed before: not counted again
    }
    plan = plan_run(current, state)
    assert plan.counts == {"new": 1, "changed": 2, "unchanged": 3, "removed": 1}
    assert [(i.item_id, new) for i, new in plan.render] == [("sku-2", False), ("sku-3", False), ("sku-5", True)]
    assert plan.unchanged == ["sku-0", "sku-1", "sku-4"] and plan.removed == ["gone-1"]
