"""The marked hyperparameter block of train.py: parse it, rewrite one value, and describe it as a schema.

The block is the whole `hparams` action space: the researcher picks one name and a value inside the
range the seed declares. The range check here is the last word even when the server enforced the
schema, because llama.cpp's grammar does not enforce numeric bounds.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from typing import Any

BEGIN = "# --- HYPERPARAMETERS"
END = "# --- END HYPERPARAMETERS ---"

_LINE = re.compile(r"^(?P<name>[A-Z][A-Z0-9_]*)\s*=\s*(?P<value>.+?)\s*#\s*(?P<kind>range|choices):\s*(?P<spec>\[.*\])\s*$")


@dataclass(frozen=True)
class HParam:
    name: str
    value: int | float | str
    kind: str  # int | float | choice
    lo: float | None = None
    hi: float | None = None
    choices: tuple[Any, ...] = ()

    def check(self, value: Any) -> int | float | str:
        """The value as it will be written, or ValueError saying why it is not allowed."""
        if self.kind == "choice":
            if value not in self.choices or type(value) is bool:
                raise ValueError(f"{self.name}: {value!r} is not one of {list(self.choices)}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{self.name}: expected a number, got {value!r}")
        if self.kind == "int":
            if value != int(value):
                raise ValueError(f"{self.name}: expected an integer, got {value!r}")
            value = int(value)
        else:
            value = float(value)
        if not (self.lo <= value <= self.hi):  # NaN fails this too
            raise ValueError(f"{self.name}: {value!r} is outside the range [{self.lo}, {self.hi}]")
        return value


def _block(train_py: str) -> tuple[int, int]:
    """Line indices (begin, end) of the block's markers; ValueError when it is missing or unclosed."""
    lines = train_py.splitlines()
    begin = next((i for i, line in enumerate(lines) if line.startswith(BEGIN)), None)
    if begin is None:
        raise ValueError("train.py has no hyperparameter block (a line starting with '# --- HYPERPARAMETERS')")
    end = next((i for i in range(begin + 1, len(lines)) if lines[i].strip() == END), None)
    if end is None:
        raise ValueError(f"train.py: the hyperparameter block opened on line {begin + 1} is never closed")
    return begin, end


def _spec(text: str, kind: str) -> list[Any]:
    """The bracketed list; `choices` may also list bare words ([cosine, linear]) meaning strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        words = [w.strip() for w in text[1:-1].split(",")]
        if kind != "choices" or not all(re.fullmatch(r"[A-Za-z_][\w.-]*", w) for w in words):
            raise
        return words


def _param(line: str, lineno: int) -> HParam:
    m = _LINE.match(line)
    if not m:
        raise ValueError(f"train.py line {lineno}: not a 'NAME = value  # range|choices: [...]' line: {line!r}")
    try:
        value, spec = ast.literal_eval(m["value"]), _spec(m["spec"], m["kind"])
    except (ValueError, SyntaxError):
        raise ValueError(f"train.py line {lineno}: value or {m['kind']} is not a Python literal: {line!r}") from None
    name = m["name"]
    if m["kind"] == "choices":
        p = HParam(name, value, "choice", choices=tuple(spec))
    else:
        if len(spec) != 2 or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in spec):
            raise ValueError(f"train.py line {lineno}: range must be [lo, hi] numbers: {line!r}")
        kind = "int" if all(isinstance(x, int) for x in (value, *spec)) else "float"
        p = HParam(name, value, kind, lo=spec[0], hi=spec[1])
    p.check(value)  # a seed whose own value is out of range is a broken seed, not a researcher error
    return p


def parse(train_py: str) -> tuple[HParam, ...]:
    begin, end = _block(train_py)
    lines = train_py.splitlines()
    body = [i for i in range(begin + 1, end) if lines[i].strip() and not lines[i].lstrip().startswith("#")]
    params = tuple(_param(lines[i], i + 1) for i in body)
    if not params:
        raise ValueError("train.py: the hyperparameter block declares no parameters")
    return params


def _literal(value: int | float | str) -> str:
    return f'"{value}"' if isinstance(value, str) and '"' not in value else repr(value)


def apply(train_py: str, name: str, value: Any) -> str:
    """train.py with just `name`'s line rewritten; ValueError for an unknown name or a value out of range."""
    params = {p.name: p for p in parse(train_py)}
    if name not in params:
        raise ValueError(f"{name!r} is not a hyperparameter; choose one of {sorted(params)}")
    value = params[name].check(value)
    begin, end = _block(train_py)
    lines = train_py.splitlines(keepends=True)
    for i in range(begin + 1, end):
        m = _LINE.match(lines[i].rstrip("\r\n"))
        if m and m["name"] == name:
            head, tail = lines[i][: m.start("value")], lines[i][m.end("value") :]
            lines[i] = head + _literal(value) + tail
            return "".join(lines)
    raise AssertionError("unreachable: parse() found the name")


def summary(params: tuple[HParam, ...]) -> str:
    """One line per parameter, for the researcher's first message."""
    out = []
    for p in params:
        allowed = f"one of {list(p.choices)}" if p.kind == "choice" else f"{p.kind} in [{p.lo}, {p.hi}]"
        out.append(f"- {p.name} = {p.value!r} ({allowed})")
    return "\n".join(out)


GRID_POINTS = 12  # values per numeric parameter offered to a constrained decoder


def grid(p: HParam) -> list[int | float | str]:
    """The values a constrained decoder may pick for p: its range on a grid, without its current value.

    llama.cpp's grammar cannot enforce numeric bounds, but it can enforce an enum, so numbers are
    offered as a grid: log-spaced when the range spans a decade or more, linear otherwise. The
    current value is left out so that every constrained `set` changes train.py.
    """
    if p.kind == "choice":
        return [c for c in p.choices if c != p.value]
    lo, hi, n = p.lo, p.hi, GRID_POINTS
    values: set[int | float]
    if p.kind == "int" and hi - lo < 2 * n:
        return [v for v in range(int(lo), int(hi) + 1) if v != p.value]
    if p.kind == "int" and lo >= 1 and hi / lo >= 10:  # sizes: powers of two keep shapes divisible
        values = {lo, hi} | {2**k for k in range(math.ceil(math.log2(lo)), math.floor(math.log2(hi)) + 1)}
    elif lo > 0 and hi / lo >= 10:
        values = {float(f"{lo * (hi / lo) ** (i / (n - 1)):.3g}") for i in range(n)}
    else:
        points = [lo + (hi - lo) * i / (n - 1) for i in range(n)]
        values = {round(x) if p.kind == "int" else float(f"{x:.3g}") for x in points}
    values = {min(max(v, lo), hi) for v in values}
    return sorted(values - {p.value})


def schema(params: tuple[HParam, ...], thought_chars: int, *, allow_stop: bool = True) -> dict[str, Any]:
    """The JSON schema of one `hparams` action: one anyOf branch per name with that name's values.

    Every object has additionalProperties false and every string a maxLength, which llama.cpp's
    schema-to-grammar and vLLM's structured outputs both enforce. With allow_stop False only `set`
    is offered (before the first change, when run and finish could only waste the rollout).
    """
    thought = {"type": "string", "maxLength": thought_chars}

    def branch(action: str, extra: dict[str, Any]) -> dict[str, Any]:
        props = {"thought": thought, "action": {"enum": [action]}, **extra}
        return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}

    offers = [(p, values) for p in params if (values := grid(p))]
    sets = [branch("set", {"name": {"enum": [p.name]}, "value": {"enum": values}}) for p, values in offers]
    return {"anyOf": [*sets, branch("run", {}), branch("finish", {})] if allow_stop else sets}
