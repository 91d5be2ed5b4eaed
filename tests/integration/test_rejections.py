"""Bad input is refused whole: exit code 2, an error naming file:line:field, and nothing written.

The CLI runs as a real subprocess against Postgres and Redis; after each refusal the `batches`
and `jobs` tables and the broker's Redis database are exactly as they were.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.services


@pytest.fixture
def snapshot(services_env):
    """A callable returning what a submit would change: table row counts and broker keys."""
    import redis
    from sqlalchemy import create_engine, text

    from lcmq.repository import normalize_url

    engine = create_engine(normalize_url(services_env["LCMQ_DATABASE_URL"]))
    broker = redis.Redis.from_url(services_env["LCMQ_BROKER_URL"])

    def take() -> dict:
        with engine.connect() as conn:
            rows = {t: conn.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in ("batches", "jobs")}
        # With batch priorities on, Redis keeps one list per priority step: render.tiny<sep><n>.
        waiting = sum(broker.llen(key) for key in broker.keys("render.tiny*") if broker.type(key) == b"list")
        return {"rows": rows, "keys": sorted(broker.keys("*")), "render.tiny": waiting}

    yield take
    engine.dispose()
    broker.close()


def _write(tmp_path: Path, name: str, content: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# (id, file name, content, extra CLI args, where ("LINE:FIELD", "LINE", "--FLAG", "model"), phrase)
CASES = [
    ("unknown-model", "prompts.txt", "a red fox\n", ["--model", "no-such-model"], "model",
     "unknown model profile 'no-such-model'"),
    ("steps-9-flag", "prompts.txt", "a red fox\n", ["--model", "tiny", "--steps", "9"], "--steps",
     "must be between 1 and 8 (got 9)"),
    ("steps-9-row", "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b", "steps": 9}\n', ["--model", "tiny"],
     "2:steps", "must be between 1 and 8"),
    ("guidance-2.5-row", "rows.jsonl", '{"prompt": "a", "guidance": 2.5}\n', ["--model", "tiny"],
     "1:guidance", "must be between 1 and 2"),
    ("guidance-2.5-flag", "prompts.txt", "a red fox\n", ["--model", "tiny", "--guidance", "2.5"], "--guidance",
     "must be between 1 and 2"),
    ("width-100-csv", "rows.csv", "prompt,width\na,64\nb,100\n", ["--model", "tiny"], "3:width",
     "multiple of 8"),
    ("width-4096-flag", "prompts.txt", "a red fox\n", ["--model", "tiny", "--width", "4096"], "--width",
     "between 8 and 2048"),
    ("empty-prompt-line-3", "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b"}\n{"prompt": ""}\n',
     ["--model", "tiny"], "3:prompt", "must not be empty"),
    ("malformed-json-line-2", "rows.jsonl", '{"prompt": "a"}\n{"prompt": "b"\n{"prompt": "c"}\n',
     ["--model", "tiny"], "2", "malformed JSON"),
    ("nan-json", "rows.jsonl", '{"prompt": "a", "guidance": NaN}\n', ["--model", "tiny"], "1",
     "NaN is not allowed"),
    ("csv-duplicate-header", "rows.csv", "prompt,seed,seed\na,1,2\n", ["--model", "tiny"], "1:seed",
     "duplicate column"),
    ("non-utf8", "prompts.txt", b"a red fox\nsch\xf6n\n", ["--model", "tiny"], "2", "not valid UTF-8"),
    ("control-character", "prompts.txt", "a red fox\n\n\x1b[31mred\n", ["--model", "tiny"], "3:prompt",
     "control character"),
    ("empty-file", "prompts.txt", "", ["--model", "tiny"], "", "no prompts"),
    ("name-too-long", "prompts.txt", "a red fox\n", ["--model", "tiny", "--name", "n" * 201], "--name",
     "at most 200 characters"),
]


@pytest.mark.parametrize(("name", "content", "args", "where", "phrase"),
                         [pytest.param(*case[1:], id=case[0]) for case in CASES])
def test_cli_rejects_bad_input_and_leaves_nothing_behind(services_env, snapshot, cli, tmp_path,
                                                         name, content, args, where, phrase):
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
    bad = _write(tmp_path, "bad.jsonl", "".join(f'{{"prompt": "p{i}"}}\n' for i in range(50))
                 + '{"prompt": "last", "width": 4096}\n')
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
