"""`rfs setup` and the safetensors → GGUF converter, checked against the shipped GGUF itself,
transformers' GGUF loader and a real llama.cpp server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

os.environ["HF_HUB_OFFLINE"] = "1"

gguf = pytest.importorskip("gguf")

from rfs.serve.base import free_port  # noqa: E402
from rfs.serve import convert  # noqa: E402
from rfs.serve.convert import ConvertError, ensure_gguf, gguf_name, rope_permute  # noqa: E402
from rfs.serve.llamacpp import LlamaCppServer  # noqa: E402
from rfs.setup import MANIFEST, SetupError, embedded_gguf, setup_embedded  # noqa: E402
from tests import tiny_model  # noqa: E402

PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one sentence."}]


@pytest.fixture(scope="module")
def shipped() -> "gguf.GGUFReader":
    return gguf.GGUFReader(embedded_gguf())  # parsing its 49k-token vocabulary takes seconds: once


def test_tensor_names_follow_llama_cpp(shipped) -> None:
    assert gguf_name("model.embed_tokens.weight") == "token_embd.weight"
    assert gguf_name("model.norm.weight") == "output_norm.weight"
    assert gguf_name("lm_head.weight") == "output.weight"
    assert gguf_name("model.layers.12.self_attn.o_proj.weight") == "blk.12.attn_output.weight"
    assert gguf_name("model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert gguf_name("model.layers.3.mlp.down_proj.weight") == "blk.3.ffn_down.weight"
    names = {gguf_name(f"model.layers.0.{p}.weight") for p in
             ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
              "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "post_attention_layernorm")}
    assert names == {t.name for t in shipped.tensors if t.name.startswith("blk.0.")}
    with pytest.raises(ConvertError, match="rotary_emb"):
        gguf_name("model.layers.0.self_attn.rotary_emb.inv_freq")


def test_rope_permutation_inverts_what_transformers_undoes(shipped) -> None:
    """The shipped q/k are in llama.cpp's order; transformers reverses that, we must redo it."""
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    tensors = {t.name: t for t in shipped.tensors}
    undo = LlamaTensorProcessor(config={"num_attention_heads": 9, "num_key_value_heads": 3})._reverse_permute_weights
    for name, heads, kv in (("blk.5.attn_q.weight", 9, 9), ("blk.5.attn_k.weight", 9, 3)):
        t = tensors[name]
        in_file = gguf.quants.dequantize(t.data, t.tensor_type)
        as_hf = undo(in_file, heads, kv)
        assert not np.array_equal(as_hf, in_file)
        np.testing.assert_array_equal(rope_permute(as_hf, kv), in_file)


def test_a_model_of_another_shape_is_refused(tmp_path: Path) -> None:
    model = tiny_model.build(tmp_path / "tiny")
    out = tmp_path / "tiny.gguf"
    with pytest.raises(ConvertError, match="llama.block_count=30"):
        ensure_gguf(model, out)
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))


def test_a_directory_without_weights_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SetupError, match="no \\*.safetensors"):
        ensure_gguf(tmp_path)
    with pytest.raises(SetupError, match="not a model directory"):
        ensure_gguf(tmp_path / "missing")


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("RFS_CACHE")
    os.environ["RFS_CACHE"] = str(cache)
    try:
        yield setup_embedded()
    finally:
        if old is None:
            os.environ.pop("RFS_CACHE")
        else:
            os.environ["RFS_CACHE"] = old


@pytest.mark.slow
def test_setup_writes_a_loadable_model_once(embedded: Path, capsys: pytest.CaptureFixture) -> None:
    manifest = json.loads((embedded / MANIFEST).read_text())
    assert manifest["source"] == str(embedded_gguf())
    assert {"config.json", "model.safetensors", "tokenizer.json", MANIFEST} <= {p.name for p in embedded.iterdir()}
    stamp = (embedded / "model.safetensors").stat().st_mtime_ns
    assert setup_embedded() == embedded
    assert "up to date" in capsys.readouterr().out
    assert (embedded / "model.safetensors").stat().st_mtime_ns == stamp


def greedy_transformers(model_dir: Path, max_new_tokens: int) -> tuple[str, np.ndarray, list[int]]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = tok.apply_chat_template(PROMPT, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits[0, -1].numpy()
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True), logits, ids[0].tolist()


async def greedy_served(server: LlamaCppServer, max_tokens: int) -> str:
    body = {"model": server.model_id, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0.0}
    async with httpx.AsyncClient(timeout=120) as client:
        reply = (await client.post(server.base_url + "/chat/completions", json=body)).json()
    return reply["choices"][0]["message"]["content"]


@pytest.mark.slow
def test_round_trip_serves_what_the_original_and_transformers_say(embedded: Path, tmp_path: Path) -> None:
    converted = ensure_gguf(embedded)
    stamp = converted.stat().st_mtime_ns
    assert ensure_gguf(embedded) == converted and converted.stat().st_mtime_ns == stamp  # cached by hash

    server = LlamaCppServer(embedded_gguf(), "v0-shipped", free_port(), tmp_path / "server.log", threads=1)

    async def both() -> tuple[str, str]:
        await server.start()
        try:
            original = await greedy_served(server, 24)
            await server.restart(embedded, "v0-converted")  # a model dir: served via its GGUF
            return original, await greedy_served(server, 24)
        finally:
            await server.stop()

    original, round_trip = anyio.run(both)
    reference, hf_logits, prompt_ids = greedy_transformers(embedded, 24)
    assert "Paris" in original
    assert round_trip == original
    assert reference.strip() == round_trip.strip()

    # Logits of an f16 conversion agree with transformers to f16 precision.
    from llama_cpp import Llama

    f16 = ensure_gguf(embedded, tmp_path / "v0-f16.gguf", qtype="f16")
    llm = Llama(str(f16), n_threads=1, n_ctx=256, logits_all=True, verbose=False)
    llm.eval(prompt_ids)
    cpp_logits = np.asarray(llm.scores[len(prompt_ids) - 1])
    assert int(cpp_logits.argmax()) == int(hf_logits.argmax())
    assert float(np.abs(cpp_logits - hf_logits).max()) < 0.1


def test_served_vs_merged_figures_flag_a_changed_top1_or_a_shifted_logp() -> None:
    ref = np.log(np.full((2, 20), 1 / 20.0))
    ref[:, 3] += 1.0
    ok = convert.compare(ref, ref + 0.001)
    assert ok["top1_agree"] == 2 and ok["max_dlogp"] == pytest.approx(0.001)
    moved = ref.copy()
    moved[1, 5] += 2.0  # a new top-1 on prompt 1
    bad = convert.compare(ref, moved)
    assert bad["top1_agree"] == 1 and bad["max_dlogp"] > convert.MAX_DLOGP


@pytest.mark.slow
def test_served_equals_trained_passes_a_real_conversion_and_fails_a_corrupted_one(embedded: Path, tmp_path: Path,
                                                                                    capsys: pytest.CaptureFixture) -> None:
    import shutil

    from safetensors.torch import load_file, save_file

    good = ensure_gguf(embedded, tmp_path / "v.gguf")  # f16, checked on the way
    assert "served = trained: top-1 4/4" in capsys.readouterr().out
    figures = convert.check_served(embedded, good)
    assert figures["top1_agree"] == figures["prompts"] and figures["max_dlogp"] <= convert.MAX_DLOGP
    # corrupted weights: one layer's MLP output scaled by 1.5
    bad_dir = tmp_path / "corrupted"
    shutil.copytree(embedded, bad_dir)
    weights = load_file(bad_dir / "model.safetensors")
    weights["model.layers.10.mlp.down_proj.weight"] = weights["model.layers.10.mlp.down_proj.weight"] * 1.5
    save_file(weights, bad_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(convert.ServedMismatch, match="does not serve"):
        convert.check_served(embedded, convert.hf_to_gguf(bad_dir, embedded_gguf(), tmp_path / "bad.gguf"))  # a bad GGUF
    with pytest.raises(convert.ServedMismatch, match="does not serve"):
        ensure_gguf(embedded, tmp_path / "v-q8.gguf", qtype="q8_0")  # q8_0 does not pass: never served
    assert not (tmp_path / "v-q8.gguf").exists()
