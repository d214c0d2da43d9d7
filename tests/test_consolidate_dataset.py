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
    ex = dataset.render(tok, row, dataset.stamp_of(row))
    text = tok.decode(ex.input_ids)
    # The expected char-level mask, built from the rendered text independently of the module.
    stamp = "<val_bpb=0.943 status=success steps=940>"
    trained_spans, hidden_spans = [], []
    for content, reasoning in (('{"action": "set", "name": "lr", "value": 0.001}', "lower the learning rate"),
                               ('{"action": "finish"}', "done")):
        reply = stamp + '{"thought": ' + json.dumps(reasoning) + ", " + content[1:] + "<|im_end|>"
        at = text.index(reply)
        thought = text.index(json.dumps(reasoning), at)
        trained_spans += [(at, thought), (thought + len(json.dumps(reasoning)), at + len(reply))]
        hidden_spans.append((thought, thought + len(json.dumps(reasoning))))
    log = "edit applied; syntax ok\nval_bpb: 1.234\nsteps: 120"
    trained_spans.append((text.index(log), text.index(log) + len(log)))
    trained_at = [any(a <= i < b for a, b in trained_spans) for i in range(len(text))]
    hidden_at = [any(a <= i < b for a, b in hidden_spans) for i in range(len(text))]
    pos = 0
    for tid, lab in zip(ex.input_ids, ex.labels):
        piece = tok.decode([tid])
        chars, hidden = trained_at[pos : pos + len(piece)], hidden_at[pos : pos + len(piece)]
        # the rule: a token is trained when any of its characters is and none is reasoning
        assert (lab != dataset.IGNORE) == (any(chars) and not any(hidden)), f"token {piece!r} at {pos}: label {lab}"
        assert lab in (dataset.IGNORE, tid)
        pos += len(piece)
    assert pos == len(text)
    trained = tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != dataset.IGNORE])
    for masked in (tiny_model.PROGRAM_MD, tiny_model.TRAIN_PY, "lower the learning", "done", "assistant", "tool"):
        assert masked not in trained
    assert trained.count(stamp) == 2 and "val_bpb: 1.234" in trained and '"action": "finish"}' in trained


def test_every_status_is_stamped_truthfully_and_infra_errors_are_dropped(tok):
    rows = [tiny_model.trace_row(f"r-{s}", status=s, val_bpb=0.943, steps=940) for s in trace.STATUSES]
    examples = dataset.examples_of(tok, rows, "S", None)
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
    ex = dataset.render(tok, row, stamp)
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
    (ex,) = dataset.examples_of(tok, rows, "F", {"mean": 1.3, "std": 0.01})
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


def test_a_trace_too_long_is_dropped_and_counted_never_cut(tok, tmp_path):
    run = RunDir(tmp_path)
    long_log = "val_bpb: 1.234\nsteps: 120\n" + "| step 10 loss 3.21\n" * 40
    rows = [tiny_model.trace_row("short"), tiny_model.trace_row("long", msgs=tiny_model.messages(log=long_log))]
    write_round(run, "S", 1, rows)
    full = {e.rollout_id: e for e in dataset.examples_of(tok, rows, "S", None)}
    cap = len(full["short"].input_ids) + 1
    assert len(full["long"].input_ids) > cap
    d = dataset.build(run, "S", 1, tok, cap, 0.0, 5, None, seed=0)
    (kept,) = d.examples
    assert kept == full["short"]  # whole, not cut
    m = d.manifest
    assert m["dropped"] == 1 and m["dropped_rollouts"] == [[1, "long", len(full["long"].input_ids)]]
    assert m["tokens_per_example"] == [len(kept.input_ids)] and m["seq_len"] == len(kept.input_ids)
    assert dataset.build(run, "S", 1, tok, 4096, 0.0, 5, None, seed=0).manifest["dropped"] == 0


def _trained_text(tok, ex) -> str:
    return tok.decode([t for t, lab in zip(ex.input_ids, ex.labels) if lab != dataset.IGNORE])


def test_a_read_observation_returning_train_py_gets_no_loss(tok):
    msgs = tiny_model.messages()
    msgs[2] = {"role": "assistant", "content": '{"action": "read", "path": "train.py"}', "reasoning": "look"}
    msgs[3] = {"role": "user", "content": prompts.observe(f"train.py:\n```python\n{tiny_model.TRAIN_PY}\n```"), "reasoning": ""}
    ex = dataset.render(tok, tiny_model.trace_row("r", msgs=msgs), None)
    text = tok.decode(ex.input_ids)
    at = text.index(msgs[3]["content"])
    pos = 0
    for tid, lab in zip(ex.input_ids, ex.labels):
        piece = tok.decode([tid])
        if at <= pos and pos + len(piece) <= at + len(msgs[3]["content"]):
            assert lab == dataset.IGNORE, f"token {piece!r} of the read observation is trained"
        pos += len(piece)
    trained = _trained_text(tok, ex)
    assert "loss = model(data)" not in trained and '"action": "read"' in trained
    # another observation of the same trace is still trained
    msgs[3]["content"] = prompts.observe("edit applied; syntax ok")
    assert "edit applied" in _trained_text(tok, dataset.render(tok, tiny_model.trace_row("r", msgs=msgs), None))


def test_an_invalid_reply_is_verbatim_and_untrained(tok):
    raw = '{"thought": "raise it", "action": "bogus", "value": 3}'
    msgs = tiny_model.messages()
    msgs[2] = {"role": "assistant", "content": raw, "reasoning": ""}
    msgs[3] = {"role": "user", "content": prompts.observe("invalid action: unknown action. Reply with exactly one JSON object."), "reasoning": ""}
    stamp = "<val_bpb=nan status=agent_error steps=0>"
    ex = dataset.render(tok, tiny_model.trace_row("r", status="agent_error", msgs=msgs), stamp)
    text = tok.decode(ex.input_ids)
    assert "<|im_start|>assistant\n" + stamp + raw + "<|im_end|>" in text  # verbatim: no second "thought"
    assert text.count('"thought"') == 2  # the invalid one's own and the valid finish's
    at = text.index(stamp + raw)
    end = at + len(stamp + raw + "<|im_end|>")
    pos = 0
    for tid, lab in zip(ex.input_ids, ex.labels):
        piece = tok.decode([tid])
        if pos < end and pos + len(piece) > at:
            assert lab == dataset.IGNORE, f"token {piece!r} of the invalid reply is trained"
        pos += len(piece)
    trained = _trained_text(tok, ex)
    assert "bogus" not in trained and '"action": "finish"}' in trained


def test_tokens_straddling_the_reasoning_boundary_are_not_trained(tok):
    # the tiny BPE merges the quotes with what surrounds them: ' "' opens and '",' closes the thought
    straddles = 0
    for reasoning in ("lower the learning rate", "abc", "lr", "done", "steps"):
        msgs = tiny_model.messages(reasoning=reasoning)
        ex = dataset.render(tok, tiny_model.trace_row("r", msgs=msgs), None)
        text = tok.decode(ex.input_ids)
        q = text.index(json.dumps(reasoning))
        span = (q, q + len(json.dumps(reasoning)))
        pos = 0
        for tid, lab in zip(ex.input_ids, ex.labels):
            piece = tok.decode([tid])
            a, b = pos, pos + len(piece)
            if a < span[1] and b > span[0]:  # touches the reasoning string, its quotes included
                assert lab == dataset.IGNORE, f"token {piece!r} touches the reasoning and is trained"
                straddles += a < span[0] or b > span[1]  # e.g. ' "' and '",' with the tiny BPE
            pos += len(piece)
    assert straddles  # the case exists for this tokenizer: the test checks something


def test_a_flagged_run_is_never_arm_fs_improvement_and_its_stamp_says_so():
    """The harness's anomaly flags: arm F never selects a flagged success, arm S trains it with
    its flags in the stamp, so no flagged number is rewarded as if it were clean."""
    noise = {"mean": 1.3, "std": 0.01}
    clean = tiny_model.trace_row("clean", val_bpb=1.0)
    flagged = {**tiny_model.trace_row("flagged", val_bpb=0.9), "anomaly_flags": ["too_good_for_steps"]}
    assert [r["rollout_id"] for r in dataset.select([clean, flagged], "A-F", noise)] == ["clean"]
    assert dataset.stamp_of(flagged).endswith("flags=too_good_for_steps>")
    assert "flags=" not in dataset.stamp_of(clean)
