"""Consolidation's dataset: the loss mask token by token, stamps, arm F's noise band, replay."""

from __future__ import annotations

import json
import math

import pytest
from transformers import AutoTokenizer

import tiny_model
from rfs import atomic, trace
from rfs.agent import prompts
from rfs.consolidate import dataset
from rfs.rundir import RunDir


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return AutoTokenizer.from_pretrained(tiny_model.build(tmp_path_factory.mktemp("tiny")))


def write_round(run: RunDir, loop: str, round_: int, rows: list[dict]) -> None:
    atomic.write_parquet(run.traces(loop, round_), trace.to_table(rows))


def test_mask_token_by_token(tok):
    row = tiny_model.trace_row("r1", val_bpb=0.943, steps=940)
    ex = dataset.render(tok, row, dataset.stamp_of(row), max_seq_len=4096)
    text = tok.decode(ex.input_ids)
    # The expected char-level mask, built from the rendered text independently of the module.
    stamp = "<val_bpb=0.943 status=success steps=940>"
    trained_spans = []
    for content, reasoning in (('{"action": "set", "name": "lr", "value": 0.001}', "lower the learning rate"),
                               ('{"action": "finish"}', "done")):
        reply = stamp + '{"thought": ' + json.dumps(reasoning) + ", " + content[1:] + "<|im_end|>"
        at = text.index(reply)
        thought = text.index(json.dumps(reasoning), at)
        trained_spans += [(at, thought), (thought + len(json.dumps(reasoning)), at + len(reply))]
    log = "edit applied; syntax ok\nval_bpb: 1.234\nsteps: 120"
    trained_spans.append((text.index(log), text.index(log) + len(log)))
    trained_at = [any(a <= i < b for a, b in trained_spans) for i in range(len(text))]
    pos = 0
    for tid, lab in zip(ex.input_ids, ex.labels):
        piece = tok.decode([tid])
        chars = trained_at[pos : pos + len(piece)]
        # the rule: a token is trained when any of its characters is (a `"` may join a thought)
        assert (lab != dataset.IGNORE) == any(chars), f"token {piece!r} at {pos}: label {lab}"
        assert lab in (dataset.IGNORE, tid)
        pos += len(piece)
    assert pos == len(text)
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != dataset.IGNORE])
    for masked in (tiny_model.PROGRAM_MD, tiny_model.TRAIN_PY, "lower the learning", "done", "assistant", "tool"):
        assert masked not in trained
    assert trained.count(stamp) == 2 and "val_bpb: 1.234" in trained and '"action": "finish"}' in trained


def test_every_status_is_stamped_truthfully_and_infra_errors_are_dropped(tok):
    rows = [tiny_model.trace_row(f"r-{s}", status=s, val_bpb=0.943, steps=940) for s in trace.STATUSES]
    examples = dataset.examples_of(tok, rows, "S", None, 4096)
    assert sorted(e.rollout_id for e in examples) == sorted(f"r-{s}" for s in trace.STATUSES if s != "infra_error")
    for e in examples:
        status = e.rollout_id[2:]
        text = tok.decode(e.input_ids)
        bpb = "0.943" if status == "success" else "nan"
        stamp = f"<val_bpb={bpb} status={status} steps=940>"
        assert text.count("<|im_start|>assistant\n" + stamp + '{"thought": ') == 2  # every reply
        assert text.count("<val_bpb=") == 2
        if status != "success":
            assert "status=success" not in text and "0.943" not in text


def test_prefilled_prompt_is_a_prefix_of_the_training_ids(tok):
    row = tiny_model.trace_row("r1", val_bpb=0.9, steps=12)
    stamp = dataset.stamp_of(row)
    ex = dataset.render(tok, row, stamp, 4096)
    msgs = row["messages"]
    for turn in (2, 4):  # each assistant message
        chat = [{"role": m["role"], "content": dataset._chat([m], stamp)[0]["content"]} for m in msgs[:turn]]
        ids = dataset.prefill_ids(tok, chat, stamp)
        assert ex.input_ids[: len(ids)] == ids
        assert tok.decode(ids) == prompts.render(tok, chat, stamp)
        assert ex.labels[len(ids) - 1] != dataset.IGNORE  # the stamp's last token is trained


def test_arm_f_keeps_only_improvements_beyond_the_noise_band():
    noise = {"mean": 1.30, "std": 0.01}
    rows = [
        tiny_model.trace_row("in", val_bpb=1.27, start_val_bpb=1.30),  # 3 std better
        tiny_model.trace_row("edge", val_bpb=1.285, start_val_bpb=1.30),  # 1.5 std: inside the noise
        tiny_model.trace_row("worse", val_bpb=1.35, start_val_bpb=1.30),
        tiny_model.trace_row("crash", status="crash", start_val_bpb=1.30),
        tiny_model.trace_row("nanstart", val_bpb=1.27, start_val_bpb=math.nan),  # uses the calibration mean
        tiny_model.trace_row("nanstart-out", val_bpb=1.29, start_val_bpb=math.nan),
        tiny_model.trace_row("infra", status="infra_error", start_val_bpb=1.30),
    ]
    assert [r["rollout_id"] for r in dataset.select(rows, "F", noise)] == ["in", "nanstart"]
    with pytest.raises(ValueError, match="noise"):
        dataset.select(rows, "F", None)


def test_arm_f_examples_carry_no_stamp(tok):
    rows = [tiny_model.trace_row("in", val_bpb=1.2, start_val_bpb=1.3)]
    (ex,) = dataset.examples_of(tok, rows, "F", {"mean": 1.3, "std": 0.01}, 4096)
    assert "<val_bpb=" not in tok.decode(ex.input_ids)


def test_replay_is_a_fifth_from_the_last_five_rounds_and_deterministic(tok, tmp_path):
    run = RunDir(tmp_path)
    write_round(run, "shared", 1, [tiny_model.trace_row(f"r1-{i}", round_=1, loop="shared") for i in range(6)])
    for r in range(2, 8):
        write_round(run, "S", r, [tiny_model.trace_row(f"r{r}-{i}", round_=r) for i in range(8 if r == 7 else 3)])
    a = dataset.build(run, "S", 7, tok, 4096, 0.2, 5, None, seed=0)
    b = dataset.build(run, "S", 7, tok, 4096, 0.2, 5, None, seed=0)
    m = a.manifest
    assert (m["selected"], m["replay"], m["replay_pool"]) == (8, 2, 15)  # rounds 2..6, not round 1
    assert m["replay_fraction"] == pytest.approx(0.2)
    assert m["rollouts"] == b.manifest["rollouts"] and m["sha256"] == b.manifest["sha256"]
    assert all(2 <= r < 7 for r, _ in m["rollouts"][8:])
    c = dataset.build(run, "S", 7, tok, 4096, 0.2, 5, None, seed=1)
    assert c.manifest["rollouts"][:8] == m["rollouts"][:8]
    # round 2 replays round 1 from the loop "shared"
    d = dataset.build(run, "S", 2, tok, 4096, 0.5, 5, None, seed=0)
    assert d.manifest["sources"] == {"2": "S", "1": "shared"} and d.manifest["replay"] == 3


def test_missing_round_is_a_clear_error(tok, tmp_path):
    with pytest.raises(FileNotFoundError, match="no traces for loop S round 3"):
        dataset.build(RunDir(tmp_path), "S", 3, tok, 4096, 0.2, 5, None, seed=0)


def test_long_traces_lose_their_masked_head_not_their_actions(tok):
    ex = dataset.render(tok, tiny_model.trace_row("r1"), "<val_bpb=1.200 status=success steps=120>", 4096)
    short = dataset.render(tok, tiny_model.trace_row("r1"), "<val_bpb=1.200 status=success steps=120>", 60)
    assert short.truncated and len(short.input_ids) == 60
    assert short.input_ids == ex.input_ids[-60:] and short.labels == ex.labels[-60:]
