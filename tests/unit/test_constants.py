"""Names both sides must agree on are spelled once: the LCM-LoRA's adapter name and the queue a
profile's jobs travel on (a second spelling drifts, and a worker then listens to nothing)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("lcmq", "scheduler", "worker", "bench")


def string_literals(text: str) -> list[str]:
    """Every plain string constant, and the literal parts of every f-string."""
    return [
        node.value
        for node in ast.walk(ast.parse(text))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    ]


@pytest.mark.parametrize("literal, home", [("lcm", "lcmq/loras.py"), ("render.", "lcmq/profiles.py")])
def test_shared_names_are_spelled_once(literal, home):
    spelled = sorted(
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in (ROOT / package).rglob("*.py")
        for value in string_literals(path.read_text(encoding="utf-8"))
        if value == literal
    )
    assert spelled == [home]
