"""The KL anchor: distinct entries (not copies of one opening), whole, and KL on reply positions only."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_model
from rfs.consolidate import anchor, dataset
from rfs.consolidate.round import anchor_prompts

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def v0(tmp_path_factory):
    return tiny_model.build(tmp_path_factory.mktemp("v0"))


def examples(tok, n: int = 6):
    # arc A's round 1: every trace opens with the same messages; they differ in what the researcher did
    rows = [tiny_model.trace_row(f"r{i}", val_bpb=1.2 - 0.01 * i, msgs=tiny_model.messages(reasoning=f"idea {i}",
                                 log=f"val_bpb: {1.2 - 0.01 * i:.3f}")) for i in range(n)]
    return dataset.examples_of(tok, rows, "S", None)


def test_anchor_entries_are_distinct_replies_not_copies_of_the_opening(v0):
    tok = AutoTokenizer.from_pretrained(v0)
    exs = examples(tok)
    ids, starts = anchor_prompts(exs, 50)
    assert len(ids) == len({tuple(i) for i in ids}) == 12  # 6 traces x 2 replies, none a copy
    ids4, _ = anchor_prompts(exs, 4)
    assert ids4 == ids[:4]  # first replies of all traces come before second replies
    for seq, s in zip(ids, starts):
        # the KL positions predict the reply (its JSON, after the stamp), nothing of the prompt
        predicted = tok.decode(seq[s + 1 :] + [tok.eos_token_id])
        assert predicted.startswith('{"thought": ') and predicted.endswith("}<|im_end|>"), predicted
        assert tok.decode(seq[: s + 1]).endswith("steps=120>")  # the stamp is context
    full = next(e for e in exs if e.rollout_id == "r0")
    assert ids[0] == full.input_ids[: len(ids[0])]  # whole: nothing cut from the head


def test_kl_is_taken_on_reply_positions_only(v0):
    tok = AutoTokenizer.from_pretrained(v0)
    model = AutoModelForCausalLM.from_pretrained(v0).eval()
    ids, starts = anchor_prompts(examples(tok, 2), 50)
    anc = anchor.compute(model, ids, "cpu", starts)
    assert anchor.kl_all(model, anc, "cpu") == pytest.approx(0.0, abs=1e-5)
    prompt_garbled = torch.roll(anc.top_logp, 1, dims=-1)  # V0's prompt-position distributions made wrong
    for i, s in enumerate(starts):
        prompt_garbled[i, s:] = anc.top_logp[i, s:]
    anc_p = anchor.Anchor(anc.input_ids, anc.lengths, anc.starts, anc.top_idx, prompt_garbled)
    assert anchor.kl_all(model, anc_p, "cpu") == pytest.approx(0.0, abs=1e-5)  # prompt positions do not count
    reply_garbled = anc.top_logp.clone()
    reply_garbled[0, starts[0]:] = torch.roll(anc.top_logp[0, starts[0]:], 1, dims=-1)
    anc_r = anchor.Anchor(anc.input_ids, anc.lengths, anc.starts, anc.top_idx, reply_garbled)
    assert anchor.kl_all(model, anc_r, "cpu") > 0.01  # reply positions do


def test_saved_anchor_says_how_many_distinct_entries(v0, tmp_path):
    tok = AutoTokenizer.from_pretrained(v0)
    model = AutoModelForCausalLM.from_pretrained(v0).eval()
    ids, starts = anchor_prompts(examples(tok, 3), 50)
    anchor.save(anchor.compute(model, ids, "cpu", starts), tmp_path / "a", v0)
    meta = json.loads((tmp_path / "a" / "anchor.json").read_text())
    assert meta["prompts"] == meta["distinct"] == 6
    back = anchor.load(tmp_path / "a")
    assert back.starts.tolist() == starts
