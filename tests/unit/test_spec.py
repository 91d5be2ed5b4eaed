"""lcmq.spec without services: the readers, the validator, and the error each bad input names."""

from __future__ import annotations

from pathlib import Path

import pytest

from lcmq.errors import InputError
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.spec import BatchOptions, JobSpec, RowValidator, read_rows, rows_from_objects, validate_rows

TINY = BUILTIN_PROFILES["tiny"]


def write(tmp_path: Path, content: str | bytes, suffix: str, name: str = "batch") -> Path:
    path = tmp_path / f"{name}{suffix}"
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


def load(path: Path, profile=TINY, **flags) -> list[JobSpec]:
    """What api.submit does with a file: CSV cells are text and get coerced, JSONL values do not."""
    validator = RowValidator(BatchOptions(model=profile.name, **flags), profile, str(path))
    return validate_rows(read_rows(path), validator, from_text=path.suffix.lower() == ".csv")


def prompts(specs: list[JobSpec]) -> list[str]:
    return [s.prompt for s in specs]


# --- .txt ---------------------------------------------------------------------------------


def test_txt_one_prompt_per_line_blank_lines_skipped(tmp_path):
    path = write(tmp_path, "a red fox\n\n   \n\t\na blue owl\r\nlast line without newline", ".txt")
    assert [line for line, _ in read_rows(path)] == [1, 5, 6]
    specs = load(path)
    assert prompts(specs) == ["a red fox", "a blue owl", "last line without newline"]
    assert [s.index for s in specs] == [0, 1, 2]


def test_txt_rows_take_the_profile_defaults(tmp_path):
    (spec,) = load(write(tmp_path, "a red fox\n", ".txt"))
    assert (
        (spec.steps, spec.guidance, spec.width, spec.height)
        == (TINY.steps, TINY.guidance, TINY.width, TINY.height)
        == (4, 1.0, 64, 64)
    )
    assert spec.negative_prompt == "" and spec.seed is None and spec.metadata == {}
    assert spec.render_shape == (64, 64, 4, 1.0, "", None, "")  # no style LoRAs, text2img, no controls


def test_txt_keeps_inner_whitespace_and_unicode(tmp_path):
    (spec,) = load(write(tmp_path, "  a fox,\tin snow — 雪  \n", ".txt"))
    assert spec.prompt == "  a fox,\tin snow — 雪  "


def test_txt_line_number_of_an_error_counts_skipped_blank_lines(tmp_path):
    path = write(tmp_path, "good\n\n\nbad \x07 bell\n", ".txt")
    with pytest.raises(InputError) as info:
        load(path)
    assert (info.value.line, info.value.field) == (4, "prompt")
    assert str(info.value).startswith(f"{path}:4:prompt: ")


# --- .jsonl -------------------------------------------------------------------------------


def test_jsonl_fields_metadata_and_line_numbers(tmp_path):
    path = write(
        tmp_path,
        "\n".join(
            [
                '{"prompt": "a red fox"}',
                "",
                "   ",
                '{"prompt": "a blue owl", "negative_prompt": "blurry", "seed": 7, "steps": 2, "guidance": 1.5,'
                ' "width": 128, "height": 96, "sku": "A-1", "tags": ["x", 2], "score": 0.5, "extra": null}',
            ]
        )
        + "\n",
        ".jsonl",
    )
    assert [line for line, _ in read_rows(path)] == [1, 4]
    first, second = load(path)
    assert (first.prompt, first.steps, first.width, first.seed, first.metadata) == ("a red fox", 4, 64, None, {})
    assert second == JobSpec(
        index=1,
        prompt="a blue owl",
        negative_prompt="blurry",
        seed=7,
        steps=2,
        guidance=1.5,
        width=128,
        height=96,
        metadata={"sku": "A-1", "tags": ["x", 2], "score": 0.5, "extra": None},
    )
    assert isinstance(second.guidance, float)


def test_jsonl_ndjson_suffix_and_integral_floats(tmp_path):
    (spec,) = load(write(tmp_path, '{"prompt": "fox", "steps": 3.0, "width": 64.0, "guidance": 1}\n', ".ndjson"))
    assert (spec.steps, spec.width, spec.guidance) == (3, 64, 1.0)
    assert isinstance(spec.steps, int) and isinstance(spec.guidance, float)


def test_jsonl_null_fields_fall_back_to_defaults(tmp_path):
    (spec,) = load(write(tmp_path, '{"prompt": "fox", "steps": null, "seed": null}\n', ".jsonl"), steps=6)
    assert spec.steps == 6 and spec.seed is None


def test_jsonl_newline_inside_a_prompt_is_allowed(tmp_path):
    (spec,) = load(write(tmp_path, '{"prompt": "line one\\nline two\\ttab"}\n', ".jsonl"))
    assert spec.prompt == "line one\nline two\ttab"


# --- .csv ---------------------------------------------------------------------------------


def test_csv_numeric_strings_are_coerced_and_other_columns_kept(tmp_path):
    path = write(
        tmp_path,
        "prompt,steps,guidance,seed,width,height,negative_prompt,sku\n"
        "a red fox,2,1.5, 7 ,128,96,blurry,A-1\n"
        "\n"
        "a blue owl,,,,,,,B-2\n",
        ".csv",
    )
    assert [line for line, _ in read_rows(path)] == [2, 4]
    first, second = load(path)
    assert (first.steps, first.guidance, first.seed, first.width, first.height) == (2, 1.5, 7, 128, 96)
    assert isinstance(first.steps, int) and isinstance(first.guidance, float) and isinstance(first.seed, int)
    assert first.negative_prompt == "blurry" and first.metadata == {"sku": "A-1"}
    # Empty cells mean "not set": the defaults fill in, the metadata cell stays a string.
    assert (second.steps, second.guidance, second.seed, second.width) == (4, 1.0, None, 64)
    assert second.negative_prompt == "" and second.metadata == {"sku": "B-2"}


def test_csv_header_names_are_stripped_and_column_order_is_free(tmp_path):
    (spec,) = load(write(tmp_path, "sku , prompt ,steps\nA-1,a fox,3\n", ".csv"))
    assert (spec.prompt, spec.steps, spec.metadata) == ("a fox", 3, {"sku": "A-1"})


def test_csv_quoted_multiline_prompt_and_later_line_numbers(tmp_path):
    path = write(tmp_path, 'prompt,seed\n"a fox, in snow\nat dusk",1\nan owl,2\n', ".csv")
    rows = list(read_rows(path))
    assert rows == [(3, {"prompt": "a fox, in snow\nat dusk", "seed": "1"}), (4, {"prompt": "an owl", "seed": "2"})]
    assert prompts(load(path)) == ["a fox, in snow\nat dusk", "an owl"]


def test_csv_crlf_line_endings(tmp_path):
    path = write(tmp_path, "prompt,steps\r\na fox,2\r\nan owl,3\r\n", ".csv")
    specs = load(path)
    assert [(s.prompt, s.steps) for s in specs] == [("a fox", 2), ("an owl", 3)]


# --- BOM, suffixes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "suffix"),
    [
        ("a red fox\n", ".txt"),
        ('{"prompt": "a red fox"}\n', ".jsonl"),
        ("prompt\na red fox\n", ".csv"),
    ],
)
def test_utf8_bom_is_dropped(tmp_path, content, suffix):
    (spec,) = load(write(tmp_path, "\ufeff" + content, suffix))
    assert spec.prompt == "a red fox"


def test_csv_bom_does_not_end_up_in_the_header(tmp_path):
    # Without stripping, the header's first name would be "\ufeffprompt" and not match.
    (spec,) = load(write(tmp_path, "\ufeffprompt,steps\nfox,3\n", ".csv"))
    assert spec.steps == 3 and spec.metadata == {}


def test_suffix_is_case_insensitive(tmp_path):
    assert prompts(load(write(tmp_path, "a fox\n", ".TXT"))) == ["a fox"]
    assert prompts(load(write(tmp_path, "prompt,steps\nan owl,2\n", ".Csv"))) == ["an owl"]
    assert prompts(load(write(tmp_path, '{"prompt": "a cat"}\n', ".JSONL"))) == ["a cat"]


# --- flags (batch defaults) and profiles --------------------------------------------------


def test_flags_are_batch_defaults_and_rows_override_them(tmp_path):
    path = write(
        tmp_path,
        "\n".join(
            [
                '{"prompt": "uses flags"}',
                '{"prompt": "own fields", "steps": 8, "guidance": 2, "width": 16, "height": 24, "seed": 3,'
                ' "negative_prompt": "own"}',
            ]
        )
        + "\n",
        ".jsonl",
    )
    flags = dict(steps=2, guidance=1.25, width=256, height=128, negative_prompt="ugly", seed=99)
    a, b = load(path, **flags)
    assert (a.steps, a.guidance, a.width, a.height, a.negative_prompt) == (2, 1.25, 256, 128, "ugly")
    # The batch seed is not a job seed: jobs without a seed derive one when the batch is built.
    assert a.seed is None
    assert (b.steps, b.guidance, b.width, b.height, b.negative_prompt, b.seed) == (8, 2.0, 16, 24, "own", 3)


def test_a_batch_name_of_200_characters_is_fine(tmp_path):
    assert load(write(tmp_path, "fox\n", ".txt"), name="n" * 200)[0].prompt == "fox"


def test_partial_flags_leave_the_rest_to_the_profile(tmp_path):
    (spec,) = load(write(tmp_path, "fox\n", ".txt"), steps=1)
    assert (spec.steps, spec.guidance, spec.width, spec.height) == (1, 1.0, 64, 64)


def test_profile_defaults_fill_in(tmp_path):
    path = write(tmp_path, "fox\n", ".txt")
    (sdxl,) = load(path, profile=BUILTIN_PROFILES["sdxl"])
    assert (sdxl.width, sdxl.height, sdxl.steps) == (1024, 1024, 4)
    (arch,) = load(path, profile=BUILTIN_PROFILES["sd15-arch"], height=512)
    assert (arch.width, arch.height) == (256, 512)


def test_a_bad_flag_is_named_as_a_flag_before_any_row_is_read(tmp_path):
    # The file does not even have to be readable: flags are checked when the validator is built.
    with pytest.raises(InputError) as info:
        RowValidator(BatchOptions(model="tiny", steps=0), TINY, "prompts.txt")
    assert str(info.value) == "prompts.txt:--steps: must be between 1 and 8 (got 0)"
    assert info.value.line is None


# --- rows given in Python (the API) -------------------------------------------------------


def test_rows_from_objects_strings_and_mappings():
    validator = RowValidator(BatchOptions(model="tiny", steps=3), TINY, "<rows>")
    specs = validate_rows(rows_from_objects(["a fox", {"prompt": "an owl", "seed": 7, "sku": 1}]), validator)
    assert [(s.prompt, s.steps, s.seed, s.metadata) for s in specs] == [
        ("a fox", 3, None, {}),
        ("an owl", 3, 7, {"sku": 1}),
    ]


@pytest.mark.parametrize(
    ("rows", "expected", "phrase"),
    [
        ([], "<rows>: ", "no prompts"),
        (["ok", 3], "<rows>:2: ", "must be a string or a mapping"),
        (["ok", {"prompt": None}], "<rows>:2:prompt: ", "must be a string"),
        ([{"prompt": "a", "guidance": float("nan")}], "<rows>:1:guidance: ", "finite"),
        ([{"prompt": "a", "seed": float("inf")}], "<rows>:1:seed: ", "must be an integer"),
        ([{"prompt": "a", "score": float("nan")}], "<rows>:1:score: ", "finite"),
        ([{"prompt": "a", "nested": {"x": [1, float("-inf")]}}], "<rows>:1:nested: ", "finite"),
        ([{"prompt": "a", "when": object()}], "<rows>:1:when: ", "must be JSON data"),
        ([{"prompt": "a", "steps": 10**5000}], "<rows>:1:steps: ", "between 1 and 8"),
        ([{"prompt": "a", "guidance": 10**400}], "<rows>:1:guidance: ", "too large"),
    ],
)
def test_bad_python_rows(rows, expected, phrase):
    validator = RowValidator(BatchOptions(model="tiny"), TINY, "<rows>")
    with pytest.raises(InputError) as info:
        validate_rows(rows_from_objects(rows), validator)
    assert str(info.value).startswith(expected)
    assert phrase in info.value.message


# --- bad input: every case names file, line and field -----------------------------------

# (id, file content, suffix, flags, where ("LINE:FIELD", "LINE", "--FLAG" or "" for the file), phrase)
BAD = [
    # empty input
    ("txt-empty", "", ".txt", {}, "", "no prompts"),
    ("txt-only-blank-lines", "\n  \n\t\n", ".txt", {}, "", "no prompts"),
    ("txt-bom-only", "\ufeff\n", ".txt", {}, "", "no prompts"),
    ("jsonl-empty", "", ".jsonl", {}, "", "no prompts"),
    ("csv-empty", "", ".csv", {}, "", "no prompts"),
    ("csv-header-only", "prompt,seed\n", ".csv", {}, "", "no prompts"),
    # encoding and control characters
    ("txt-latin1-line-3", b"a fox\n\nsch\xf6n\n", ".txt", {}, "3", "not valid UTF-8"),
    ("txt-utf16", "a fox\n".encode("utf-16"), ".txt", {}, "1", "not valid UTF-8"),
    ("csv-latin1-row", b"prompt\nok\nsch\xf6n\n", ".csv", {}, "3", "not valid UTF-8"),
    ("jsonl-latin1", b'{"prompt": "sch\xf6n"}\n', ".jsonl", {}, "1", "not valid UTF-8"),
    ("txt-bell", "ok\n\nbad \x07 bell\n", ".txt", {}, "3:prompt", "control character (U+0007)"),
    ("txt-escape", "\x1b[31mred\n", ".txt", {}, "1:prompt", "control character (U+001B)"),
    ("txt-del", "a\x7fb\n", ".txt", {}, "1:prompt", "control character (U+007F)"),
    ("txt-c1", "a\x85b\n", ".txt", {}, "1:prompt", "control character (U+0085)"),
    ("jsonl-nul-escape", '{"prompt": "a\\u0000b"}\n', ".jsonl", {}, "1:prompt", "control character (U+0000)"),
    (
        "jsonl-negative-control",
        '{"prompt": "a", "negative_prompt": "\\u0008"}\n',
        ".jsonl",
        {},
        "1:negative_prompt",
        "control character",
    ),
    ("jsonl-lone-surrogate", '{"prompt": "a\\ud800"}\n', ".jsonl", {}, "1:prompt", "unpaired surrogate"),
    ("jsonl-metadata-surrogate", '{"prompt": "a", "note": "\\udfff"}\n', ".jsonl", {}, "1:note", "unpaired surrogate"),
    ("csv-nul", "prompt\na\x00b\n", ".csv", {}, "2:prompt", "control character (U+0000)"),
    # prompt
    (
        "jsonl-empty-prompt-line-3",
        '{"prompt": "a"}\n\n{"prompt": "   "}\n',
        ".jsonl",
        {},
        "3:prompt",
        "must not be empty",
    ),
    ("jsonl-missing-prompt", '{"seed": 1}\n', ".jsonl", {}, "1:prompt", "missing"),
    ("jsonl-null-prompt", '{"prompt": null}\n', ".jsonl", {}, "1:prompt", "must be a string"),
    ("jsonl-int-prompt", '{"prompt": 5}\n', ".jsonl", {}, "1:prompt", "must be a string (got int)"),
    ("csv-empty-prompt", 'prompt,seed\nok,1\n"",2\n', ".csv", {}, "3:prompt", "must not be empty"),
    # malformed JSON
    ("jsonl-trailing-comma-line-2", '{"prompt": "a"}\n{"prompt": "b",}\n', ".jsonl", {}, "2", "malformed JSON"),
    ("jsonl-two-objects", '{"prompt": "a"} {"prompt": "b"}\n', ".jsonl", {}, "1", "Extra data"),
    ("jsonl-unclosed-after-blank", '\n{"prompt": "a"\n', ".jsonl", {}, "2", "malformed JSON"),
    ("jsonl-array", '["a fox"]\n', ".jsonl", {}, "1", "must be a JSON object (got list)"),
    ("jsonl-string", '"a fox"\n', ".jsonl", {}, "1", "must be a JSON object (got str)"),
    ("jsonl-nan", '{"prompt": "a", "guidance": NaN}\n', ".jsonl", {}, "1", "NaN is not allowed"),
    ("jsonl-infinity", '{"prompt": "a", "steps": Infinity}\n', ".jsonl", {}, "1", "Infinity is not allowed"),
    ("jsonl-minus-infinity", '{"prompt": "a", "seed": -Infinity}\n', ".jsonl", {}, "1", "-Infinity is not allowed"),
    (
        "jsonl-too-deep",
        '{"prompt": "a", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
        ".jsonl",
        {},
        "1",
        "nested too deeply",
    ),
    # types and ranges (JSONL values are typed: no coercion from strings)
    ("jsonl-steps-9", '{"prompt": "a", "steps": 9}\n', ".jsonl", {}, "1:steps", "between 1 and 8 (got 9)"),
    ("jsonl-steps-0", '{"prompt": "a", "steps": 0}\n', ".jsonl", {}, "1:steps", "between 1 and 8"),
    ("jsonl-steps-string", '{"prompt": "a", "steps": "4"}\n', ".jsonl", {}, "1:steps", "must be an integer"),
    ("jsonl-steps-bool", '{"prompt": "a", "steps": true}\n', ".jsonl", {}, "1:steps", "must be an integer"),
    ("jsonl-steps-fraction", '{"prompt": "a", "steps": 2.5}\n', ".jsonl", {}, "1:steps", "must be an integer"),
    ("jsonl-steps-huge", '{"prompt": "a", "steps": 1' + "0" * 400 + "}\n", ".jsonl", {}, "1:steps", "between 1 and 8"),
    (
        "jsonl-guidance-2.5",
        '{"prompt": "a", "guidance": 2.5}\n',
        ".jsonl",
        {},
        "1:guidance",
        "between 1 and 2 (got 2.5)",
    ),
    ("jsonl-guidance-0.5", '{"prompt": "a", "guidance": 0.5}\n', ".jsonl", {}, "1:guidance", "between 1 and 2"),
    ("jsonl-guidance-string", '{"prompt": "a", "guidance": "high"}\n', ".jsonl", {}, "1:guidance", "must be a number"),
    ("jsonl-guidance-overflow", '{"prompt": "a", "guidance": 1e999}\n', ".jsonl", {}, "1:guidance", "finite"),
    (
        "jsonl-guidance-huge-int",
        '{"prompt": "a", "guidance": 1' + "0" * 400 + "}\n",
        ".jsonl",
        {},
        "1:guidance",
        "too large",
    ),
    ("jsonl-width-100", '{"prompt": "a", "width": 100}\n', ".jsonl", {}, "1:width", "multiple of 8"),
    ("jsonl-width-4096", '{"prompt": "a", "width": 4096}\n', ".jsonl", {}, "1:width", "between 8 and 2048"),
    ("jsonl-width-0", '{"prompt": "a", "width": 0}\n', ".jsonl", {}, "1:width", "between 8 and 2048"),
    (
        "jsonl-height-negative",
        '{"prompt": "a", "height": -64}\n',
        ".jsonl",
        {},
        "1:height",
        "between 8 and 2048 (got -64)",
    ),
    ("jsonl-height-fraction", '{"prompt": "a", "height": 64.5}\n', ".jsonl", {}, "1:height", "must be an integer"),
    ("jsonl-seed-negative", '{"prompt": "a", "seed": -1}\n', ".jsonl", {}, "1:seed", "between 0 and"),
    (
        "jsonl-seed-2**64",
        '{"prompt": "a", "seed": 18446744073709551616}\n',
        ".jsonl",
        {},
        "1:seed",
        "between 0 and 9223372036854775807",
    ),
    (
        "jsonl-negative-prompt-list",
        '{"prompt": "a", "negative_prompt": ["x"]}\n',
        ".jsonl",
        {},
        "1:negative_prompt",
        "must be a string (got list)",
    ),
    ("jsonl-metadata-overflow", '{"prompt": "a", "score": 1e999}\n', ".jsonl", {}, "1:score", "finite"),
    (
        "jsonl-row-overrides-good-flag",
        '{"prompt": "a", "steps": 12}\n',
        ".jsonl",
        {"steps": 2},
        "1:steps",
        "between 1 and 8",
    ),
    # CSV cells are text: coerced, then checked
    ("csv-steps-word-after-blank", "prompt,steps\n\na,nine\n", ".csv", {}, "3:steps", "must be an integer"),
    ("csv-steps-float", "prompt,steps\na,4.0\n", ".csv", {}, "2:steps", "must be an integer"),
    ("csv-steps-9", "prompt,steps\na,9\n", ".csv", {}, "2:steps", "between 1 and 8"),
    ("csv-guidance-nan", "prompt,guidance\na,nan\n", ".csv", {}, "2:guidance", "finite"),
    ("csv-guidance-inf", "prompt,guidance\na,-inf\n", ".csv", {}, "2:guidance", "finite"),
    ("csv-guidance-word", "prompt,guidance\na,high\n", ".csv", {}, "2:guidance", "must be a number"),
    ("csv-width-negative", "prompt,width\na,-8\n", ".csv", {}, "2:width", "between 8 and 2048"),
    ("csv-height-100", "prompt,height\na,100\n", ".csv", {}, "2:height", "multiple of 8"),
    ("csv-seed-negative", "prompt,seed\na,-5\n", ".csv", {}, "2:seed", "between 0 and"),
    # malformed CSV
    ("csv-duplicate-header", "prompt,seed,seed\na,1,2\n", ".csv", {}, "1:seed", "duplicate column"),
    ("csv-duplicate-header-spaces", "prompt, prompt\na,b\n", ".csv", {}, "1:prompt", "duplicate column"),
    ("csv-empty-column-name", "prompt,,sku\na,1,2\n", ".csv", {}, "1", "empty column name"),
    ("csv-no-prompt-column", "text,seed\na,1\n", ".csv", {}, "1:prompt", "no 'prompt' column"),
    ("csv-too-many-fields", "prompt,seed\na,1\nb,2,3\n", ".csv", {}, "3", "expected 2 fields, got 3"),
    ("csv-too-few-fields", "prompt,seed\na\n", ".csv", {}, "2", "expected 2 fields, got 1"),
    ("csv-unterminated-quote", 'prompt\n"a fox\n', ".csv", {}, "2", "malformed CSV"),
    ("csv-stray-quote", 'prompt\n\n"a"b\n', ".csv", {}, "3", "malformed CSV"),
    # flags: no line, named as the flag
    ("flag-steps-9", "a\n", ".txt", {"steps": 9}, "--steps", "between 1 and 8 (got 9)"),
    ("flag-guidance-2.5", "a\n", ".txt", {"guidance": 2.5}, "--guidance", "between 1 and 2"),
    ("flag-guidance-nan", "a\n", ".txt", {"guidance": float("nan")}, "--guidance", "finite"),
    ("flag-width-100", "a\n", ".txt", {"width": 100}, "--width", "multiple of 8"),
    ("flag-height-4096", "a\n", ".txt", {"height": 4096}, "--height", "between 8 and 2048"),
    ("flag-width-negative", "a\n", ".txt", {"width": -64}, "--width", "between 8 and 2048"),
    ("flag-seed-negative", "a\n", ".txt", {"seed": -1}, "--seed", "between 0 and"),
    (
        "flag-negative-prompt-control",
        "a\n",
        ".txt",
        {"negative_prompt": "x\x00"},
        "--negative-prompt",
        "control character",
    ),
    ("flag-name-too-long", "a\n", ".txt", {"name": "n" * 201}, "--name", "at most 200 characters"),
    ("flag-name-control", "a\n", ".txt", {"name": "run\x001"}, "--name", "control character"),
    # the file itself
    ("unknown-suffix", "a\n", ".md", {}, "", "unknown file type '.md'"),
]


@pytest.mark.parametrize(
    ("content", "suffix", "flags", "where", "phrase"), [pytest.param(*case[1:], id=case[0]) for case in BAD]
)
def test_bad_input_names_file_line_and_field(tmp_path, content, suffix, flags, where, phrase):
    path = write(tmp_path, content, suffix)
    with pytest.raises(InputError) as info:
        load(path, **flags)
    message = str(info.value)
    prefix = f"{path}:{where}: " if where else f"{path}: "
    assert message.startswith(prefix), message
    assert phrase in info.value.message, message
    # The structured fields agree with the text.
    line, _, field = where.partition(":")
    if where.startswith("--"):
        assert (info.value.line, info.value.field) == (None, where)
    elif where:
        assert info.value.line == int(line) and info.value.field == (field or None)
    else:
        assert info.value.line is None and info.value.field is None


def test_bad_table_is_big_enough():
    assert len(BAD) >= 30
    assert len({case[0] for case in BAD}) == len(BAD)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.txt"
    with pytest.raises(InputError) as info:
        read_rows(path)
    assert str(info.value) == f"{path}: no such file"


def test_the_whole_file_is_validated_before_anything_is_returned(tmp_path):
    # 999 good rows then one bad one: no partial result, the error names the last line.
    path = write(tmp_path, "".join(f"prompt {i}\n" for i in range(999)) + "bad\x01\n", ".txt")
    with pytest.raises(InputError) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:1000:prompt: ")


def test_read_rows_streams(tmp_path):
    # A bad line late in the file is not reached until the stream gets there.
    rows = read_rows(write(tmp_path, b'{"prompt": "a"}\n{bad\n', ".jsonl"))
    assert next(rows) == (1, {"prompt": "a"})
    with pytest.raises(InputError):
        next(rows)
