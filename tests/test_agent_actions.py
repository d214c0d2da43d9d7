"""The defensive action parser against hostile and broken replies; the code action schema."""

from __future__ import annotations

import json
import random

import pytest

from rfs.agent.actions import MAX_REPLY_CHARS, Action, Invalid, code_caps, code_schema, parse, whole_file_fits
from tests.scripted_researcher import action

EDIT = {"thought": "smaller lr", "action": "edit", "path": "train.py", "search": "lr = 1", "replace": "lr = 2"}


def test_a_clean_action_and_its_stored_form():
    action = parse(json.dumps(EDIT), "code")
    assert action == Action("edit", thought="smaller lr", path="train.py", search="lr = 1", replace="lr = 2")
    stored = json.loads(action.as_json())
    assert stored == {"action": "edit", "path": "train.py", "search": "lr = 1", "replace": "lr = 2"}


def test_fenced_and_prose_wrapped_actions_parse():
    text = "Sure! Here it is:\n```json\n" + json.dumps(EDIT) + "\n```\nGood luck."
    assert isinstance(parse(text, "code"), Action)


@pytest.mark.parametrize(
    "text, words",
    [
        ("I think we should lower the learning rate.", "no JSON action"),
        ("", "empty reply"),
        (json.dumps(EDIT) + "\n" + json.dumps({"thought": "", "action": "run"}), "2 JSON objects"),
        ("```json\n" + json.dumps(EDIT), "unclosed"),
        ("\x00\x01\x02" + json.dumps(EDIT), "control or undecodable"),
        ('{"thought": "x", "action": "run"}' + " " * MAX_REPLY_CHARS, "characters long"),
        ('{"thought": "x", "action": "explode"}', "'action' must be one of"),
        ('{"thought": "x", "action": "run", "sudo": true}', "unknown field"),
        ('{"thought": "x", "action": "read"}', "needs field"),
        ('{"thought": 3, "action": "run"}', "must be strings"),
        ('{"thought": "x", "action": "edit", "path": "train.py", "search": "a"}', "either 'search' and 'replace'"),
        ('{"thought": "x", "action": "edit", "path": "train.py", "search": "", "replace": "b"}', "must not be empty"),
        ('{"thought": "x", "action": "edit", "path": "train.py", "content": "x", "search": "a", "replace": "b"}', "either"),
        ('{"thought": "x", "action": "edit", "path": "train.py", "content": ""}', "must not be empty"),
        ('["run"]', "no JSON action"),
        ('{"thought": "x", "action": "set", "name": "LR", "value": 1}', "'action' must be one of"),  # hparams only
        ('{"thought": "unterminated, "action": "run"', "no JSON action"),
    ],
)
def test_hostile_replies_become_invalid_with_a_reason(text, words):
    got = parse(text, "code")
    assert isinstance(got, Invalid), got
    assert words in got.reason


def test_editing_a_harness_file_is_flagged_not_refused_by_the_parser():
    got = parse(json.dumps({**EDIT, "path": "prepare.py"}), "code")
    assert isinstance(got, Action) and got.edits_harness
    assert not parse(json.dumps({**EDIT, "path": "./train.py"}), "code").edits_harness


def test_random_bytes_never_raise():
    rng = random.Random(7)
    pieces = ['{', '}', '"', ':', ',', '```', 'action', 'run', '\\u', '\ud800', '\x00', 'é', '[', ']', ' ', '\n', 'null']
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 40)))
        assert isinstance(parse(text, rng.choice(["code", "hparams"])), (Action, Invalid))


def test_code_schema_fits_max_tokens_and_is_closed():
    for max_tokens in (192, 2048):
        schema = code_schema(max_tokens)
        for branch in schema["anyOf"]:
            assert branch["additionalProperties"] is False
            strings = [p["maxLength"] for p in branch["properties"].values() if p.get("type") == "string"]
            assert sum(strings) + 96 <= max_tokens


AUTORESEARCH_SIZED = "".join(f"x_{i} = {i}  # a line of a 630-line train.py, about 26 KB in all......\n" for i in range(630))


def _has_whole_file(schema: dict) -> bool:
    return any("content" in b["properties"] for b in schema["anyOf"])


def test_a_whole_file_edit_is_offered_only_where_the_file_fits_the_reply():
    assert len(AUTORESEARCH_SIZED) > 26_000
    assert not whole_file_fits(AUTORESEARCH_SIZED, 2048) and not whole_file_fits(AUTORESEARCH_SIZED, 16384)
    assert whole_file_fits(AUTORESEARCH_SIZED, 80_000)
    assert whole_file_fits("x = 1\n" * 100, 2048) and not whole_file_fits("x = 1\n" * 300, 2048)
    assert not _has_whole_file(code_schema(2048)) and _has_whole_file(code_schema(2048, whole_file=True))
    search_first = code_schema(2048)["anyOf"][0]["properties"]
    assert "search" in search_first and "replace" in search_first  # search/replace is the default edit


def test_a_string_that_reached_its_cap_was_cut_and_is_refused():
    caps = code_caps(2048)
    for field in ("search", "replace"):
        fields = {"search": "a", "replace": "b", field: "y" * caps[field]}
        cut = parse(action("edit", path="train.py", **fields), "code", caps=caps)
        assert isinstance(cut, Invalid) and "cut short" in cut.reason, cut
        fields[field] = "y" * (caps[field] - 1)
        assert isinstance(parse(action("edit", path="train.py", **fields), "code", caps=caps), Action)
    whole = parse(action("edit", path="train.py", content="z" * caps["content"]), "code", caps=caps)
    assert isinstance(whole, Invalid) and "cut short" in whole.reason


@pytest.mark.parametrize("lines, ok", [
    ({"start": 100, "end": 160}, True), ({"start": 7, "end": 7}, True),
    ({"start": 0, "end": 5}, False), ({"start": 9, "end": 3}, False), ({"start": 4}, False),
    ({"start": True, "end": 2}, False), ({"start": "1", "end": "2"}, False),
])
def test_a_read_of_a_line_range(lines, ok):
    got = parse(action("read", path="train.py", **lines), "code")
    assert isinstance(got, Action) == ok, got
    if ok:
        assert (got.start, got.end) == (lines["start"], lines["end"])
        assert json.loads(got.as_json()) == {"action": "read", "path": "train.py", **lines}
