"""Matrix axes: parsing, validation, expansion, collapse, shared seeds."""

from __future__ import annotations

import pytest

from lcmq.errors import InputError
from lcmq.matrix import MAX_CELLS, check_matrix, expand, parse_axis
from lcmq.spec import JobSpec
from scheduler.batches import job_row


def spec(index: int, prompt: str, **kw) -> JobSpec:
    values = {"negative_prompt": "", "seed": None, "steps": 4, "guidance": 1.0, "width": 64, "height": 64} | kw
    return JobSpec(index=index, prompt=prompt, **values)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("seed=0..3", ("seed", ["0", "1", "2", "3"])),
        ("steps=4,6", ("steps", ["4", "6"])),
        (" style = oil, ink ", ("style", ["oil", "ink"])),
        ("seed=5..5", ("seed", ["5"])),
    ],
)
def test_parse_axis(text, expected):
    assert parse_axis(text) == expected


@pytest.mark.parametrize(
    "text, field, message",
    [
        ("seed", "--matrix", "expected NAME=VALUES"),
        ("=1,2", "--matrix", "expected NAME=VALUES"),
        ("seed=3..1", "--matrix seed", "empty range 3..1"),
        ("seed=0..99999999", "--matrix seed", f"more than {MAX_CELLS} values"),
    ],
)
def test_parse_axis_refuses(text, field, message):
    with pytest.raises(InputError) as info:
        parse_axis(text)
    assert info.value.field == field and message in str(info.value)


@pytest.mark.parametrize(
    "axes, field, message",
    [
        ({"steps": ["4", "9"]}, "--matrix steps", "must be between 1 and 8 (got 9)"),
        ({"guidance": ["1.0", "7"]}, "--matrix guidance", "must be between 1 and 2"),
        ({"seed": ["-1"]}, "--matrix seed", "must be between 0"),
        ({"seed": ["x"]}, "--matrix seed", "must be an integer"),
        ({"style": [""]}, "--matrix style", "non-empty text"),
        ({"style": ["a\x00b"]}, "--matrix style", "control character"),
        ({"style": []}, "--matrix style", "at least one value"),
        ({"9lives": ["a"]}, "--matrix", "identifier"),
        ([("seed", ["1"]), ("seed", ["2"])], "--matrix seed", "axis given twice"),
        (
            {
                "seed": [str(i) for i in range(200)],
                "steps": ["1", "2", "3", "4", "5", "6", "7", "8"],
                "style": [f"s{i}" for i in range(10)],
            },
            "--matrix style",
            "more than 10000 cells",
        ),
    ],
)
def test_check_matrix_names_the_axis(axes, field, message):
    with pytest.raises(InputError) as info:
        check_matrix(axes)
    assert info.value.field == field and message in str(info.value), str(info.value)


def test_expand_multiplies_rows_and_renumbers():
    matrix = check_matrix({"seed": ["0", "1"], "steps": [4, 6], "style": ["oil", "ink", "chalk"]})
    jobs = list(
        expand(
            [spec(0, "a fox in {style}"), spec(1, "an owl in {style}", negative_prompt="no {style}")], matrix, "f.txt"
        )
    )
    assert len(jobs) == 24 and [j.index for j in jobs] == list(range(24))
    assert {j.row for j in jobs[:12]} == {0} and {j.row for j in jobs[12:]} == {1}
    first = jobs[0]
    assert (first.prompt, first.seed, first.steps, first.metadata["matrix"]) == (
        "a fox in oil",
        0,
        4,
        {"seed": 0, "steps": 4, "style": "oil"},
    )
    assert jobs[12].negative_prompt == "no oil"
    assert len({(j.prompt, j.seed, j.steps) for j in jobs}) == 24


def test_identical_cells_collapse():
    matrix = check_matrix({"seed": ["1", "1", "2"]})
    jobs = list(expand([spec(0, "a fox")], matrix, "f.txt"))
    assert [(j.index, j.seed) for j in jobs] == [(0, 1), (1, 2)]
    # A text axis that one row does not use: its cells are one job for that row.
    matrix = check_matrix({"style": ["oil", "ink"]})
    jobs = list(expand([spec(0, "a fox"), spec(1, "an owl in {style}")], matrix, "f.txt"))
    assert [j.prompt for j in jobs] == ["a fox", "an owl in oil", "an owl in ink"]


def test_a_text_axis_no_prompt_uses_is_refused():
    with pytest.raises(InputError) as info:
        list(expand([spec(0, "a fox in {Style}")], check_matrix({"style": ["oil"]}), "f.txt"))
    assert info.value.field == "--matrix style" and "no prompt uses {style}" in str(info.value)


def test_the_matrix_column_is_reserved():
    with pytest.raises(InputError) as info:
        list(expand([spec(0, "a fox", metadata={"matrix": 1})], check_matrix({"seed": [1]}), "f.txt"))
    assert info.value.field == "matrix"


def test_cells_of_a_row_share_its_derived_seed():
    matrix = check_matrix({"steps": [4, 6]})
    jobs = list(expand([spec(0, "a fox"), spec(1, "an owl")], matrix, "f.txt"))
    seeds = [job_row("j", job, batch_seed=7)["seed"] for job in jobs]
    assert seeds[0] == seeds[1] != seeds[2] == seeds[3]
    # Without a matrix, a row's seed is what it always was (derived from its index).
    plain = [job_row("j", s, batch_seed=7)["seed"] for s in (spec(0, "a fox"), spec(1, "an owl"))]
    assert plain == [seeds[0], seeds[2]]


def _lora(name: str, weight: float = 1.0) -> dict:
    return {"name": name, "path": f"/loras/{name}.safetensors", "weight": weight}


def test_lora_weight_axis_sets_the_style_weight():
    matrix = check_matrix({"lora_weight": ["0.4", "0.8", "0.8"]})
    jobs = list(expand([spec(0, "a fox", loras=(_lora("ink"),))], matrix, "f.txt"))
    assert [j.loras[0]["weight"] for j in jobs] == [0.4, 0.8]  # the repeated 0.8 collapsed
    assert jobs[0].metadata["matrix"] == {"lora_weight": 0.4}
    # Named, in a set of two: only that style's weight moves.
    matrix = check_matrix({"lora_weight.oil": [0.2, 1.5]})
    jobs = list(expand([spec(0, "a fox", loras=(_lora("ink", 0.7), _lora("oil")))], matrix, "f.txt"))
    assert [[(e["name"], e["weight"]) for e in j.loras] for j in jobs] == [
        [("ink", 0.7), ("oil", 0.2)],
        [("ink", 0.7), ("oil", 1.5)],
    ]


@pytest.mark.parametrize(
    "axes, loras, field, message",
    [
        ({"lora_weight": ["3"]}, (_lora("ink"),), "--matrix lora_weight", "between -2 and 2"),
        ({"lora_weight": ["0.5"]}, (), "--matrix lora_weight", "exactly one style LoRA"),
        ({"lora_weight": ["0.5"]}, (_lora("ink"), _lora("oil")), "--matrix lora_weight", "lora_weight.NAME"),
        ({"lora_weight.oil": ["0.5"]}, (_lora("ink"),), "--matrix lora_weight.oil", "has no 'oil'"),
    ],
)
def test_lora_weight_axis_refusals(axes, loras, field, message):
    with pytest.raises(InputError) as info:
        list(expand([spec(0, "a fox", loras=loras)], check_matrix(axes), "f.txt"))
    assert info.value.field == field and message in str(info.value), str(info.value)
