"""The KL anchor to V0: V0's next-token distributions on fixed prompts, computed once and stored.

Stored per loop in models/<loop>/kl_anchor/ (anchor.safetensors + anchor.json): for each prompt, its
token ids and V0's top-k log-probabilities at every position. The KL is taken over k+1 buckets
(the top-k tokens and "everything else"), a true KL that is zero when the model still matches V0
there and that sees mass leaking out of V0's top-k, at a bounded storage cost (k=32).
The anchor is up to cfg.kl_prompts distinct replies of the first round consolidated (V0's own
samples): each entry is a trace's conversation up to one valid reply, whole (nothing cut), and the
KL is taken only on the reply's positions (from `starts[i]` on): the distributions the researcher
acts from, not the prompt text it never generates.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rfs import atomic
from rfs.consolidate.publish import partial, publish

TOP_K = 32


@dataclass(frozen=True)
class Anchor:
    input_ids: torch.Tensor  # [N, L] (right-padded; `lengths` says how much is real)
    lengths: torch.Tensor  # [N]
    starts: torch.Tensor  # [N] the first position whose KL counts (0: all; an older anchor has none)
    top_idx: torch.Tensor  # [N, L, K]
    top_logp: torch.Tensor  # [N, L, K] V0's log-probabilities

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def bucket_kl(logits: torch.Tensor, top_idx: torch.Tensor, top_logp: torch.Tensor) -> torch.Tensor:
    """KL(V0 ‖ model) per position over the top-k buckets plus the rest. logits: [..., V]."""
    logq = torch.log_softmax(logits.float(), dim=-1).gather(-1, top_idx)
    p = top_logp.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(1e-8)
    q_rest = (1 - logq.exp().sum(-1)).clamp_min(1e-8)
    return (p * (top_logp - logq)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())


@torch.no_grad()
def compute(model: torch.nn.Module, prompts: list[list[int]], device: str, starts: list[int] | None = None) -> Anchor:
    keep = [i for i, p in enumerate(prompts) if p]
    starts = [starts[i] if starts else 0 for i in keep]
    prompts = [prompts[i] for i in keep]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, : len(p)] = torch.tensor(p)
    top_idx, top_logp = [], []
    for i, p in enumerate(prompts):
        logits = model(input_ids=ids[i : i + 1, : len(p)].to(device), use_cache=False).logits[0].float()
        logp, idx = torch.log_softmax(logits, -1).topk(TOP_K, dim=-1)
        pad = width - len(p)
        top_idx.append(torch.nn.functional.pad(idx.cpu(), (0, 0, 0, pad)))
        top_logp.append(torch.nn.functional.pad(logp.cpu(), (0, 0, 0, pad), value=-1e4))
    return Anchor(ids, torch.tensor([len(p) for p in prompts]), torch.tensor(starts), torch.stack(top_idx), torch.stack(top_logp))


def save(anchor: Anchor, directory: Path, v0_dir: Path) -> None:
    """Written to a temp dir then renamed, like a model: a half anchor never looks complete."""
    tmp = partial(directory)
    tensors = {"input_ids": anchor.input_ids, "lengths": anchor.lengths, "starts": anchor.starts,
               "top_idx": anchor.top_idx, "top_logp": anchor.top_logp}
    save_file(tensors, tmp / "anchor.safetensors")
    distinct = len({tuple(anchor.input_ids[i, : int(n)].tolist()) for i, n in enumerate(anchor.lengths)})
    atomic.write_json(tmp / "anchor.json", {"v0": str(v0_dir), "prompts": len(anchor), "distinct": distinct, "top_k": TOP_K,
                                            "kl_positions": int(sum(int(n) - int(s) for n, s in zip(anchor.lengths, anchor.starts)))})
    publish(tmp, directory)


def load(directory: Path) -> Anchor | None:
    if not (directory / "anchor.json").exists():
        return None
    t = load_file(directory / "anchor.safetensors")
    starts = t.get("starts", torch.zeros_like(t["lengths"]))
    return Anchor(t["input_ids"], t["lengths"], starts, t["top_idx"], t["top_logp"])


def kl_on(model: torch.nn.Module, anchor: Anchor, i: int, device: str) -> torch.Tensor:
    """Mean KL over anchor entry i's reply positions (with grad when the caller trains)."""
    n, s = int(anchor.lengths[i]), int(anchor.starts[i])
    logits = model(input_ids=anchor.input_ids[i : i + 1, :n].to(device), use_cache=False).logits[0, s:n]
    return bucket_kl(logits, anchor.top_idx[i, s:n].to(device), anchor.top_logp[i, s:n].to(device)).mean()


@torch.no_grad()
def kl_all(model: torch.nn.Module, anchor: Anchor, device: str) -> float:
    return sum(float(kl_on(model, anchor, i, device)) for i in range(len(anchor))) / max(1, len(anchor))
