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


def ensure_gguf(model_dir: Path, out: Path | None = None, qtype: str = "q8_0") -> Path:
    """A GGUF for a safetensors model directory, converted once per weights hash.

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
    print(f"rfs: converted {model_dir} to {out.name} in {time.monotonic() - t0:.1f} s")
    return out
