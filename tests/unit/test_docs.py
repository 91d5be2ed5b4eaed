"""The README and docs/ against the real `--help`: drift between them fails the suite.

Every `lcmq COMMAND --flag` the docs show (in code spans and code blocks) must be a command whose
`--help` lists that flag, and every command and flag `--help` lists must be in docs/cli.md.
"""

from __future__ import annotations

import contextlib
import io
import re
from functools import cache
from pathlib import Path

import pytest

from lcmq.cli import main

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
REFERENCE = ROOT / "docs" / "cli.md"

FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")
COMMAND = re.compile(r"(?<![\w.])lcmq\s+([a-z][a-z-]*)(?:\s+([a-z][a-z-]*))?")
CODE_SPAN = re.compile(r"`([^`\n]+)`")
ENV_PREFIX = re.compile(r"^(?:[A-Z_]+=\S*\s+)+")


@cache
def help_text(*words: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exited:
        main([*words, "--help"])
    assert exited.value.code == 0, words
    return out.getvalue()


def choices(*words: str) -> list[str]:
    """The subcommands `lcmq WORDS --help` lists in its `{a,b,c}` usage group."""
    found = re.search(r"(?<![a-z0-9] )\{([a-z,-]+)\}", help_text(*words))  # not an option's choices
    return found.group(1).split(",") if found else []


def commands() -> list[tuple[str, ...]]:
    out = []
    for name in choices():
        subs = choices(name)
        out.extend([(name, sub) for sub in subs] if subs else [(name,)])
    return out


def code_texts(path: Path) -> list[tuple[int, str]]:
    """(line number, text) of each code span and each command of the code blocks.

    A code-block line that starts with whitespace continues the command above it (the usage
    blocks wrap their flags)."""
    texts: list[tuple[int, str]] = []
    in_block = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            code = line.split("#")[0] if " #" in line else line
            if code[:1].isspace() and texts and texts[-1][1].lstrip().startswith("lcmq") and code.strip()[:1] in "[-":
                texts[-1] = (texts[-1][0], texts[-1][1] + " " + code.strip())
            else:
                texts.append((number, code))
        else:
            texts.extend((number, span) for span in CODE_SPAN.findall(line))
    return texts


@cache
def code_block_lines(path: Path) -> frozenset[int]:
    lines, in_block = set(), False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
        elif in_block:
            lines.add(number)
    return frozenset(lines)


def in_code_block(path: Path, line: int) -> bool:
    """In a code block only a line that starts with `lcmq` is a command (the rest is prose,
    output or a diagram); a code span in the text is a command wherever `lcmq` appears."""
    return line in code_block_lines(path)


def shown_commands() -> list[tuple[str, int, tuple[str, ...], list[str]]]:
    """(file, line, command words, flags) for each `lcmq …` the docs show."""
    known = {words[0] for words in commands()}
    shown = []
    for path in DOCS:
        for number, text in code_texts(path):
            for part in re.split(r"\s\|\s", text):
                part = ENV_PREFIX.sub("", part.strip())
                match = COMMAND.match(part) if in_code_block(path, number) else COMMAND.search(part)
                if not match:
                    continue
                name, sub = match.group(1), match.group(2)
                if name not in known:
                    shown.append((path.name, number, (name,), []))
                    continue
                words = (name, sub) if sub and sub in choices(name) else (name,)
                shown.append((path.name, number, words, FLAG.findall(part[match.end() :])))
    return shown


def test_the_docs_show_commands():
    assert len(shown_commands()) > 50


@pytest.mark.parametrize(
    "where, line, words, flags", shown_commands(), ids=lambda value: value if isinstance(value, str) else None
)
def test_every_command_and_flag_the_docs_show_is_in_its_help(where, line, words, flags):
    assert words[0] in choices(), f"{where}:{line}: `lcmq {words[0]}` is not a command"
    text = help_text(*words)
    missing = [flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", text)]
    assert not missing, f"{where}:{line}: `lcmq {' '.join(words)}` has no {missing} in its --help"


@pytest.mark.parametrize("words", commands(), ids=" ".join)
def test_the_reference_documents_every_command_and_flag(words):
    reference = REFERENCE.read_text(encoding="utf-8")
    named = rf"(lcmq\s+{' '.join(words)}|\|\s+{words[-1]}|`{words[-1]})\b"
    assert re.search(named, reference), f"docs/cli.md does not name `lcmq {' '.join(words)}`"
    flags = set(FLAG.findall(help_text(*words))) - {"--help"}
    missing = sorted(flag for flag in flags if not re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", reference))
    assert not missing, f"docs/cli.md does not mention {missing} of `lcmq {' '.join(words)}`"


def test_the_readme_stays_a_guide():
    assert len((ROOT / "README.md").read_text(encoding="utf-8").splitlines()) <= 250
