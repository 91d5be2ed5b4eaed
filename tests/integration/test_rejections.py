"""Bad input is refused whole: exit code 2, an error naming file:line:field, and nothing written.

The CLI runs as a real subprocess against Postgres and Redis; after each refusal the `batches`
and `jobs` tables and the broker's Redis database are exactly as they were. A larger table of
hostile inputs goes through the in-process Python API (`lcmq.submit`), which the CLI calls, so
it stays fast: the same services, the same before/after snapshot, no subprocess per case.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.services


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# (id, file name, content, extra CLI args, where ("LINE:FIELD", "LINE", "--FLAG", "model"), phrase)
CASES = [
    (
        "unknown-model",
        "prompts.txt",
        "a red fox\n",
        ["--model", "no-such-model"],
        "model",
        "unknown model profile 'no-such-model'",
    ),
    (
        "steps-9-flag",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--steps", "9"],
        "--steps",
        "must be between 1 and 8 (got 9)",
    ),
    (
        "steps-9-row",
        "rows.jsonl",
        '{"prompt": "a"}\n{"prompt": "b", "steps": 9}\n',
        ["--model", "tiny"],
        "2:steps",
        "must be between 1 and 8",
    ),
    (
        "guidance-2.5-row",
        "rows.jsonl",
        '{"prompt": "a", "guidance": 2.5}\n',
        ["--model", "tiny"],
        "1:guidance",
        "must be between 1 and 2",
    ),
    (
        "guidance-2.5-flag",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--guidance", "2.5"],
        "--guidance",
        "must be between 1 and 2",
    ),
    ("width-100-csv", "rows.csv", "prompt,width\na,64\nb,100\n", ["--model", "tiny"], "3:width", "multiple of 8"),
    (
        "width-4096-flag",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--width", "4096"],
        "--width",
        "between 8 and 2048",
    ),
    (
        "empty-prompt-line-3",
        "rows.jsonl",
        '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": ""}\n',
        ["--model", "tiny"],
        "3:prompt",
        "must not be empty",
    ),
    (
        "malformed-json-line-2",
        "rows.jsonl",
        '{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n',
        ["--model", "tiny"],
        "2",
        "malformed JSON",
    ),
    ("nan-json", "rows.jsonl", '{"prompt": "a", "guidance": NaN}\n', ["--model", "tiny"], "1", "NaN is not allowed"),
    (
        "csv-duplicate-header",
        "rows.csv",
        "prompt,seed,seed\na,1,2\n",
        ["--model", "tiny"],
        "1:seed",
        "duplicate column",
    ),
    ("non-utf8", "prompts.txt", b"a red fox\nsch\xf6n\n", ["--model", "tiny"], "2", "not valid UTF-8"),
    (
        "control-character",
        "prompts.txt",
        "a red fox\n\n\x1b[31mred\n",
        ["--model", "tiny"],
        "3:prompt",
        "control character",
    ),
    ("empty-file", "prompts.txt", "", ["--model", "tiny"], "", "no prompts"),
    (
        "name-too-long",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--name", "n" * 201],
        "--name",
        "at most 200 characters",
    ),
    (
        "format-gif",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--format", "gif"],
        "--format",
        "must be one of png, webp, jpeg (got 'gif')",
    ),
    (
        "quality-0",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--format", "webp", "--quality", "0"],
        "--quality",
        "must be an integer between 1 and 100 (got 0)",
    ),
    (
        "matrix-steps-9",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--matrix", "steps=4,9"],
        "--matrix steps",
        "must be between 1 and 8 (got 9)",
    ),
    (
        "matrix-no-equals",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--matrix", "seed"],
        "--matrix",
        "expected NAME=VALUES",
    ),
    (
        "matrix-unused-axis",
        "prompts.txt",
        "a red fox in {Style}\n",
        ["--model", "tiny", "--matrix", "style=oil"],
        "--matrix style",
        "no prompt uses {style}",
    ),
    (
        "jsonl-stepz",
        "rows.jsonl",
        '{"prompt": "a"}\n{"prompt": "b", "stepz": 4}\n',
        ["--model", "tiny"],
        "2:stepz",
        "did you mean 'steps'?",
    ),
    (
        "jsonl-Prompt",
        "rows.jsonl",
        '{"Prompt": "a red fox"}\n',
        ["--model", "tiny"],
        "1:Prompt",
        "did you mean 'prompt'?",
    ),
    ("csv-seeds-column", "rows.csv", "prompt,seeds\na,1\n", ["--model", "tiny"], "1:seeds", "did you mean 'seed'?"),
    ("csv-Prompt-header", "rows.csv", "Prompt,seed\na,1\n", ["--model", "tiny"], "1:prompt", "but a 'Prompt' one"),
    ("csv-semicolons", "rows.csv", "prompt;seed\na;1\n", ["--model", "tiny"], "1:prompt", "semicolon-separated"),
    (
        "prompt-10001-chars",
        "prompts.txt",
        "a red fox\n" + "x" * 10_001 + "\n",
        ["--model", "tiny"],
        "2:prompt",
        "at most 10000",
    ),
    (
        "timeout-without-wait",
        "prompts.txt",
        "a red fox\n",
        ["--model", "tiny", "--timeout", "5"],
        "--timeout",
        "only applies with --wait",
    ),
]


@pytest.mark.parametrize(
    ("name", "content", "args", "where", "phrase"), [pytest.param(*case[1:], id=case[0]) for case in CASES]
)
def test_cli_rejects_bad_input_and_leaves_nothing_behind(
    services_env, snapshot, cli, tmp_path, name, content, args, where, phrase
):
    path = _write(tmp_path, name, content)
    before = snapshot()
    result = cli(services_env, "submit", str(path), *args)
    assert result.returncode == 2, (result.stdout, result.stderr)
    prefix = f"lcmq: error: {path}:{where}: " if where else f"lcmq: error: {path}: "
    assert result.stderr.startswith(prefix), result.stderr
    assert phrase in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""  # no batch id: there is no batch
    assert snapshot() == before


def test_snapshot_sees_a_good_submit_then_a_bad_one_changes_nothing(services_env, snapshot, cli, tmp_path):
    """The counting above can see a write: a good file adds rows and messages, a bad one nothing."""
    before = snapshot()
    good = _write(tmp_path, "good.txt", "a red fox\n\na blue owl\n")
    result = cli(services_env, "submit", str(good), "--model", "tiny", "--chunk-size", "1")
    assert result.returncode == 0, result.stderr
    after_good = snapshot()
    assert after_good["rows"] == {"batches": before["rows"]["batches"] + 1, "jobs": before["rows"]["jobs"] + 2}
    assert after_good["render.tiny"] == before["render.tiny"] + 2

    # A file whose last row is bad: the good rows before it are not written either.
    bad = _write(
        tmp_path,
        "bad.jsonl",
        "".join(f'{{"prompt": "p{i}"}}\n' for i in range(50)) + '{"prompt": "last", "width": 4096}\n',
    )
    result = cli(services_env, "submit", str(bad), "--model", "tiny", "--chunk-size", "1")
    assert result.returncode == 2
    assert result.stderr.startswith(f"lcmq: error: {bad}:51:width: ")
    assert snapshot() == after_good


def test_api_rejects_nan_metadata_before_the_database(services_env, snapshot):
    """NaN in a metadata value would be refused by Postgres' json type after validation;
    the validator has to catch it first, as an InputError naming the key."""
    import lcmq
    from lcmq.errors import InputError

    before = snapshot()
    with pytest.raises(InputError) as info:
        lcmq.submit(["a red fox", {"prompt": "a blue owl", "score": float("nan")}], model="tiny")
    assert str(info.value).startswith("<rows>:2:score: ")
    assert snapshot() == before


def test_embedded_api_rejects_bad_rows_and_lists_no_batch(embedded_env):
    import lcmq
    from lcmq.errors import InputError
    from lcmq.migrate import upgrade
    from lcmq.settings import get_settings

    settings = get_settings()
    upgrade(settings.database_url_resolved)
    assert lcmq.batches() == []

    with pytest.raises(InputError) as info:
        lcmq.submit(["a red fox", {"prompt": "a blue owl", "steps": 9}], model="tiny")
    assert str(info.value).startswith("<rows>:2:steps: ")

    with pytest.raises(InputError) as info:
        lcmq.submit(["a red fox"], model="no-such-model")
    assert str(info.value).startswith("<rows>:model: ")

    path = Path("prompts.csv")
    path.write_text("prompt,guidance\na red fox,1.5\na blue owl,2.5\n")
    with pytest.raises(InputError) as info:
        lcmq.submit(path, model="tiny")
    assert str(info.value).startswith("prompts.csv:3:guidance: ")

    assert lcmq.batches() == []
    broker = settings.broker_folder
    assert not broker.exists() or not any(p.is_file() for p in broker.rglob("*"))

    # The same listing does see a good submit: the empty list above is not an accident.
    st = lcmq.submit(["a red fox"], model="tiny")
    assert [b["batch_id"] for b in lcmq.batches()] == [st.batch_id]


# --- the Python API: a table of hostile inputs --------------------------------------------


class File:
    """A batch file a case writes under tmp_path (content None: the file is not created)."""

    def __init__(self, name: str, content: str | bytes | None, as_str: bool = False):
        self.name, self.content, self.as_str = name, content, as_str

    def __repr__(self) -> str:  # keeps pytest's failure output short for the 10^4-char cases
        return f"File({self.name!r})"


GOOD = {"prompt": "a red fox"}

# (id, input (File or API rows), submit keywords, where ("LINE:FIELD", "LINE", "--FLAG", "model", ""),
#  phrase[, marks]). `model` defaults to "tiny".
API_CASES = [
    # -- JSON that does not parse, or parses to something that is not an object
    (
        "jsonl-malformed-line-2",
        File("rows.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n{"prompt": "c"}\n'),
        {},
        "2",
        "malformed JSON: Expecting property name enclosed in double quotes at column 16",
    ),
    ("jsonl-not-json", File("rows.jsonl", "prompt: a red fox\n"), {}, "1", "malformed JSON: Expecting value"),
    (
        "jsonl-array-line",
        File("rows.jsonl", '{"prompt": "a"}\n["a red fox", 7]\n'),
        {},
        "2",
        "each line must be a JSON object (got list)",
    ),
    ("jsonl-string-line", File("rows.jsonl", '"a red fox"\n'), {}, "1", "each line must be a JSON object (got str)"),
    (
        "jsonl-nested-too-deep-to-parse",
        File("rows.jsonl", '{"prompt": "a", "m": ' + "[" * 100_000 + "]" * 100_000 + "}\n"),
        {},
        "1",
        "malformed JSON: nested too deeply",
    ),
    (
        "jsonl-metadata-nested-40",
        File("rows.jsonl", '{"prompt": "a", "m": ' + "[" * 40 + "]" * 40 + "}\n"),
        {},
        "1:m",
        "is nested too deeply",
    ),
    (
        "jsonl-5000-digit-seed",
        File("rows.jsonl", '{"prompt": "a", "seed": ' + "9" * 5000 + "}\n"),
        {},
        "1",
        "malformed JSON: Exceeds the limit (4300 digits)",
    ),
    # -- wrong types
    (
        "jsonl-steps-string",
        File("rows.jsonl", '{"prompt": "a", "steps": "4"}\n'),
        {},
        "1:steps",
        "must be an integer (got '4')",
    ),
    (
        "jsonl-steps-4.5",
        File("rows.jsonl", '{"prompt": "a", "steps": 4.5}\n'),
        {},
        "1:steps",
        "must be an integer (got 4.5)",
    ),
    (
        "jsonl-width-true",
        File("rows.jsonl", '{"prompt": "a", "width": true}\n'),
        {},
        "1:width",
        "must be an integer (got True)",
    ),
    ("jsonl-prompt-int", File("rows.jsonl", '{"prompt": 5}\n'), {}, "1:prompt", "must be a string (got int)"),
    ("jsonl-prompt-null", File("rows.jsonl", '{"prompt": null}\n'), {}, "1:prompt", "must be a string (got null)"),
    ("jsonl-prompt-missing", File("rows.jsonl", '{"text": "a red fox"}\n'), {}, "1:prompt", "missing"),
    ("csv-width-nan-text", File("rows.csv", "prompt,width\na,nan\n"), {}, "2:width", "must be an integer (got 'nan')"),
    ("api-steps-flag-string", [GOOD], {"steps": "4"}, "--steps", "must be an integer (got '4')"),
    ("api-width-flag-true", [GOOD], {"width": True}, "--width", "must be an integer (got True)"),
    # -- NaN / Infinity in fields and in metadata
    ("jsonl-guidance-NaN", File("rows.jsonl", '{"prompt": "a", "guidance": NaN}\n'), {}, "1", "NaN is not allowed"),
    (
        "jsonl-width-Infinity",
        File("rows.jsonl", '{"prompt": "a", "width": Infinity}\n'),
        {},
        "1",
        "Infinity is not allowed",
    ),
    (
        "jsonl-metadata-minus-Infinity",
        File("rows.jsonl", '{"prompt": "a", "score": -Infinity}\n'),
        {},
        "1",
        "-Infinity is not allowed",
    ),
    (
        "jsonl-metadata-nested-NaN",
        File("rows.jsonl", '{"prompt": "a", "tags": {"s": [1, NaN]}}\n'),
        {},
        "1",
        "NaN is not allowed",
    ),
    (
        "jsonl-guidance-1e400",
        File("rows.jsonl", '{"prompt": "a", "guidance": 1e400}\n'),
        {},
        "1:guidance",
        "must be a finite number (got inf)",
    ),
    (
        "jsonl-metadata-1e400",
        File("rows.jsonl", '{"prompt": "a", "score": -1e400}\n'),
        {},
        "1:score",
        "must be a finite number (got -inf)",
    ),
    (
        "csv-guidance-nan",
        File("rows.csv", "prompt,guidance\na,1.5\nb,nan\n"),
        {},
        "3:guidance",
        "must be a finite number (got nan)",
    ),
    ("csv-guidance-inf", File("rows.csv", "prompt,guidance\na,inf\n"), {}, "2:guidance", "must be a finite number"),
    (
        "api-guidance-nan",
        ["a", {"prompt": "b", "guidance": float("nan")}],
        {},
        "2:guidance",
        "must be a finite number (got nan)",
    ),
    (
        "api-guidance-minus-inf",
        [{"prompt": "b", "guidance": float("-inf")}],
        {},
        "1:guidance",
        "must be a finite number (got -inf)",
    ),
    ("api-guidance-flag-nan", [GOOD], {"guidance": float("nan")}, "--guidance", "must be a finite number (got nan)"),
    (
        "api-metadata-inf",
        [{"prompt": "a", "meta": {"score": float("inf")}}],
        {},
        "1:meta",
        "must be a finite number (got inf)",
    ),
    # -- sizes
    (
        "jsonl-width-negative",
        File("rows.jsonl", '{"prompt": "a", "width": -64}\n'),
        {},
        "1:width",
        "must be between 8 and 2048 (got -64)",
    ),
    (
        "jsonl-width-zero",
        File("rows.jsonl", '{"prompt": "a", "width": 0}\n'),
        {},
        "1:width",
        "must be between 8 and 2048 (got 0)",
    ),
    (
        "jsonl-height-huge",
        File("rows.jsonl", '{"prompt": "a", "height": 1000000000000000000000000000000}\n'),
        {},
        "1:height",
        "must be between 8 and 2048 (got 1000000000000000000000000000000)",
    ),
    ("csv-height-2056", File("rows.csv", "prompt,height\na,2056\n"), {}, "2:height", "must be between 8 and 2048"),
    ("api-width-4", [{"prompt": "a", "width": 4}], {}, "1:width", "must be a multiple of 8 (got 4)"),
    (
        "api-height-10e5000",
        [{"prompt": "a", "height": 10**5000}],
        {},
        "1:height",
        "must be between 8 and 2048 (got a very large integer)",
    ),
    ("api-height-flag-zero", [GOOD], {"height": 0}, "--height", "must be between 8 and 2048 (got 0)"),
    # -- steps
    (
        "jsonl-steps-0",
        File("rows.jsonl", '\ufeff{"prompt": "a", "steps": 0}\n'),
        {},
        "1:steps",
        "must be between 1 and 8 (got 0)",
    ),
    ("api-steps-9", ["a", {"prompt": "b", "steps": 9}], {}, "2:steps", "must be between 1 and 8 (got 9)"),
    (
        "csv-steps-minus-1",
        File("rows.csv", "prompt,steps\na, -1 \n"),
        {},
        "2:steps",
        "must be between 1 and 8 (got -1)",
    ),
    (
        "jsonl-steps-1e9",
        File("rows.jsonl", '{"prompt": "a", "steps": 1e9}\n'),
        {},
        "1:steps",
        "must be between 1 and 8 (got 1000000000)",
    ),
    ("api-steps-flag-9", [GOOD], {"steps": 9}, "--steps", "must be between 1 and 8 (got 9)"),
    # -- guidance
    (
        "csv-guidance-0.5",
        File("rows.csv", "prompt,guidance\na,0.5\n"),
        {},
        "2:guidance",
        "must be between 1 and 2 (got 0.5)",
    ),
    (
        "jsonl-guidance-2.5",
        File("rows.jsonl", '{"prompt": "a", "guidance": 2.5}\n'),
        {},
        "1:guidance",
        "must be between 1 and 2 (got 2.5)",
    ),
    ("api-guidance-flag-0.5", [GOOD], {"guidance": 0.5}, "--guidance", "must be between 1 and 2 (got 0.5)"),
    # -- seeds
    (
        "jsonl-seed-minus-1",
        File("rows.jsonl", '{"prompt": "a", "seed": -1}\n'),
        {},
        "1:seed",
        "must be between 0 and 9223372036854775807 (got -1)",
    ),
    (
        "jsonl-seed-2**64",
        File("rows.jsonl", '{"prompt": "a", "seed": 18446744073709551616}\n'),
        {},
        "1:seed",
        "(got 18446744073709551616)",
    ),
    ("api-seed-flag-2**64", [GOOD], {"seed": 2**64}, "--seed", "(got 18446744073709551616)"),
    ("api-seed-flag-minus-1", [GOOD], {"seed": -1}, "--seed", "must be between 0 and 9223372036854775807 (got -1)"),
    # -- bytes that are not UTF-8
    ("txt-non-utf8", File("prompts.txt", b"a red fox\nsch\xf6n\n"), {}, "2", "not valid UTF-8 (invalid start byte"),
    (
        "jsonl-truncated-utf8",
        File("rows.jsonl", b'{"prompt": "caf\xc3"}\n'),
        {},
        "1",
        "not valid UTF-8 (invalid continuation byte at byte 15)",
    ),
    ("csv-non-utf8-line-3", File("rows.csv", b"prompt\na\n\xc3\xa9\xe2\x82\n"), {}, "3", "not valid UTF-8"),
    # -- control characters in prompt and negative_prompt
    ("txt-nul-in-prompt", File("prompts.txt", "a red fox\nb\x00c\n"), {}, "2:prompt", "control character (U+0000)"),
    ("txt-del-in-prompt", File("prompts.txt", "a red fox\x7f\n"), {}, "1:prompt", "control character (U+007F)"),
    (
        "txt-esc-in-prompt",
        File("prompts.txt", "\n\n\x1b[31mred\n", as_str=True),
        {},
        "3:prompt",
        "control character (U+001B)",
    ),
    ("txt-c1-nel-in-prompt", File("prompts.txt", "a\n\x85b\n"), {}, "2:prompt", "control character (U+0085)"),
    (
        "jsonl-nul-in-negative",
        File("rows.jsonl", '{"prompt": "a", "negative_prompt": "\\u0000x"}\n'),
        {},
        "1:negative_prompt",
        "control character (U+0000)",
    ),
    (
        "jsonl-esc-in-negative",
        File("rows.jsonl", '{"prompt": "a", "negative_prompt": "\\u001b[31m"}\n'),
        {},
        "1:negative_prompt",
        "control character (U+001B)",
    ),
    (
        "csv-del-in-negative",
        File("rows.csv", "prompt,negative_prompt\na,b\x7f\n"),
        {},
        "2:negative_prompt",
        "control character (U+007F)",
    ),
    ("api-nul-in-prompt", ["a", "b\x00"], {}, "2:prompt", "control character (U+0000)"),
    (
        "api-esc-in-negative-flag",
        [GOOD],
        {"negative_prompt": "\x1b[0m"},
        "--negative-prompt",
        "control character (U+001B)",
    ),
    (
        "api-del-in-negative-row",
        [{"prompt": "a", "negative_prompt": "x\x7f"}],
        {},
        "1:negative_prompt",
        "control character (U+007F)",
    ),
    # -- nothing to render
    ("txt-empty-file", File("prompts.txt", ""), {}, "", "no prompts in input"),
    ("txt-only-blank-lines", File("prompts.txt", "\n\n   \n\t\n\r\n"), {}, "", "no prompts in input"),
    ("jsonl-only-blank-lines", File("rows.jsonl", "\n  \n\r\n"), {}, "", "no prompts in input"),
    ("csv-empty-file", File("rows.csv", ""), {}, "", "no prompts in input"),
    ("csv-header-only", File("rows.csv", "prompt,seed\n"), {}, "", "no prompts in input"),
    ("api-no-rows", [], {}, "", "no prompts in input"),
    # -- CSV structure
    ("csv-no-prompt-column", File("rows.csv", "text,seed\na,1\n"), {}, "1:prompt", "header has no 'prompt' column"),
    ("csv-duplicate-header", File("rows.csv", "prompt, seed,seed \na,1,2\n"), {}, "1:seed", "duplicate column"),
    ("csv-empty-column-name", File("rows.csv", "prompt,,seed\na,b,1\n"), {}, "1", "empty column name in header"),
    ("csv-too-many-fields", File("rows.csv", "prompt,seed\na,1\nb,2,3\n"), {}, "3", "expected 2 fields, got 3"),
    ("csv-too-few-fields", File("rows.csv", "prompt,seed\na\n"), {}, "2", "expected 2 fields, got 1"),
    (
        "csv-unterminated-quote",
        File("rows.csv", 'prompt,seed\na,1\n"b,2\n'),
        {},
        "3",
        "malformed CSV: unexpected end of data",
    ),
    # -- empty and whitespace-only prompts
    (
        "jsonl-empty-prompt",
        File("rows.jsonl", '{"prompt": "a"}\n{"prompt": ""}\n'),
        {},
        "2:prompt",
        "must not be empty",
    ),
    ("jsonl-whitespace-prompt", File("rows.jsonl", '{"prompt": " \\t  "}\n'), {}, "1:prompt", "must not be empty"),
    ("csv-empty-prompt", File("rows.csv", "prompt,seed\n,5\n"), {}, "2:prompt", "must not be empty"),
    ("csv-whitespace-prompt", File("rows.csv", "prompt,seed\n   ,5\n"), {}, "2:prompt", "must not be empty"),
    ("api-whitespace-prompt", ["a", " \n "], {}, "2:prompt", "must not be empty"),
    # -- model, file and flags
    (
        "file-unknown-model",
        File("prompts.txt", "a red fox\n"),
        {"model": "sd99"},
        "model",
        "unknown model profile 'sd99'",
    ),
    ("api-unknown-model", [GOOD], {"model": "../tiny"}, "model", "unknown model profile '../tiny'"),
    ("unknown-suffix", File("prompts.md", "a red fox\n"), {}, "", "unknown file type '.md'; use .txt, .jsonl or .csv"),
    ("no-suffix", File("prompts", "a red fox\n", as_str=True), {}, "", "unknown file type ''"),
    ("missing-file", File("missing.txt", None), {}, "", "no such file"),
    ("directory-named-txt", File("folder.txt", "<dir>"), {}, "", "no such file"),
    (
        "chunk-size-0",
        [{"prompt": "chunk-size-0 must be refused"}],
        {"chunk_size": 0},
        "--chunk-size",
        "must be between 1 and 10000 (got 0)",
    ),
    ("chunk-size-20000", [GOOD], {"chunk_size": 20_000}, "--chunk-size", "must be between 1 and 10000 (got 20000)"),
    (
        "chunk-size-minus-1",
        File("prompts.txt", "a red fox\n"),
        {"chunk_size": -1},
        "--chunk-size",
        "must be between 1 and 10000 (got -1)",
    ),
    ("priority-10", [GOOD], {"priority": 10}, "--priority", "must be between 0 and 9 (got 10)"),
    (
        "priority-minus-1",
        File("prompts.txt", "a red fox\n"),
        {"priority": -1},
        "--priority",
        "must be between 0 and 9 (got -1)",
    ),
    (
        "idempotency-key-65",
        [GOOD],
        {"idempotency_key": "k" * 65},
        "--idempotency-key",
        "must be 1-64 printable characters",
    ),
    ("idempotency-key-empty", [GOOD], {"idempotency_key": ""}, "--idempotency-key", "must be 1-64 printable"),
    ("idempotency-key-newline", [GOOD], {"idempotency_key": "key\n"}, "--idempotency-key", "must be 1-64 printable"),
    ("name-nul", [GOOD], {"name": "demo\x00"}, "--name", "control character (U+0000)"),
    # -- what only the API can be given
    ("api-row-42", ["a red fox", 42], {}, "2", "a row must be a string or a mapping (got int)"),
    ("api-row-none", [GOOD, None], {}, "2", "a row must be a string or a mapping (got NoneType)"),
    ("api-rows-42", 42, {}, "", "rows must be a file path or an iterable of prompts and mappings (got int)"),
    ("api-rows-none", None, {}, "", "rows must be a file path or an iterable of prompts and mappings (got NoneType)"),
    ("api-rows-dict", {"prompt": "a"}, {}, "", "rows must be a file path or an iterable"),
    ("priority-string", [GOOD], {"priority": "5"}, "--priority", "must be between 0 and 9 (got 5)"),
    ("priority-bool", [GOOD], {"priority": True}, "--priority", "must be between 0 and 9 (got True)"),
    (
        "api-unpaired-surrogate-prompt",
        ["a red fox", "a \ud800 owl"],
        {},
        "2:prompt",
        "contains an unpaired surrogate (U+D800)",
    ),
    (
        "api-unpaired-surrogate-metadata",
        [{"prompt": "a", "note": "x\udfff"}],
        {},
        "1:note",
        "contains an unpaired surrogate (U+DFFF)",
    ),
    (
        "jsonl-unpaired-surrogate-escape",
        File("rows.jsonl", '{"prompt": "a \\ud800 owl"}\n'),
        {},
        "1:prompt",
        "contains an unpaired surrogate (U+D800)",
    ),
    ("api-metadata-int-key", [{"prompt": "a", 1: "x"}], {}, "1:1", "keys must be strings (got int)"),
    ("api-metadata-set", [{"prompt": "a", "tags": {"x", "y"}}], {}, "1:tags", "must be JSON data (got set)"),
    ("api-metadata-bytes", [{"prompt": "a", "raw": b"\x00"}], {}, "1:raw", "must be JSON data (got bytes)"),
    (
        "api-misspelt-key",
        ["a red fox", {"prompt": "a blue owl", "seeds": 7}],
        {},
        "2:seeds",
        "is not a job field; did you mean 'seed'?",
    ),
    ("api-prompt-10001-chars", ["x" * 10_001], {}, "1:prompt", "is 10001 characters long; at most 10000"),
    (
        "api-good-rows-then-bad-last",
        [f"prompt {i}" for i in range(50)] + [{"prompt": "last", "width": 4096}],
        {},
        "51:width",
        "must be between 8 and 2048 (got 4096)",
    ),
]


def _api_input(case_input, tmp_path: Path):
    """The `rows` argument for lcmq.submit, and the source its errors name."""
    if not isinstance(case_input, File):
        return case_input, "<rows>"
    path = tmp_path / case_input.name
    if case_input.content == "<dir>":
        path.mkdir()
    elif case_input.content is not None:
        _write(tmp_path, case_input.name, case_input.content)
    return (str(path) if case_input.as_str else path), str(path)


@pytest.mark.parametrize(
    ("case_input", "kwargs", "where", "phrase"),
    [pytest.param(*case[1:5], id=case[0], marks=case[5] if len(case) > 5 else ()) for case in API_CASES],
)
def test_api_rejects_hostile_input_and_leaves_nothing_behind(
    services_env, snapshot, tmp_path, case_input, kwargs, where, phrase
):
    import lcmq
    from lcmq.errors import InputError

    rows, source = _api_input(case_input, tmp_path)
    before = snapshot()
    with pytest.raises(InputError) as info:
        lcmq.submit(rows, **({"model": "tiny"} | kwargs))
    message = str(info.value)
    prefix = f"{source}:{where}: " if where else f"{source}: "
    assert message.startswith(prefix), message
    assert phrase in message, message
    assert snapshot() == before


def test_api_table_is_hostile_enough():
    """The table above keeps its breadth: edits that drop cases show here."""
    ids = [case[0] for case in API_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 30
