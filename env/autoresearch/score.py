"""Scores a model handed over by autoresearch's train.py (started by rfs's autoresearch runner in
its own process, with the checkout's interpreter): `python score.py PRISTINE_DIR MODEL_DIR`.

Loads MODEL_DIR/model.pt2 (a torch.export graph of model(x, y, reduction='none'): none of
train.py's code), checks that it is a causal language model's loss, then runs the pristine
evaluate_bpb from PRISTINE_DIR/prepare.py on it. Prints one JSON line: {"val_bpb": float} or
{"violation": why} or {"error": why}.
"""

import json
import math
import os
import sys

import torch


def causality_error(model, batch_size: int, seq_len: int, vocab: int, device: str) -> str:
    """'' if the per-token loss is a causal model's -log p(target): at positions <= t it ignores
    every later token and every other row, it depends on the target, and over all targets it sums
    to one probability; else why."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randint(0, vocab, shape, generator=g).to(device)  # noqa: E731
    x, y = rand(batch_size, seq_len), rand(batch_size, seq_len)
    base = model(x, y).view(batch_size, seq_len).float()
    scale = 1e-4 * (1 + base.abs().max().item())
    for t in sorted({0, seq_len // 2, seq_len - 2}):
        x2, y2 = x.clone(), y.clone()
        x2[:, t + 1 :], y2[:, t + 1 :] = rand(batch_size, seq_len - t - 1), rand(batch_size, seq_len - t - 1)
        diff = (model(x2, y2).view(batch_size, seq_len)[:, : t + 1].float() - base[:, : t + 1]).abs().max().item()
        if not diff <= scale:
            return f"the loss at position {t} changes by {diff:.3g} when later tokens change"
    if batch_size > 1:
        x2 = x.clone()
        x2[1:] = rand(batch_size - 1, seq_len)
        diff = (model(x2, y).view(batch_size, seq_len)[0].float() - base[0]).abs().max().item()
        if not diff <= scale:
            return f"row 0's loss changes by {diff:.3g} when other rows change"
    # -log p over every target at one position must sum to probability 1: a loss that is not a
    # normalised prediction (a constant, a shrunken one) fails here.
    pos, total = seq_len // 2, 0.0
    for first in range(0, vocab, batch_size):
        ids = torch.arange(first, first + batch_size)
        ys = y.clone()
        ys[:, pos] = ids.clamp(max=vocab - 1).to(device)
        loss = model(x[:1].expand(batch_size, -1).contiguous(), ys).view(batch_size, seq_len)[:, pos].float()
        total += torch.exp(-loss.cpu())[ids < vocab].sum().item()
    if not abs(total - 1.0) <= 1e-3:
        return f"the loss is not a normalised prediction: its probabilities over the vocabulary sum to {total:.4g}"
    return ""


def main(pristine: str, model_dir: str) -> dict:
    sys.path.insert(0, pristine)
    import prepare  # noqa: PLC0415  the pristine copy, found only once its directory is on the path

    try:
        with open(os.path.join(model_dir, "model.json")) as f:
            info = json.load(f)
        batch_size, device = int(info["batch_size"]), str(info["device"])
        program = torch.export.load(os.path.join(model_dir, "model.pt2")).module()
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return {"error": f"no loadable model: {type(exc).__name__}: {exc}"}

    class Loaded(torch.nn.Module):
        def forward(self, x, y, reduction="none"):
            return program(x.to(device), y.to(device))

    model = Loaded()
    tokenizer = prepare.Tokenizer.from_directory()
    try:
        with torch.no_grad():
            why = causality_error(model, batch_size, prepare.MAX_SEQ_LEN, tokenizer.get_vocab_size(), device)
        if why:
            return {"violation": f"causality check failed: {why}"}
        bpb = float(prepare.evaluate_bpb(model, tokenizer, batch_size))
    except Exception as exc:  # the model itself failed to run: the edit's fault
        return {"error": f"the exported model failed to run: {type(exc).__name__}: {exc}"}
    return {"val_bpb": bpb} if math.isfinite(bpb) else {"error": f"val_bpb is {bpb}"}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
