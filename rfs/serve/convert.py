"""Write a Llama-architecture safetensors model as GGUF for the llama.cpp server.

Every researcher version is a fine-tune of one GGUF model, so its metadata (hyperparameters,
tokenizer vocabulary and merges, special ids, chat template) is copied from that template file;
only the weights are new. Tensors get llama.cpp's names, and q/k get the rotary permutation that
llama.cpp's own converter applies (transformers' GGUF loader undoes it on the way in).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rfs.config import cache_dir
from rfs.errors import RfsError
from rfs.setup import SetupError, embedded_gguf, weights_sha256

QTYPES = ("f16", "q8_0")

_LAYER = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


class ConvertError(RfsError, ValueError):
    """A model this converter cannot write as GGUF."""


class ServedMismatch(RfsError):
    """The GGUF llama.cpp would serve does not predict what the merged weights predict."""


# Served = trained: on these fixed conversations the GGUF's next-token distribution must match the
# merged weights' (transformers, fp32): the same top-1 token on every one, and log-probabilities of
# transformers' top CHECK_TOP_K tokens within MAX_DLOGP. Measured on SmolLM2-135M (docs/LOG.md):
# f16 passes (top-1 4/4, max 0.0085); q8_0 does not (top-1 3/4, max 0.38), so f16 is what is served.
CHECK_TOP_K = 10
MAX_DLOGP = 0.05
CHECK_PROMPTS = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You tune hyperparameters; lower val_bpb is better."},
     {"role": "user", "content": "train.py's val_bpb: 3.4750. The hyperparameters you may set:\n"
                                 "- LEARNING_RATE = 0.003 (float in [0.0001, 0.03])\n- BATCH_SIZE = 16 (int in [4, 64])\n\n"
                                 "Reply with your first action."}],
    [{"role": "user", "content": "Write one line of Python that prints the numbers 1 to 5."}],
    [{"role": "user", "content": "[observation] status: success\nval_bpb: 3.3120\nsteps: 410"}],
)


def gguf_name(hf_name: str) -> str:
    """llama.cpp's name for a transformers Llama tensor."""
    stem, _, suffix = hf_name.rpartition(".")
    if stem in _TOP:
        return f"{_TOP[stem]}.{suffix}"
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}.{suffix}"
    raise ConvertError(f"{hf_name}: not a Llama tensor this converter knows")


def rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Interleave each head's rotary halves the way llama.cpp's rope kernel expects."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _check_shape(config: dict, reader) -> None:
    """The template's hyperparameters must describe these weights, or the file would lie."""
    want = {
        "llama.block_count": config["num_hidden_layers"],
        "llama.embedding_length": config["hidden_size"],
        "llama.feed_forward_length": config["intermediate_size"],
        "llama.attention.head_count": config["num_attention_heads"],
        "llama.attention.head_count_kv": config.get("num_key_value_heads", config["num_attention_heads"]),
        "llama.vocab_size": config["vocab_size"],
    }
    for key, value in want.items():
        field = reader.get_field(key)
        have = field.contents() if field else None
        if have != value:
            raise ConvertError(f"template GGUF has {key}={have}, the model's config.json says {value}")
    if config.get("model_type") != "llama":
        raise ConvertError(f"model_type {config.get('model_type')!r}: only llama models convert")


def _load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.torch import load_file  # lazy: imports torch (the optional train extra)

    tensors: dict[str, np.ndarray] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        for name, t in load_file(shard).items():
            tensors[name] = t.float().numpy()
    if not tensors:
        raise ConvertError(f"{model_dir}: no *.safetensors weights")
    return tensors


def hf_to_gguf(model_dir: Path, template: Path, out: Path, qtype: str = "q8_0") -> Path:
    """Convert `model_dir` (config.json + safetensors) to `out`, written atomically."""
    import gguf  # lazy: the optional train extra, needed only to convert

    if qtype not in QTYPES:
        raise ConvertError(f"qtype {qtype!r}: expected one of {QTYPES}")
    model_dir, out = Path(model_dir), Path(out)
    config = json.loads((model_dir / "config.json").read_text())
    reader = gguf.GGUFReader(template)
    _check_shape(config, reader)
    n_head = config["num_attention_heads"]
    n_kv = config.get("num_key_value_heads", n_head)
    weights = _load_weights(model_dir)
    if config.get("tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)  # llama.cpp reuses token_embd when output is absent

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")  # unique per caller
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = gguf.GGUFWriter(tmp, "llama")
        _copy_metadata(reader, writer, qtype)
        for name, w in weights.items():
            if name.endswith("self_attn.q_proj.weight"):
                w = rope_permute(w, n_head)
            elif name.endswith("self_attn.k_proj.weight"):
                w = rope_permute(w, n_kv)
            _add_tensor(writer, gguf_name(name), w, qtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


def _copy_metadata(reader, writer, qtype: str) -> None:
    import gguf  # lazy: the optional train extra, needed only to convert

    for field in reader.fields.values():
        if field.name.startswith("GGUF.") or field.name in ("general.architecture", "general.file_type"):
            continue  # the writer adds these itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    q8 = gguf.LlamaFileType.MOSTLY_Q8_0
    writer.add_file_type(q8 if qtype == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)


def _add_tensor(writer, name: str, w: np.ndarray, qtype: str) -> None:
    import gguf  # lazy: the optional train extra, needed only to convert

    if w.ndim == 1:  # norms stay float32: llama.cpp requires it and they are tiny
        writer.add_tensor(name, w.astype(np.float32))
    elif qtype == "q8_0" and w.shape[-1] % 32 == 0:
        q8 = gguf.GGMLQuantizationType.Q8_0
        writer.add_tensor(name, gguf.quants.quantize(w.astype(np.float32), q8), raw_dtype=q8)
    else:
        writer.add_tensor(name, w.astype(np.float16))


def ensure_gguf(model_dir: Path, out: Path | None = None, qtype: str = "f16") -> Path:
    """A GGUF for a safetensors model directory, converted once per weights hash, and checked to
    serve what the weights predict (check_served: a mismatch raises and nothing is cached).

    A directory that already holds a .gguf file is served as is. The architecture, tokenizer and
    chat template come from the embedded GGUF: every version V_n is a fine-tune of that model.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise SetupError(f"{model_dir}: not a model directory; researcher.model must name one "
                         "(or be smollm2, after `python rfs.py setup`)")
    existing = sorted(model_dir.glob("*.gguf"))
    if existing and out is None:
        return existing[0]
    digest = weights_sha256(model_dir)
    out = Path(out) if out else cache_dir() / "gguf" / f"{digest[:20]}-{qtype}.gguf"
    if out.exists():
        return out
    t0 = time.monotonic()
    hf_to_gguf(model_dir, embedded_gguf(), out, qtype)
    try:
        figures = check_served(model_dir, out)
    except BaseException:
        out.unlink(missing_ok=True)  # never cached: the next try converts (and checks) again
        raise
    print(f"rfs: converted {model_dir} to {out.name} in {time.monotonic() - t0:.1f} s; served = trained: "
          f"top-1 {figures['top1_agree']}/{figures['prompts']}, max |dlogp| {figures['max_dlogp']:.4f} (<= {MAX_DLOGP})")
    return out


def check_prompts(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer  # lazy: the optional train extra

    tok = AutoTokenizer.from_pretrained(model_dir)
    return [tok(tok.apply_chat_template(list(m), tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
            for m in CHECK_PROMPTS]


def served_logp(gguf_path: Path, prompts: list[list[int]]) -> np.ndarray:
    """[prompts, vocab] next-token log-probabilities from llama.cpp on the GGUF (a child process)."""
    with tempfile.TemporaryDirectory() as d:
        inp, out = Path(d) / "in.json", Path(d) / "out.npy"
        inp.write_text(json.dumps({"prompts": prompts}))
        proc = subprocess.run([sys.executable, "-m", "rfs.serve.served_logits", str(gguf_path), str(inp), str(out)],
                              capture_output=True, text=True, timeout=600)
        if proc.returncode != 0 or not out.exists():
            raise ServedMismatch(f"{gguf_path.name}: llama.cpp could not evaluate it (exit {proc.returncode}: "
                                 f"{proc.stderr.strip()[-300:]}); delete it and convert again")
        return np.load(out)


def merged_logp(model_dir: Path, prompts: list[list[int]]) -> np.ndarray:
    import torch  # lazy: the optional train extra
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return np.stack([torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].double(), -1).numpy()
                         for p in prompts])


def compare(ref: np.ndarray, served: np.ndarray) -> dict[str, float]:
    """Top-1 agreement and max |Δ log p| over the reference's top-k, per prompt then overall."""
    n = min(ref.shape[1], served.shape[1])  # a GGUF vocabulary may be padded
    ref, served = ref[:, :n], served[:, :n]
    top = np.argsort(-ref, axis=1)[:, :CHECK_TOP_K]
    dlogp = np.abs(np.take_along_axis(ref, top, 1) - np.take_along_axis(served, top, 1))
    agree = int((ref.argmax(1) == served.argmax(1)).sum())
    return {"prompts": len(ref), "top1_agree": agree, "max_dlogp": float(dlogp.max()), "mean_dlogp": float(dlogp.mean())}


def check_served(model_dir: Path, gguf_path: Path) -> dict[str, float]:
    """Raise ServedMismatch unless the GGUF predicts what model_dir's weights predict (see MAX_DLOGP)."""
    prompts = check_prompts(model_dir)
    figures = compare(merged_logp(model_dir, prompts), served_logp(gguf_path, prompts))
    if figures["top1_agree"] < figures["prompts"] or figures["max_dlogp"] > MAX_DLOGP:
        raise ServedMismatch(
            f"{gguf_path.name} does not serve {model_dir}: top-1 agrees on {figures['top1_agree']}/{figures['prompts']} "
            f"fixed prompts, max |dlogp| over the top {CHECK_TOP_K} = {figures['max_dlogp']:.3f} (limit {MAX_DLOGP}); "
            "the conversion is wrong for these weights: check rfs/serve/convert.py against them")
    return figures
