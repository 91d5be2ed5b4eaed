"""One error tree: every exception lcmq defines is an LcmqError, and the CLI maps the tree (and
anything else that reaches it) to one line and an exit code by exception class."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import lcmq
from lcmq.cli import EXIT_FAILED, EXIT_NOT_FOUND, EXIT_USAGE, report_error
from lcmq.errors import (
    InputError,
    LcmqError,
    MissingObjectError,
    NotFoundError,
    PermanentError,
    StorageError,
    TransientError,
)
from lcmq.export import ExportError


def _exception_classes(package) -> list[type]:
    found = []
    for module_info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
        if module_info.name.endswith(".__main__"):  # importing it runs the command
            continue
        module = importlib.import_module(module_info.name)
        found += [
            cls
            for _, cls in inspect.getmembers(module, inspect.isclass)
            if issubclass(cls, BaseException) and cls.__module__ == module.__name__
        ]
    return found


def test_every_lcmq_exception_is_permanent_or_transient():
    classes = _exception_classes(lcmq)
    assert {cls.__name__ for cls in classes} >= {"LoraProblem", "ExportError", "FieldProblem", "MissingObjectError"}
    outside = [
        cls.__qualname__
        for cls in classes
        if cls not in (LcmqError, PermanentError, TransientError)
        and not issubclass(cls, (PermanentError, TransientError))
    ]
    assert outside == []


@pytest.mark.parametrize(
    ("error", "code", "message"),
    [
        (InputError("rows.csv", 3, "seed", "must be an integer"), EXIT_USAGE, "rows.csv:3:seed: must be an integer"),
        (NotFoundError("no batch 'x'"), EXIT_NOT_FOUND, "no batch 'x'"),
        (ExportError("file:///r/b/000001.png: missing"), EXIT_FAILED, "file:///r/b/000001.png: missing"),
        (MissingObjectError("no such object /r/b"), EXIT_FAILED, "no such object /r/b"),
        (StorageError("s3 put: timeout"), EXIT_FAILED, "s3 put: timeout"),
        (PermissionError(13, "Permission denied", "/data/rows.csv"), EXIT_FAILED, "/data/rows.csv: Permission denied"),
        (RuntimeError("boom"), EXIT_FAILED, "unexpected RuntimeError: boom (LCMQ_LOG_LEVEL=DEBUG shows where)"),
    ],
)
def test_errors_become_one_line_and_an_exit_code(error, code, message, embedded_env, capsys):
    assert report_error(error) == code
    assert capsys.readouterr().err == f"lcmq: error: {message}\n"


def test_debug_shows_the_traceback(embedded_env, monkeypatch, capsys):
    from lcmq.settings import reset_settings

    monkeypatch.setenv("LCMQ_LOG_LEVEL", "DEBUG")
    reset_settings()
    try:
        raise RuntimeError("boom")
    except RuntimeError as exc:
        assert report_error(exc) == EXIT_FAILED
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and err.endswith("lcmq: error: unexpected RuntimeError: boom\n")


@pytest.mark.parametrize("content", ["{not json", "[1, 2]"])
def test_a_broken_model_index_is_a_profile_error(tmp_path, content):
    from lcmq.errors import ProfileError
    from lcmq.profiles import load_profiles, preflight

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model_index.json").write_text(content)
    (tmp_path / "lcmq.toml").write_text(f'[profiles.mine]\nfamily = "sd15"\nbase = "{tmp_path}/model"\n')
    with pytest.raises(ProfileError, match=r"profile 'mine': base .*/model: model_index.json cannot be read"):
        preflight(load_profiles(tmp_path / "lcmq.toml")["mine"])
