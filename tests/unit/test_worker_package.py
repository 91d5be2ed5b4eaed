"""The worker package ships no test-only code: the single-file writer lives in tests/support and
the fault suite's crash is a hook it installs, not a branch of the task body."""

from __future__ import annotations

import importlib.util
import inspect

import pytest


def test_test_only_code_is_not_in_the_package():
    import worker.lifecycle
    import worker.tasks

    assert importlib.util.find_spec("worker.single_file") is None
    assert not hasattr(worker.lifecycle, "maybe_crash")
    task_body = inspect.getsource(worker.tasks)
    assert not any(name in task_body for name in ("maybe_crash", "FAULT_KILL", "os.kill", "SIGKILL"))


def test_test_hooks_are_imported_only_when_named(monkeypatch):
    from worker.lifecycle import TEST_HOOKS_ENV, install_test_hooks

    monkeypatch.delenv(TEST_HOOKS_ENV, raising=False)
    install_test_hooks()  # nothing named: nothing imported
    monkeypatch.setenv(TEST_HOOKS_ENV, "no_such_hooks_module")
    with pytest.raises(ModuleNotFoundError):
        install_test_hooks()


def test_the_fault_hook_wraps_the_render_the_render_loop_calls(monkeypatch):
    from support import fault_hooks

    import worker.batch_render

    monkeypatch.setattr(worker.batch_render, "render", worker.batch_render.render)  # undone after the test
    monkeypatch.setenv(fault_hooks.FAULT_KILL_PROMPT_ENV, "POISON")
    fault_hooks.install()
    assert worker.batch_render.render.__name__ == "render_or_crash"
