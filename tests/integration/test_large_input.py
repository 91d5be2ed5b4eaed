"""A 10^6-line batch file is validated as a stream: a bad row anywhere is refused with its line
number, nothing reaches Postgres or Redis, and validation memory does not grow with the file.

`lcmq.submit` runs in-process against the real services (Postgres, Redis, moto S3).
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import pytest

pytestmark = pytest.mark.services

LINES = 1_000_000
# Traced with tracemalloc, which slows every allocation several times: 200k lines (~7 MB) and a
# 5 MB limit still catch holding the rows (~70 MB) or reading the file whole (~20 MB).
TRACED_LINES = 200_000
PEAK_LIMIT = 5 * 1024 * 1024


def _write_big(path: Path, line, bad_at: int, bad: str, lines: int = LINES) -> Path:
    """`lines` lines from `line(i)` (1-based), line `bad_at` replaced by `bad`; one write."""
    body = "".join(bad if i == bad_at else line(i) for i in range(1, lines + 1))
    path.write_text(body, encoding="utf-8")
    return path


def test_last_line_bad_is_refused_in_bounded_memory(services_env, snapshot, tmp_path):
    import lcmq
    from lcmq.errors import InputError

    path = _write_big(
        tmp_path / "big.txt",
        lambda i: f"a lighthouse at dusk, variation {i}\n",
        TRACED_LINES,
        "a lighthouse \x00 at dusk\n",
        lines=TRACED_LINES,
    )
    assert path.stat().st_size > 6_000_000

    # Warm up outside the trace: imports (scheduler, celery), settings and profiles are
    # allocated once per process and are not what this test measures.
    warm = tmp_path / "warm.txt"
    warm.write_text("a red fox\n\x00\n")
    with pytest.raises(InputError):
        lcmq.submit(warm, model="tiny")

    # Rows are validated as they stream into one transaction; what publishing needs is kept as
    # runs of row indexes per render shape (one run for this file), as for a 10^7-line one.
    before = snapshot()
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(InputError) as info:
            lcmq.submit(path, model="tiny")
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    assert str(info.value).startswith(f"{path}:{TRACED_LINES}:prompt: "), str(info.value)
    assert "control character (U+0000)" in str(info.value)
    assert snapshot() == before
    assert peak < PEAK_LIMIT, f"peak traced memory {peak / 2**20:.1f} MiB while validating ({elapsed:.1f}s)"
    print(f"\n{TRACED_LINES}-line .txt, bad last line: {elapsed:.1f}s under tracemalloc, peak {peak / 2**20:.2f} MiB")


def test_bad_line_in_the_middle_of_a_million_is_named(services_env, snapshot, tmp_path):
    import lcmq
    from lcmq.errors import InputError

    middle = LINES // 2
    path = _write_big(
        tmp_path / "big.jsonl",
        lambda i: f'{{"prompt": "a lighthouse at dusk", "seed": {i}}}\n',
        middle,
        '{"prompt": "a lighthouse at dusk", "steps": 9}\n',
    )

    before = snapshot()
    started = time.perf_counter()
    with pytest.raises(InputError) as info:
        lcmq.submit(path, model="tiny")
    elapsed = time.perf_counter() - started

    assert str(info.value).startswith(f"{path}:{middle}:steps: "), str(info.value)
    assert "must be between 1 and 8 (got 9)" in str(info.value)
    assert snapshot() == before
    print(f"\n10^6-line .jsonl, bad line {middle}: refused after {elapsed:.1f}s")
