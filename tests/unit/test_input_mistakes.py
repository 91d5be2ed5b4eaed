"""Input mistakes without services: relative init images, misspelt keys and columns, long prompts,
unreadable init images, unused matrix text axes, and the spec's names other modules may use."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
from PIL import Image

import lcmq.spec
from lcmq.errors import InputError
from lcmq.matrix import check_matrix, expand
from lcmq.profiles import BUILTIN_PROFILES
from lcmq.settings import get_settings, reset_settings
from lcmq.spec import BatchOptions, RowValidator, near_field, read_rows, validate_rows

TINY = BUILTIN_PROFILES["tiny"]
ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, content: str) -> Path:
    path.write_text(content)
    return path


def load(path: Path, base_dir: Path | None = None, **validator_options):
    validator = RowValidator(BatchOptions(model="tiny"), TINY, str(path), base_dir=base_dir, **validator_options)
    return validate_rows(read_rows(path), validator, from_text=path.suffix == ".csv")


def refusal(path: Path, **validator_options) -> str:
    with pytest.raises(InputError) as info:
        load(path, **validator_options)
    return str(info.value)


# --- a relative init image next to a batch file named relative to the working directory ---------


def test_relative_init_image_of_a_relative_batch_file_is_an_absolute_url(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (8, 8)).save("init.png")
    rows = write(Path("rows.jsonl"), '{"prompt": "a fox", "init_image": "init.png"}\n')
    (spec,) = load(rows, base_dir=rows.parent)  # what `lcmq submit rows.jsonl` passes: Path(".")
    assert spec.init_image == (tmp_path / "init.png").as_uri()
    assert spec.upload_init


@pytest.mark.parametrize(
    ("reference", "phrase"),
    [
        ("~no-such-user-here/init.png", "no such file"),  # Path.expanduser raised RuntimeError
        (".", "no such file"),  # a folder is no image file: its upload would fail with IsADirectoryError
    ],
)
def test_init_image_that_is_no_file_is_an_input_error(tmp_path, reference, phrase):
    rows = write(tmp_path / "rows.jsonl", f'{{"prompt": "a fox", "init_image": "{reference}"}}\n')
    message = refusal(rows)
    assert message.startswith(f"{rows}:1:init_image: ") and phrase in message


def test_a_file_that_is_no_image_fails_its_job_naming_the_file(tmp_path):
    from worker.img2img import InitImageError, load_init_image

    notes = write(tmp_path / "notes.txt", "not an image\n")
    with pytest.raises(InitImageError) as info:
        load_init_image(notes.as_uri(), 64, 64, get_settings())
    assert notes.as_uri() in str(info.value) and "not a readable image" in str(info.value)
    assert "BytesIO" not in str(info.value)


# --- keys and columns one edit away from a job field ---------------------------------------------


@pytest.mark.parametrize(
    ("key", "field"),
    [
        ("stepz", "steps"),
        ("Prompt", "prompt"),
        ("negative-prompt", "negative_prompt"),
        ("seeds", "seed"),
        ("step", "steps"),
        ("guidence", "guidance"),
        ("widht", "width"),
        ("init-image", "init_image"),
        ("STRENGTH", "strength"),
        ("lora", "loras"),
        ("negativeprompt", "negative_prompt"),
    ],
)
def test_a_key_one_edit_from_a_field_is_refused_with_did_you_mean(tmp_path, key, field):
    rows = write(tmp_path / "rows.jsonl", f'{{"prompt": "a"}}\n{{"prompt": "b", "{key}": "4"}}\n')
    message = refusal(rows)
    assert message.startswith(f"{rows}:2:{key}: is not a job field; did you mean {field!r}?"), message


@pytest.mark.parametrize("key", ["sku", "note", "tags", "style", "source", "id", "category", "stage", "matrix"])
def test_a_deliberate_extra_key_stays_metadata(tmp_path, key):
    assert near_field(key) is None
    rows = write(tmp_path / "rows.jsonl", f'{{"prompt": "a", "{key}": "x"}}\n')
    (spec,) = load(rows)
    assert spec.metadata == {key: "x"}


def test_a_csv_column_one_edit_from_a_field_is_refused_at_the_header(tmp_path):
    rows = write(tmp_path / "rows.csv", "prompt,seeds,sku\na,1,x\nb,2,y\n")
    assert refusal(rows).startswith(f"{rows}:1:seeds: is not a job field; did you mean 'seed'?")


@pytest.mark.parametrize(
    ("header", "phrase"),
    [
        ("Prompt,seed", "header has no 'prompt' column, but a 'Prompt' one"),
        ("prompt;seed", "looks semicolon-separated"),
        ("prompt\tseed", "looks tab-separated"),
        ("text,seed", "header has no 'prompt' column"),
    ],
)
def test_a_csv_header_without_prompt_says_what_it_has_instead(tmp_path, header, phrase):
    rows = write(tmp_path / "rows.csv", f"{header}\na fox,1\n")
    message = refusal(rows)
    assert message.startswith(f"{rows}:1:prompt: ") and phrase in message, message


def test_keys_are_checked_once_per_distinct_key_not_per_row(tmp_path, monkeypatch):
    """The check costs nothing per row: 10^5 rows with the same keys look at each key once."""
    looked_at: list[str] = []
    real_near_field = lcmq.spec.near_field

    def counting_near_field(key):
        looked_at.append(key)
        return real_near_field(key)

    monkeypatch.setattr(lcmq.spec, "near_field", counting_near_field)
    rows = write(
        tmp_path / "rows.jsonl",
        "".join(f'{{"prompt": "p{i}", "sku": "{i}"}}\n' for i in range(500))
        + '{"prompt": "last", "sku": "z", "note": "new key"}\n',
    )
    assert len(load(rows)) == 501
    assert sorted(looked_at) == ["note", "prompt", "sku"]


# --- prompt length ------------------------------------------------------------------------------


@pytest.fixture
def max_prompt_chars(monkeypatch):
    def set_limit(limit: int | None) -> None:
        if limit is None:
            monkeypatch.delenv("LCMQ_MAX_PROMPT_CHARS", raising=False)
        else:
            monkeypatch.setenv("LCMQ_MAX_PROMPT_CHARS", str(limit))
        reset_settings()

    yield set_limit
    monkeypatch.undo()
    reset_settings()


def test_a_prompt_over_the_default_10000_characters_is_refused_with_its_line(tmp_path, max_prompt_chars):
    max_prompt_chars(None)
    rows = write(tmp_path / "prompts.txt", "a fox\n" + "x" * 10_000 + "\n" + "y" * 10_001 + "\n")
    message = refusal(rows)
    assert message.startswith(f"{rows}:3:prompt: is 10001 characters long; at most 10000"), message


def test_the_prompt_limit_is_a_setting_and_holds_for_negative_prompts(tmp_path, max_prompt_chars):
    max_prompt_chars(20)
    rows = write(tmp_path / "rows.jsonl", '{"prompt": "a fox", "negative_prompt": "blurry, dark, grainy, low"}\n')
    assert refusal(rows).startswith(f"{rows}:1:negative_prompt: is 25 characters long; at most 20")
    with pytest.raises(InputError) as info:
        RowValidator(BatchOptions(model="tiny", negative_prompt="n" * 21), TINY, "rows.txt")
    assert str(info.value).startswith("rows.txt:--negative-prompt: is 21 characters long")


# --- the matrix's metadata ------------------------------------------------------------------------


def test_a_text_axis_a_row_does_not_use_is_not_in_that_rows_matrix_metadata(tmp_path):
    rows = write(tmp_path / "rows.jsonl", '{"prompt": "a fox, {style}"}\n{"prompt": "a plain owl"}\n')
    matrix = check_matrix({"style": ["oil", "ink"], "steps": [2, 4]})
    jobs = list(expand(load(rows), matrix, str(rows)))
    assert [(job.prompt, job.metadata["matrix"]) for job in jobs] == [
        ("a fox, oil", {"style": "oil", "steps": 2}),
        ("a fox, oil", {"style": "oil", "steps": 4}),
        ("a fox, ink", {"style": "ink", "steps": 2}),
        ("a fox, ink", {"style": "ink", "steps": 4}),
        ("a plain owl", {"steps": 2}),
        ("a plain owl", {"steps": 4}),
    ]


# --- the spec's names ------------------------------------------------------------------------------


def _python_files():
    for package in ("lcmq", "scheduler", "worker", "tests", "bench"):
        yield from (ROOT / package).rglob("*.py")


def test_no_module_imports_a_private_name_of_the_spec():
    found = []
    for path in _python_files():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "lcmq.spec":
                found += [f"{path.relative_to(ROOT)}: {a.name}" for a in node.names if a.name.startswith("_")]
            elif (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id == "spec"
            ):
                found.append(f"{path.relative_to(ROOT)}: spec.{node.attr}")
    assert found == []


@pytest.mark.parametrize("constant", ["MAX_SIDE", "SEED_BITS"])
def test_shared_limits_are_defined_once_in_the_spec(constant):
    defined = [
        str(path.relative_to(ROOT))
        for path in _python_files()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == constant for t in node.targets)
    ]
    assert defined == ["lcmq/spec.py"]


def test_an_init_image_gone_by_its_upload_is_an_input_error_naming_it(tmp_path):
    """Validated, then unreadable or removed before the producer uploads it: no OSError traceback."""
    from lcmq.storage import FileStorage
    from scheduler.inputs import InputUploads

    uploads = InputUploads(FileStorage(tmp_path / "renders"), "b1")
    gone = tmp_path / "gone.png"
    with pytest.raises(InputError) as info:
        uploads.url_for(gone.as_uri())
    assert str(info.value).startswith(f"{gone}:init_image: cannot read the file: ")


def test_an_init_image_name_with_a_space_is_uploaded_from_its_file(tmp_path):
    """The URL the validator makes must lead the uploader back to the file (as_uri made %20)."""
    from lcmq.storage import FileStorage, file_sha256
    from scheduler.inputs import InputUploads

    Image.new("RGB", (8, 8)).save(tmp_path / "my photo.png")
    rows = write(tmp_path / "rows.jsonl", '{"prompt": "a fox", "init_image": "my photo.png"}\n')
    (spec,) = load(rows, base_dir=tmp_path)
    uploads = InputUploads(FileStorage(tmp_path / "renders"), "b1")
    stored = uploads.url_for(spec.init_image)
    uploads.upload()  # staging names the object; the write phase stores it
    assert file_sha256(Path(stored.removeprefix("file://"))) == file_sha256(tmp_path / "my photo.png")


def test_a_lora_path_under_an_unknown_home_is_an_input_error(tmp_path):
    rows = write(
        tmp_path / "rows.jsonl",
        '{"prompt": "a", "loras": [{"name": "ink", "path": "~no-such-user-here/ink.safetensors"}]}\n',
    )
    message = refusal(rows)
    assert message.startswith(f"{rows}:1:loras: ") and "no such file" in message
