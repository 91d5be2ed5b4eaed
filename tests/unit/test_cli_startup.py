"""Start-up cost: the package, `lcmq --help` and argument errors load no heavy library."""

from __future__ import annotations

import json
import subprocess
import sys
import time

HEAVY = ("celery", "kombu", "sqlalchemy", "pydantic")


def _heavy_modules_after(code: str) -> list[str]:
    """Run `code` in a fresh interpreter and list the heavy modules it left in sys.modules."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.splitlines()[-1])


def _cli_exit(argv: list[str]) -> str:
    """`lcmq <argv>` through main(), in-process in a fresh interpreter: the code that imports."""
    return (
        f"from lcmq.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as exc:\n"
        f"    assert exc.code == {0 if '--help' in argv else 2}, exc.code"
    )


def test_importing_the_error_tree_loads_no_heavy_library():
    assert _heavy_modules_after("import lcmq.errors") == []


def test_help_and_argument_errors_load_no_heavy_library():
    assert _heavy_modules_after(_cli_exit(["--help"])) == []
    assert _heavy_modules_after(_cli_exit(["submit", "--help"])) == []
    assert _heavy_modules_after(_cli_exit(["submit", "prompts.txt"])) == []  # --model missing
    assert _heavy_modules_after(_cli_exit(["no-such-command"])) == []


def test_help_prints_quickly():
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "lcmq", "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0 and "submit" in done.stdout
    assert time.monotonic() - started < 1.5  # ~0.1 s; a full import of the API took ~1 s alone


def test_package_names_still_reach_the_api():
    import lcmq
    from lcmq import api

    assert lcmq.submit is api.submit and lcmq.BatchStatus is api.BatchStatus
    assert set(lcmq.__all__) <= set(dir(lcmq))


def test_job_state_choices_match_the_table_states():
    from lcmq.cli import JOB_STATES
    from lcmq.models import JobState

    assert JOB_STATES == tuple(state.value for state in JobState)
