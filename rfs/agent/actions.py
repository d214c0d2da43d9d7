"""The researcher's actions: the JSON schemas requested from the server and a parser that never raises.

Two action spaces share the loop. `code`: read (the whole file, or a line range start..end) | edit
(search/replace by default; a whole-file `content` only where the file fits the reply) | run | finish. `hparams`: set one marked hyperparameter | run | finish. The schema is what the
server is asked to enforce; the parser is the guard for servers that do not (or a model that
slips through): any reply text becomes either an Action or an Invalid with a reason the
researcher is shown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from rfs.agent.hparams import HParam, schema

TRAIN_PY = "train.py"
MAX_REPLY_CHARS = 100_000  # longer than any action max_tokens allows: a runaway or hostile reply
OVERHEAD_CHARS = 96  # braces, keys and quotes of the longest action object


@dataclass(frozen=True)
class Action:
    kind: str  # read | edit | run | finish | set
    thought: str = ""
    path: str = ""
    search: str = ""
    replace: str = ""
    content: str = ""
    name: str = ""
    value: Any = None
    start: int = 0  # read: first line (1-based); 0 when the whole file is asked for
    end: int = 0  # read: last line, inclusive

    @property
    def edits_harness(self) -> bool:
        """An edit of anything but train.py: refused, and a harness_violation if the researcher insists."""
        return self.kind == "edit" and self.path.removeprefix("./") != TRAIN_PY

    def as_json(self) -> str:
        """The action without its thought: what the trace stores as the assistant message's content."""
        unset = {k for k in ("start", "end") if not getattr(self, k)}  # a whole-file read
        fields = {k: v for k, v in vars(self).items() if k not in ("kind", "thought", *unset) and v not in ("", None)}
        return json.dumps({"action": self.kind, **fields}, ensure_ascii=False)


@dataclass(frozen=True)
class Invalid:
    reason: str


def _string(chars: int) -> dict[str, Any]:
    return {"type": "string", "maxLength": max(chars, 1)}


def _branch(action: str, **extra: dict[str, Any]) -> dict[str, Any]:
    props = {"thought": extra.pop("thought"), "action": {"enum": [action]}, **extra}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


def thought_chars(max_tokens: int) -> int:
    return max(16, max_tokens // 4)


GROWTH = 1.25  # a whole-file edit is offered only with room for the file to grow this much


def code_caps(max_tokens: int) -> dict[str, int]:
    """Each string's maxLength, derived from max_tokens so every branch's strings together fit it.

    A token is at least one character, so a reply whose characters fit max_tokens is never cut in
    half by it (escapes aside, which is why the overhead is generous). A string that reaches its cap
    was closed by the constrained decoder, not by the researcher: parse() says so (Invalid).
    """
    room = max(32, max_tokens - OVERHEAD_CHARS)
    t = thought_chars(max_tokens)
    body = max(16, room - t - 16)
    return {"thought": t, "path": 16, "search": body // 3, "replace": body - body // 3, "content": body}


def whole_file_fits(train_py: str, max_tokens: int) -> bool:
    """A whole-file edit is offered only when the file, grown a little, fits the reply's content cap."""
    return len(train_py) * GROWTH <= code_caps(max_tokens)["content"]


def code_schema(max_tokens: int, *, whole_file: bool = False) -> dict[str, Any]:
    """One anyOf branch per action; the whole-file edit only when whole_file_fits said so."""
    caps = code_caps(max_tokens)
    th, path = _string(caps["thought"]), _string(caps["path"])
    line = {"type": "integer", "minimum": 1}
    branches = [
        _branch("edit", thought=th, path=path, search=_string(caps["search"]), replace=_string(caps["replace"])),
        _branch("read", thought=th, path=path, start=line, end=line),
        _branch("read", thought=th, path=path),
        _branch("run", thought=th),
        _branch("finish", thought=th),
    ]
    if whole_file:
        branches.insert(1, _branch("edit", thought=th, path=path, content=_string(caps["content"])))
    return {"anyOf": branches}


def hparams_schema(params: tuple[HParam, ...], max_tokens: int, *, allow_stop: bool = True) -> dict[str, Any]:
    # the name and a number take a few dozen characters; the rest of the reply is the thought's
    return schema(params, max(16, max_tokens - OVERHEAD_CHARS - 64), allow_stop=allow_stop)


def _objects(text: str) -> list[Any]:
    """Every top-level JSON value in the text, in order (prose around them is ignored)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while (i := text.find("{", i)) != -1:
        try:
            obj, end = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            i += 1
            continue
        out.append(obj)
        i = end
    return out


def _unfenced(text: str) -> str | Invalid:
    if text.count("```") % 2:
        return Invalid("an unclosed ``` fence; reply with one bare JSON object")
    return text.replace("```json", "").replace("```", "")


# Control characters but tab and newlines, lone surrogates, and the replacement character of
# undecodable bytes: what no action's JSON holds.
_BAD_CHARS = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffd]")


def _junk(text: str) -> Invalid | None:
    if len(text) > MAX_REPLY_CHARS:
        return Invalid(f"the reply is {len(text)} characters long; one action is a short JSON object")
    bad = len(_BAD_CHARS.findall(text))
    if bad:
        return Invalid(f"the reply holds {bad} control or undecodable characters")
    if not text.strip():
        return Invalid("an empty reply")
    return None


_FIELDS = {
    "code": {"read": {"path"}, "edit": {"path"}, "run": set(), "finish": set()},
    "hparams": {"set": {"name", "value"}, "run": set(), "finish": set()},
}
_OPTIONAL = {"edit": {"search", "replace", "content"}, "read": {"start", "end"}}
_NOT_STRINGS = {"value", "start", "end"}


def _check(obj: Any, space: str, params: tuple[HParam, ...], caps: dict[str, int]) -> Action | Invalid:
    if not isinstance(obj, dict):
        return Invalid("the action must be a JSON object")
    kinds = _FIELDS[space]
    kind = obj.get("action")
    if kind not in kinds:
        return Invalid(f"'action' must be one of {sorted(kinds)}, got {kind!r}")
    allowed = {"thought", "action"} | kinds[kind] | _OPTIONAL.get(kind, set())
    if unknown := sorted(set(obj) - allowed):
        return Invalid(f"unknown field(s) {unknown} for action {kind!r}")
    if missing := sorted(kinds[kind] - set(obj)):
        return Invalid(f"action {kind!r} needs field(s) {missing}")
    strings = {k: v for k, v in obj.items() if k not in _NOT_STRINGS}
    if bad := sorted(k for k, v in strings.items() if not isinstance(v, str)):
        return Invalid(f"field(s) {bad} must be strings")
    if cut := sorted(k for k in ("search", "replace", "content") if k in caps and len(obj.get(k, "")) >= caps[k]):
        return Invalid(f"{cut} reached the reply's cap of {caps[cut[0]]} characters and was cut short;"
                       " make a smaller edit (a search of a few lines)")
    if kind == "read" and (problem := _lines(obj)):
        return problem
    action = Action(**{k: v for k, v in obj.items() if k != "action"}, kind=kind)
    if kind == "edit":
        whole, patch = bool("content" in obj), bool({"search", "replace"} & set(obj))
        if whole == patch or (patch and not {"search", "replace"} <= set(obj)):
            return Invalid("an edit needs either 'search' and 'replace', or 'content' (the whole file)")
        if patch and not action.search:
            return Invalid("'search' must not be empty")
        if whole and not action.content:
            return Invalid("'content' must not be empty (it replaces the whole file)")
    if kind == "set":
        by_name = {p.name: p for p in params}
        if action.name not in by_name:
            return Invalid(f"{action.name!r} is not a hyperparameter; choose one of {sorted(by_name)}")
        try:
            by_name[action.name].check(action.value)
        except ValueError as exc:
            return Invalid(str(exc))
    return action


def _lines(obj: dict[str, Any]) -> Invalid | None:
    if {"start", "end"} & set(obj) and not {"start", "end"} <= set(obj):
        return Invalid("a read of a line range needs both 'start' and 'end'")
    start, end = obj.get("start", 1), obj.get("end", 1)
    if not all(type(v) is int for v in (start, end)) or not 1 <= start <= end:
        return Invalid("'start' and 'end' must be line numbers with 1 <= start <= end")
    return None


def parse(text: str, space: str, params: tuple[HParam, ...] = (), caps: dict[str, int] | None = None) -> Action | Invalid:
    """Reply text → Action, or Invalid(reason). Never raises. `caps` (code_caps): a string that
    reached its cap was cut by the constrained decoder and is refused rather than applied."""
    try:
        if junk := _junk(text):
            return junk
        body = _unfenced(text)
        if isinstance(body, Invalid):
            return body
        objs = _objects(body)
        if not objs:
            return Invalid("no JSON action found; reply with exactly one JSON object")
        if len(objs) > 1:
            return Invalid(f"{len(objs)} JSON objects in one reply; one action per turn")
        return _check(objs[0], space, params, caps or {})
    except Exception as exc:  # a parser bug must cost one turn, never the rollout
        return Invalid(f"unparseable reply ({type(exc).__name__})")
