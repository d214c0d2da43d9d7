"""Consolidation's fit and publish on a tiny random Llama: packing isolation, the KL anchor's pull,
merged == base+adapter, the published version's files and metrics, resume after a kill -9."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiny_model
from rfs import atomic, trace
from rfs.config import ConsolidateCfg
from rfs.consolidate import anchor, consolidate, dataset, fit, prefix
from rfs.consolidate import round as round_mod
from rfs.events import EventLog, iter_events
from rfs.rundir import RunDir

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)  # the tiny model is overhead-bound: threads only contend with neighbours
CFG = ConsolidateCfg(lora_r=4, lora_alpha=8, lora_dropout=0.05, epochs=2.0, lr=5e-3, max_seq_len=512,
                     batch_tokens=512, kl_prompts=4, reason="tiny test model")


@pytest.fixture(scope="module")
def v0(tmp_path_factory) -> Path:
    return tiny_model.build(tmp_path_factory.mktemp("v0"))


def rows(round_: int = 1, loop: str = "shared") -> list[dict]:
    out = [tiny_model.trace_row(f"r{round_}-{i}", val_bpb=1.2 - 0.01 * i, round_=round_, loop=loop,
                                msgs=tiny_model.messages(reasoning=f"idea {i}", log=f"val_bpb: {1.2 - 0.01 * i:.3f}"))
           for i in range(5)]
    out.append(tiny_model.trace_row(f"r{round_}-crash", status="crash", round_=round_, loop=loop))
    out.append(tiny_model.trace_row(f"r{round_}-infra", status="infra_error", round_=round_, loop=loop))
    return out


def new_run(root: Path, round_: int = 1, loop: str = "shared") -> RunDir:
    run = RunDir(root)
    atomic.write_parquet(run.traces(loop, round_), trace.to_table(rows(round_, loop)))
    return run


def test_packed_examples_do_not_see_each_other(v0):
    model = AutoModelForCausalLM.from_pretrained(v0).eval()
    a = dataset.Example("a", 1, [5, 6, 7, 8, 9], [-100, 6, 7, 8, 9])
    b = dataset.Example("b", 1, [10, 11, 12], [-100, 11, 12])
    c = dataset.Example("c", 1, [13, 14], [-100, 14])
    (first,) = fit.packed([a, b, c], 8, 16)  # rows [a, b] and [c], stacked into one step
    assert first.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4, 5]]
    assert first.targets.tolist()[0] == [6, 7, 8, 9, -100, 11, 12, -100]  # nothing predicted across the seam
    assert first.targets.tolist()[1] == [14, -100] + [-100] * 6 and first.real == 10
    with torch.no_grad():
        got = fit.batch_logits(model, first, "cpu")
        for row, at, ex in ((0, 5, b), (0, 0, a), (1, 0, c)):
            alone = model(input_ids=torch.tensor([ex.input_ids])).logits[0]
            torch.testing.assert_close(got[row, at : at + len(ex.input_ids)], alone, atol=1e-5, rtol=1e-5)


def test_length_buckets_pad_little_and_match_unbatched_logits(v0):
    model = AutoModelForCausalLM.from_pretrained(v0).eval()
    exs = [dataset.Example(f"e{n}", 1, list(range(20, 20 + n)), [-100] + list(range(21, 20 + n))) for n in (3, 9, 4, 8, 10)]
    steps = fit.bucketed(exs, 20)
    assert [b.input_ids.shape[0] for b in steps] == [2, 2, 1]  # (3, 4), (8, 9), (10)
    assert sum(b.real for b in steps) == 34 and sum(b.input_ids.numel() for b in steps) == 8 + 18 + 10
    with torch.no_grad():
        got = fit.batch_logits(model, steps[1], "cpu")
        for row, n in ((0, 8), (1, 9)):
            alone = model(input_ids=torch.tensor([list(range(20, 20 + n))])).logits[0]
            torch.testing.assert_close(got[row, :n], alone, atol=1e-5, rtol=1e-5)
    assert steps[0].targets.tolist()[0] == [21, 22, -100, -100]  # padding is never a target


def test_kl_term_keeps_the_model_closer_to_v0(v0):
    tok = AutoTokenizer.from_pretrained(v0)
    examples = dataset.examples_of(tok, rows(), "S", None)[:3]
    base = AutoModelForCausalLM.from_pretrained(v0).eval()
    anc = anchor.compute(base, [e.input_ids[:40] for e in examples], "cpu")
    assert anchor.kl_all(base, anc, "cpu") == pytest.approx(0.0, abs=1e-5)
    cfg = dataclasses.replace(CFG, lr=2e-2, epochs=4.0, lora_dropout=0.0, max_seq_len=256, batch_tokens=256)
    after = {}
    for lam in (0.0, 1.0):
        model = fit.lora(AutoModelForCausalLM.from_pretrained(v0), dataclasses.replace(cfg, kl_lambda=lam), seed=0)
        steps = fit.batches(examples, cfg)
        res = fit.fit(model, steps, steps, anc, dataclasses.replace(cfg, kl_lambda=lam), "cpu", seed=0)
        assert res.loss_after < res.loss_before
        after[lam] = res.kl_after
    assert after[0.0] > 0.1  # the fit moved the model away from V0 ...
    assert after[1.0] < 0.5 * after[0.0]  # ... and the anchor held it much closer on the same data


def test_consolidate_publishes_a_complete_version(v0, tmp_path):
    run = new_run(tmp_path)
    events = EventLog(run.events)
    out = consolidate(run, "S", 1, v0, v0, CFG, None, events=events, device="cpu", seed=0)
    assert out == run.model("S", 1)
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "tokenizer.json", "manifest.json", "dataset.json", "adapter"} <= names
    assert not any(p.name.endswith(".partial") for p in out.parent.iterdir())
    manifest = json.loads((out / "manifest.json").read_text())
    data = json.loads((out / "dataset.json").read_text())
    assert manifest["parent_version"] == 0 and manifest["trained"] and manifest["steps"] >= 1
    assert manifest["dataset_sha256"] == data["sha256"] and data["selected"] == 6  # infra_error dropped
    assert manifest["hyperparameters"]["lora_r"] == 4
    assert manifest["loss_after"] < manifest["loss_before"]
    # merged weights == base + adapter
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 2]])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(v0), out / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        base = AutoModelForCausalLM.from_pretrained(v0).eval()(input_ids=ids).logits
    assert not torch.allclose(base, merged(input_ids=ids).logits, atol=1e-4)
    # metrics and events
    (m,) = pq.read_table(run.metrics("consolidate")).to_pylist()
    assert (m["loop"], m["round"], m["examples"]) == ("S", 1, 6) and m["tokens_seen"] > 0
    assert len(m["train_curve"]) == manifest["steps"] and m["effective_rank_mean"] > 1.0
    assert os.path.isdir(run.root / "models" / "S" / "kl_anchor") and m["kl_after"] > 0
    kinds = [e["kind"] for e in iter_events(run.events)]
    assert kinds.count("train_step") == manifest["steps"] and kinds[-1] == "consolidated"
    # idempotent: a second call returns the published version untouched
    stamp = (out / "manifest.json").stat().st_mtime_ns
    assert consolidate(run, "S", 1, v0, v0, CFG, None, device="cpu") == out
    assert (out / "manifest.json").stat().st_mtime_ns == stamp
    # round 2 from v1 replays round 1 (stored as "shared") and names its parent
    atomic.write_parquet(run.traces("S", 2), trace.to_table(rows(2, "S")))
    out2 = consolidate(run, "S", 2, out, v0, CFG, None, device="cpu", seed=0)
    m2 = json.loads((out2 / "manifest.json").read_text())
    d2 = json.loads((out2 / "dataset.json").read_text())
    assert m2["parent_version"] == 1 and d2["replay"] == 2 and d2["sources"] == {"2": "S", "1": "shared"}
    assert [r["round"] for r in pq.read_table(run.metrics("consolidate")).to_pylist()] == [1, 2]


def test_arm_f_with_nothing_beyond_the_noise_publishes_the_parent_unchanged(v0, tmp_path):
    run = new_run(tmp_path)
    out = consolidate(run, "F", 1, v0, v0, CFG, {"mean": 1.3, "std": 0.5}, device="cpu")
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["trained"] and not (out / "adapter").exists()
    a, b = load_file(out / "model.safetensors"), load_file(v0 / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


RESUME = """
import sys
from pathlib import Path
from rfs.config import ConsolidateCfg
from rfs.consolidate import consolidate
from rfs.events import EventLog
from rfs.rundir import RunDir
run, v0 = RunDir(Path(sys.argv[1])), Path(sys.argv[2])
cfg = ConsolidateCfg(**{**%r, "target_modules": tuple(%r)})
consolidate(run, "S", 1, v0, v0, cfg, None, events=EventLog(run.events), device="cpu", seed=0)
"""


def test_a_kill_mid_fit_resumes_by_refitting_from_the_parent(v0, tmp_path):
    cfg = dataclasses.replace(CFG, epochs=12.0)
    killed = new_run(tmp_path / "killed")
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "target_modules"}
    script = RESUME % (fields, list(cfg.target_modules))
    proc = subprocess.Popen([sys.executable, "-c", script, str(killed.root), str(v0)],
                            env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"})
    while proc.poll() is None and not any(e["kind"] == "train_step" and e["step"] >= 3 for e in iter_events(killed.events)):
        time.sleep(0.05)
    assert proc.poll() is None, "the fit finished before it could be killed; raise epochs"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    final = killed.model("S", 1)
    assert not final.exists()  # no half model under the real name
    assert any(p.name.endswith(".partial") for p in final.parent.iterdir())
    out = consolidate(killed, "S", 1, v0, v0, cfg, None, device="cpu", seed=0)
    assert not any(p.name.endswith(".partial") for p in final.parent.iterdir())
    clean = new_run(tmp_path / "clean")
    ref = consolidate(clean, "S", 1, v0, v0, cfg, None, device="cpu", seed=0)
    a, b = load_file(out / "model.safetensors"), load_file(ref / "model.safetensors")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (out, ref))
    assert ma["dataset_sha256"] == mb["dataset_sha256"] and ma["steps"] == mb["steps"]
    assert ma["loss_after"] == pytest.approx(mb["loss_after"], abs=1e-6)


def test_held_out_traces_are_the_rounds_own_and_never_trained():
    from rfs.consolidate.round import split

    ex = [dataset.Example(f"c{i}", 2, [1, 2], [-100, 2]) for i in range(5)] + [dataset.Example("old", 1, [1, 2], [-100, 2])]
    train, val, same = split(ex, selected=5)
    assert not same and [e.rollout_id for e in val] == ["c3"]
    assert not {e.rollout_id for e in val} & {e.rollout_id for e in train} and "old" in {e.rollout_id for e in train}
    assert split(ex[:2], selected=2)[1] == [ex[1]]  # two traces: one is held out
    assert split(ex[:1], selected=1)[2]  # one trace: nothing to hold out, and the row says so


def _adapted(v0: Path, dtype: torch.dtype) -> torch.nn.Module:
    """The tiny model with LoRA whose B is random (a fresh adapter's B is zero: nothing to merge)."""
    model = fit.lora(AutoModelForCausalLM.from_pretrained(v0, dtype=dtype), CFG, seed=0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.1)
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_layer_by_layer_merge_equals_peft_merge_and_unload_without_an_fp32_model(v0, monkeypatch, dtype):
    reference = _adapted(v0, dtype).float().merge_and_unload()  # peft's merge on a whole fp32 copy (the old way)
    model = _adapted(v0, dtype)
    biggest = max(p.numel() for p in model.parameters())

    def no_whole_model(*a, **k):
        raise AssertionError("the merge built a whole-model copy")

    upcasts: list[int] = []
    to_fp32 = torch.Tensor.float
    monkeypatch.setattr(torch.nn.Module, "float", no_whole_model)
    monkeypatch.setattr(torch.nn.Module, "state_dict", no_whole_model)
    monkeypatch.setattr(torch.Tensor, "float", lambda t: upcasts.append(t.numel()) or to_fp32(t))
    merged = round_mod.merge(model)
    monkeypatch.undo()
    assert upcasts and max(upcasts) <= biggest  # one tensor at a time in fp32, none bigger than a weight
    assert not any("lora" in n for n, _ in merged.named_parameters())
    got, want = dict(merged.named_parameters()), dict(reference.named_parameters())
    assert got.keys() == want.keys()
    for name, w in want.items():
        assert got[name].dtype == dtype
        torch.testing.assert_close(got[name], w.to(dtype), atol=1e-6, rtol=1e-6)  # the same fp32 sums, rounded once


def test_load_spreads_the_base_by_a_device_map_only_when_given_budgets(v0):
    assert fit.load_kwargs("cpu", None) == {"dtype": torch.float32}
    assert fit.load_kwargs("cuda", None) == {"dtype": torch.bfloat16}
    budgets = {0: 70 << 30, 1: 70 << 30}
    assert fit.load_kwargs("cuda", budgets) == {"dtype": torch.bfloat16, "device_map": "auto", "max_memory": budgets}
    assert fit.device_gib("cpu", 4) == []  # no GPU: the estimate is printed, not checked
    # the device-map path loads for real on the CPU, and the budget reaches the map: one too small
    # for the model sends it past the CPU (to disk), which a plain load never does
    model, _ = fit.load(v0, "cpu", {"cpu": 1 << 30})
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    tight, _ = fit.load(v0, "cpu", {"cpu": 1 << 10})
    assert "disk" in tight.hf_device_map.values()
    plain, _ = fit.load(v0, "cpu")
    assert not hasattr(plain, "hf_device_map")


def test_the_fit_memory_estimate_is_printed_and_recorded_before_the_fit(v0, tmp_path, capsys):
    run = new_run(tmp_path / "run")
    events = EventLog(run.events)
    try:
        budgets = round_mod.fit_memory(v0, CFG, "cpu", events, "shared", 1)
    finally:
        events.close()
    assert budgets is None  # one device
    out = capsys.readouterr().out
    assert "rfs: shared round 1: fit memory (estimate):" in out and "on each of 1 device(s)" in out
    (event,) = [e for e in iter_events(run.events) if e["kind"] == "fit_memory"]
    assert event["loop"] == "shared" and event["devices"] == 1 and event["total_gib"] > 0


def test_without_gradient_checkpointing_the_round_fits_by_shared_prefix_steps(v0, tmp_path):
    """The embedded default's fit: the round's common opening computed once per step, and it teaches
    (held-out loss falls) as the packed fit does."""
    run = new_run(tmp_path)
    cfg = dataclasses.replace(CFG, gradient_checkpointing=False)
    steps = fit.batches([e for e in dataset.examples_of(AutoTokenizer.from_pretrained(v0), rows(), "S", None)], cfg,
                        "pack" if cfg.gradient_checkpointing else "prefix")
    assert all(isinstance(b, prefix.PrefixBatch) for b in steps) and any(b.prefix > 0 for b in steps)
    out = consolidate(run, "S", 1, v0, v0, cfg, None, device="cpu", seed=0)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["trained"] and manifest["loss_after"] < manifest["loss_before"]
