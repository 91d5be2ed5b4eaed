"""Sweeps: axes that multiply every row of a batch into cells (`--matrix seed=0..3`).

An axis is a job field (`seed`, `steps`, `guidance`), a style LoRA's weight (`lora_weight` for
the one style LoRA of a job's set, `lora_weight.NAME` for the one named NAME), a control's scale
(`control_scale` for every control of a job, `control_scale.NAME` for the one named NAME), or a text field
that fills `{name}` in the row's prompt and negative prompt. Cells are the product of the axes in the order given; cells
of one row that come out identical (a repeated value, or a text field the prompt never uses)
collapse to one job. Each job keeps its axis values in its metadata under `matrix`, so the
manifest says which cell every image is. Cells of one row share the row's seed unless `seed` is
an axis: a sweep over steps compares like with like.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

from lcmq.controls import MAX_SCALE, ControlProblem, control_key, with_scale
from lcmq.errors import InputError
from lcmq.loras import MAX_WEIGHT, lora_key
from lcmq.spec import FieldProblem, JobSpec, check_field, parse_number

# Job fields an axis may set, and the style-LoRA weight axis (alone, or `lora_weight.NAME`).
FIELD_AXES = ("seed", "steps", "guidance")
LORA_WEIGHT = "lora_weight"
CONTROL_SCALE = "control_scale"
MATRIX_KEY = "matrix"  # the metadata key that holds a job's axis values
MAX_CELLS = 10_000  # per row: a typo like seed=0..99999999 is refused, not enqueued
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$|^(lora_weight|control_scale)\.[A-Za-z_][A-Za-z0-9_]{0,63}$")
_RANGE = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")

Matrix = tuple[tuple[str, tuple[Any, ...]], ...]


def parse_axis(text: str, source: str = "<matrix>") -> tuple[str, list[str]]:
    """`name=a,b,c` or `name=lo..hi` (integers, inclusive) from the command line."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise InputError(source, None, "--matrix", f"expected NAME=VALUES (got {text!r})")
    if match := _RANGE.match(values):
        low, high = int(match[1]), int(match[2])
        if high < low:
            raise InputError(source, None, f"--matrix {name}", f"empty range {low}..{high}")
        if high - low >= MAX_CELLS:
            raise InputError(source, None, f"--matrix {name}", f"range {low}..{high} has more than {MAX_CELLS} values")
        return name, [str(v) for v in range(low, high + 1)]
    return name, [v.strip() for v in values.split(",")]


def check_matrix(
    axes: Mapping[str, Sequence[Any]] | Iterable[tuple[str, Sequence[Any]]] | None, source: str = "<matrix>"
) -> Matrix:
    """Validated axes in their given order; a bad name or value names the axis. Values may be
    given as text (the command line): "4" is a step count, "1.5" a guidance."""
    if not axes:
        return ()
    items = list(axes.items() if isinstance(axes, Mapping) else axes)
    checked: list[tuple[str, tuple[Any, ...]]] = []
    cells = 1
    for name, values in items:
        where = f"--matrix {name}"
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError(source, None, "--matrix", f"axis name must be an identifier (got {name!r})")
        if name in (n for n, _ in checked):
            raise InputError(source, None, where, "axis given twice")
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise InputError(source, None, where, "needs at least one value")
        checked.append((name, tuple(_check_value(name, value, source, where) for value in values)))
        cells *= len(values)
        if cells > MAX_CELLS:
            raise InputError(source, None, where, f"the matrix has more than {MAX_CELLS} cells per row")
    return tuple(checked)


def _is_lora_axis(name: str) -> bool:
    return name == LORA_WEIGHT or name.startswith(LORA_WEIGHT + ".")


def _is_control_axis(name: str) -> bool:
    return name == CONTROL_SCALE or name.startswith(CONTROL_SCALE + ".")


def _control_scale(value: Any) -> float:
    scale = parse_number(value, from_text=True)
    if not 0 <= scale <= MAX_SCALE:
        raise FieldProblem(f"must be between 0 and {MAX_SCALE:g} (got {scale:g})")
    return scale


def _lora_weight(value: Any) -> float:
    weight = parse_number(value, from_text=True)
    if not -MAX_WEIGHT <= weight <= MAX_WEIGHT:
        raise FieldProblem(f"must be between {-MAX_WEIGHT:g} and {MAX_WEIGHT:g} (got {weight:g})")
    return weight


def _check_value(name: str, value: Any, source: str, where: str) -> Any:
    try:
        if name in FIELD_AXES:
            return check_field(name, value, from_text=True)
        if _is_lora_axis(name):
            return _lora_weight(value)
        if _is_control_axis(name):
            return _control_scale(value)
        if not isinstance(value, str) or not value.strip():
            raise FieldProblem(f"values must be non-empty text (got {value!r})")
        return check_field("negative_prompt", value, from_text=True)  # text: no control characters
    except FieldProblem as exc:
        raise InputError(source, None, where, str(exc)) from None


def expand(specs: Iterable[JobSpec], matrix: Matrix, source: str) -> Iterator[JobSpec]:
    """Every row times every cell, renumbered; identical cells of a row collapse to one job."""
    if not matrix:
        yield from specs
        return
    names = [name for name, _ in matrix]
    unused = {
        name for name in names if name not in FIELD_AXES and not _is_lora_axis(name) and not _is_control_axis(name)
    }  # text axes unused yet
    index = 0
    for row, spec in enumerate(specs):
        # A text axis this row's prompts do not use changes nothing in it: not part of its cells.
        unused_here = {name for name in names if not _axis_used(name, spec)}
        unused &= unused_here
        if MATRIX_KEY in spec.metadata:
            raise InputError(
                source,
                None,
                MATRIX_KEY,
                f"row {row + 1}: the column {MATRIX_KEY!r} is reserved for the axis values with --matrix",
            )
        seen: set[tuple] = set()
        for cell in itertools.product(*(values for _, values in matrix)):
            values = dict(zip(names, cell, strict=False))
            job = _apply(spec, values, source, row)
            identity = (
                job.prompt,
                job.negative_prompt,
                job.seed,
                job.steps,
                job.guidance,
                lora_key(job.loras),
                control_key(job.control),
            )
            if identity in seen:
                continue
            seen.add(identity)
            axis_values = {name: value for name, value in values.items() if name not in unused_here}
            yield replace(
                job,
                index=index,
                row=row if spec.row is None else spec.row,
                metadata=spec.metadata | {MATRIX_KEY: axis_values},
            )
            index += 1
    if unused:  # a typo ({Style} for style) would otherwise collapse silently: refuse the batch
        name = sorted(unused)[0]
        raise InputError(
            source,
            None,
            f"--matrix {name}",
            f"no prompt uses {{{name}}}, and {name!r} is not a job field ({', '.join(FIELD_AXES)})",
        )


def _axis_used(name: str, spec: JobSpec) -> bool:
    """Whether an axis can change a job of this row: a field or LoRA weight always; a text axis
    when the row's prompt or negative prompt has its `{name}`."""
    if name in FIELD_AXES or _is_lora_axis(name) or _is_control_axis(name):
        return True
    placeholder = "{" + name + "}"
    return placeholder in spec.prompt or placeholder in spec.negative_prompt


def _apply(spec: JobSpec, values: dict[str, Any], source: str, row: int) -> JobSpec:
    prompt, negative = spec.prompt, spec.negative_prompt
    fields: dict[str, Any] = {}
    for name, value in values.items():
        if name in FIELD_AXES:
            fields[name] = value
        elif _is_lora_axis(name):
            fields["loras"] = _with_weight(fields.get("loras", spec.loras), name, value, source, row)
        elif _is_control_axis(name):
            controls = fields.get("control", spec.control)
            if not controls:
                raise InputError(source, None, f"--matrix {name}", f"row {row + 1}: it has no control to scale")
            try:
                fields["control"] = with_scale(controls, name.partition(".")[2] or None, value)
            except ControlProblem as exc:
                raise InputError(source, None, f"--matrix {name}", f"row {row + 1}: {exc}") from None
        else:
            prompt = prompt.replace("{" + name + "}", value)
            negative = negative.replace("{" + name + "}", value)
    return replace(spec, prompt=prompt, negative_prompt=negative, **fields)


def _with_weight(
    loras: tuple[dict[str, Any], ...], axis: str, weight: float, source: str, row: int
) -> tuple[dict[str, Any], ...]:
    """The job's LoRA set with one style's weight set by the axis."""
    target = axis.partition(".")[2]
    names = [entry["name"] for entry in loras]
    if target and target not in names:
        raise InputError(
            source,
            None,
            f"--matrix {axis}",
            f"row {row + 1}: its LoRA set has no {target!r} (it has {', '.join(names) or 'none'})",
        )
    if not target and len(loras) != 1:
        raise InputError(
            source,
            None,
            f"--matrix {axis}",
            f"row {row + 1}: lora_weight needs exactly one style LoRA in the job's set (it has "
            f"{len(loras)}); name one with lora_weight.NAME",
        )
    target = target or names[0]
    return tuple(entry | {"weight": weight} if entry["name"] == target else entry for entry in loras)
