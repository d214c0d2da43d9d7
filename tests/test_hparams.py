"""The hyperparameter block: parse, apply, schema — on an inline block and on the real seed train.py."""

from __future__ import annotations

import json

import pytest

from rfs import ROOT
from rfs.agent import hparams
from rfs.agent.actions import Action, Invalid, hparams_schema, parse

BLOCK = '''import os
# --- HYPERPARAMETERS: the researcher may change these values within the declared ranges ---
LEARNING_RATE = 3e-3  # range: [1e-4, 3e-2]
BATCH_SIZE = 16  # range: [1, 128]
SCHEDULE = "cosine"  # choices: ["cosine", "linear", "constant"]
# --- END HYPERPARAMETERS ---
BATCH_SIZE_NOTE = 16
print(LEARNING_RATE, BATCH_SIZE, SCHEDULE)
'''
SEED = ROOT / "env" / "builtin" / "train.py"


def test_parse_inline_block():
    lr, bs, sched = hparams.parse(BLOCK)
    assert (lr.name, lr.kind, lr.value, lr.lo, lr.hi) == ("LEARNING_RATE", "float", 3e-3, 1e-4, 3e-2)
    assert (bs.kind, bs.value, bs.lo, bs.hi) == ("int", 16, 1, 128)
    assert (sched.kind, sched.value, sched.choices) == ("choice", "cosine", ("cosine", "linear", "constant"))


def test_apply_rewrites_only_that_line():
    out = hparams.apply(BLOCK, "BATCH_SIZE", 32)
    assert "BATCH_SIZE = 32  # range: [1, 128]" in out
    assert "BATCH_SIZE_NOTE = 16" in out  # the same prefix outside the block is untouched
    assert out.replace("BATCH_SIZE = 32", "BATCH_SIZE = 16") == BLOCK
    out = hparams.apply(BLOCK, "SCHEDULE", "linear")
    assert 'SCHEDULE = "linear"  # choices:' in out
    assert hparams.parse(hparams.apply(BLOCK, "LEARNING_RATE", 0.01))[0].value == 0.01
    compile(out, "train.py", "exec")


@pytest.mark.parametrize(
    "name, value, words",
    [
        ("BATCH_SIZE", 0, "outside the range"),
        ("BATCH_SIZE", 129, "outside the range"),
        ("BATCH_SIZE", 2.5, "expected an integer"),
        ("BATCH_SIZE", True, "expected a number"),
        ("LEARNING_RATE", float("nan"), "outside the range"),
        ("LEARNING_RATE", "0.01", "expected a number"),
        ("SCHEDULE", "warmup", "not one of"),
        ("DEPTH", 3, "not a hyperparameter"),
    ],
)
def test_apply_refuses_with_a_clear_error(name, value, words):
    with pytest.raises(ValueError, match=words):
        hparams.apply(BLOCK, name, value)


@pytest.mark.parametrize(
    "text, words",
    [
        ("x = 1\n", "no hyperparameter block"),
        (BLOCK.replace("# --- END HYPERPARAMETERS ---\n", ""), "never closed"),
        (BLOCK.replace("BATCH_SIZE = 16  # range: [1, 128]", "BATCH_SIZE = 16"), "not a 'NAME = value"),
        (BLOCK.replace("BATCH_SIZE = 16  #", "BATCH_SIZE = 500  #"), "outside the range"),
    ],
)
def test_broken_blocks_are_named(text, words):
    with pytest.raises(ValueError, match=words):
        hparams.parse(text)


def test_schema_branches_carry_each_names_bounds():
    schema = hparams_schema(hparams.parse(BLOCK), max_tokens=192)
    branches = schema["anyOf"]
    by_name = {b["properties"]["name"]["enum"][0]: b for b in branches if "name" in b["properties"]}
    assert by_name["BATCH_SIZE"]["properties"]["value"] == {"enum": [1, 2, 4, 8, 32, 64, 128]}  # not 16: no-op
    assert by_name["SCHEDULE"]["properties"]["value"] == {"enum": ["linear", "constant"]}
    lr = by_name["LEARNING_RATE"]["properties"]["value"]["enum"]
    assert lr[0] == 1e-4 and lr[-1] == 3e-2 and 3e-3 not in lr and len(lr) == 12
    assert all(b["additionalProperties"] is False for b in branches)
    assert all(b["properties"]["thought"]["maxLength"] <= 192 for b in branches)
    assert {b["properties"]["action"]["enum"][0] for b in branches} == {"set", "run", "finish"}
    json.dumps(schema)
    narrowed = hparams_schema(hparams.parse(BLOCK), max_tokens=192, allow_stop=False)["anyOf"]
    assert {b["properties"]["action"]["enum"][0] for b in narrowed} == {"set"}


def test_every_grid_value_is_in_range_and_a_change():
    for p in hparams.parse(BLOCK):
        values = hparams.grid(p)
        assert values and p.value not in values and all(p.check(v) == v for v in values)


def test_parser_checks_the_range_the_grammar_cannot():
    params = hparams.parse(BLOCK)
    ok = parse('{"thought": "bigger", "action": "set", "name": "BATCH_SIZE", "value": 64}', "hparams", params)
    assert ok == Action("set", thought="bigger", name="BATCH_SIZE", value=64)
    bad = parse('{"thought": "", "action": "set", "name": "BATCH_SIZE", "value": 1000}', "hparams", params)
    assert isinstance(bad, Invalid) and "outside the range" in bad.reason


@pytest.mark.skipif(not SEED.exists(), reason="the built-in env's seed train.py has not landed")
def test_the_real_seed_block():
    text = SEED.read_text()
    params = hparams.parse(text)
    names = {p.name for p in params}
    assert {"LEARNING_RATE", "BATCH_SIZE", "SCHEDULE"} <= names
    for p in params:
        new = p.choices[-1] if p.kind == "choice" else p.hi
        out = hparams.apply(text, p.name, new)
        assert {q.name: q.value for q in hparams.parse(out)}[p.name] == new
        compile(out, "train.py", "exec")
    from llama_cpp.llama_grammar import json_schema_to_gbnf  # the grammar llama.cpp builds from it

    assert "root ::=" in json_schema_to_gbnf(json.dumps(hparams_schema(params, 192)))
