"""STAND-IN for karpathy/autoresearch's prepare.py, for CPU tests only; not upstream's code.

It keeps upstream's file contract, which rfs's autoresearch runner relies on: the fixed constants
(MAX_SEQ_LEN, TIME_BUDGET, EVAL_TOKENS), CACHE_DIR/DATA_DIR under ~/.cache/autoresearch, a pinned
validation file (VAL_FILENAME), Tokenizer.from_directory(), make_dataloader(tokenizer, B, T, split)
yielding (x, y, epoch), get_token_bytes() and evaluate_bpb(model, tokenizer, batch_size), which
scores model(x, y, reduction='none'). The data is raw bytes (a BOS token added), taken from rfs's
built-in environment's Shakespeare splits: `python prepare.py --from DIR` copies DIR/{train,val}.bin.
"""

import argparse
import math
import os
import shutil

import torch

MAX_SEQ_LEN = 64
TIME_BUDGET = 2  # training seconds
EVAL_TOKENS = 16 * 8 * MAX_SEQ_LEN

CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "autoresearch")
DATA_DIR = os.path.join(CACHE_DIR, "data")
TOKENIZER_DIR = os.path.join(CACHE_DIR, "tokenizer")
TRAIN_FILENAME = "train.bin"
VAL_FILENAME = "val.bin"
BOS = 256


class Tokenizer:
    def __init__(self, vocab_size):
        self.vocab_size = vocab_size

    @classmethod
    def from_directory(cls, tokenizer_dir=TOKENIZER_DIR):
        return cls(BOS + 1)

    def get_vocab_size(self):
        return self.vocab_size

    def get_bos_token_id(self):
        return BOS


def get_token_bytes(device="cpu"):
    counts = torch.ones(BOS + 1, dtype=torch.int32, device=device)
    counts[BOS] = 0  # the special token has no bytes
    return counts


def make_dataloader(tokenizer, B, T, split):
    """Training: random windows, forever. Validation: consecutive windows from the start."""
    assert split in ("train", "val")
    with open(os.path.join(DATA_DIR, TRAIN_FILENAME if split == "train" else VAL_FILENAME), "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    g = torch.Generator().manual_seed(0)
    step, epoch = 0, 1
    while True:
        if split == "train":
            starts = torch.randint(0, len(data) - T - 1, (B,), generator=g)
        else:
            starts = (torch.arange(B) + step * B) * T
        rows = torch.stack([data[s : s + T + 1] for s in starts.tolist()])
        step += 1
        yield rows[:, :-1].contiguous(), rows[:, 1:].contiguous(), epoch


@torch.no_grad()
def evaluate_bpb(model, tokenizer, batch_size):
    """Bits per byte over EVAL_TOKENS validation tokens: summed nats / summed target bytes / ln 2."""
    token_bytes = get_token_bytes()
    val_loader = make_dataloader(tokenizer, batch_size, MAX_SEQ_LEN, "val")
    total_nats, total_bytes = 0.0, 0
    for _ in range(EVAL_TOKENS // (batch_size * MAX_SEQ_LEN)):
        x, y, _ = next(val_loader)
        loss = model(x, y, reduction="none").view(-1)
        nbytes = token_bytes[y.view(-1)]
        total_nats += (loss * (nbytes > 0)).sum().item()
        total_bytes += nbytes.sum().item()
    return total_nats / (math.log(2) * total_bytes)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description="stand-in data preparation: copy rfs's built-in splits")
    p.add_argument("--from", dest="source", required=True, help="a directory with train.bin and val.bin")
    args = p.parse_args()
    os.makedirs(DATA_DIR, exist_ok=True)
    for name in (TRAIN_FILENAME, VAL_FILENAME):
        shutil.copyfile(os.path.join(args.source, name), os.path.join(DATA_DIR, name))
    print(f"stand-in data ready at {DATA_DIR}")
