# --- HYPERPARAMETERS: the researcher may change these values within the declared ranges ---
LEARNING_RATE = 3e-3  # range: [1e-4, 3e-2]
MIN_LR_FRACTION = 0.1  # range: [0.0, 1.0]
BATCH_SIZE = 16  # range: [1, 128]
SEQ_LEN = 128  # range: [16, 512]
DEPTH = 2  # range: [1, 12]
N_EMBD = 128  # range: [16, 512]
N_HEAD = 4  # range: [1, 16]
WARMUP_STEPS = 20  # range: [0, 1000]
WEIGHT_DECAY = 0.1  # range: [0.0, 0.5]
SCHEDULE = "cosine"  # choices: [cosine, linear, constant]
DROPOUT = 0.0  # range: [0.0, 0.5]
GRAD_CLIP = 1.0  # range: [0.0, 10.0]
SEED = 1337  # range: [0, 1000000]
# --- END HYPERPARAMETERS ---
"""A small byte-level GPT, trained for a fixed wall-clock budget. The harness evaluates the saved model."""

import math
import os
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare

BUDGET = float(os.environ.get("RFS_TIME_BUDGET", "30"))
DEVICE = os.environ.get("RFS_DEVICE", "cpu")
torch.set_num_threads(int(os.environ.get("RFS_THREADS", "1")))
torch.manual_seed(SEED)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1 = nn.LayerNorm(N_EMBD)
        self.qkv = nn.Linear(N_EMBD, 3 * N_EMBD)
        self.proj = nn.Linear(N_EMBD, N_EMBD)
        self.ln2 = nn.LayerNorm(N_EMBD)
        self.mlp = nn.Sequential(nn.Linear(N_EMBD, 4 * N_EMBD), nn.GELU(), nn.Linear(4 * N_EMBD, N_EMBD))
        self.drop = nn.Dropout(DROPOUT)

    def attend(self, x):
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # causal: no peeking ahead
        return self.proj(y.transpose(1, 2).reshape(B, T, C))

    def forward(self, x):
        x = x + self.drop(self.attend(self.ln1(x)))
        return x + self.drop(self.mlp(self.ln2(x)))


class GPT(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(prepare.VOCAB_SIZE, N_EMBD)
        self.pos = nn.Embedding(SEQ_LEN, N_EMBD)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.ln = nn.LayerNorm(N_EMBD)
        self.head = nn.Linear(N_EMBD, prepare.VOCAB_SIZE, bias=False)
        self.tok.weight = self.head.weight  # tied embeddings
        for m in self.modules():  # small init: PyTorch's default N(0, 1) embeddings drown the signal
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, idx):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def lr_at(step, progress):
    """Linear warmup, then decay by the fraction of the time budget used."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    if SCHEDULE == "cosine":
        decay = 0.5 * (1 + math.cos(math.pi * progress))
    elif SCHEDULE == "linear":
        decay = 1 - progress
    else:
        decay = 1.0
    return LEARNING_RATE * (MIN_LR_FRACTION + (1 - MIN_LR_FRACTION) * decay)


data = prepare.train_bytes()
model = GPT().to(DEVICE)
decay = [p for p in model.parameters() if p.dim() >= 2]
no_decay = [p for p in model.parameters() if p.dim() < 2]
groups = [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}]
optimizer = torch.optim.AdamW(groups, lr=LEARNING_RATE, betas=(0.9, 0.95))
print(f"params: {sum(p.numel() for p in model.parameters()):,}  budget: {BUDGET:.0f}s  device: {DEVICE}")


def batch():
    ix = torch.randint(len(data) - SEQ_LEN - 1, (BATCH_SIZE,))
    chunk = torch.stack([data[i : i + SEQ_LEN + 1] for i in ix]).long().to(DEVICE)
    return chunk[:, :-1], chunk[:, 1:]


step, tokens, start = 0, 0, time.time()
model.train()
while (elapsed := time.time() - start) < BUDGET:
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, elapsed / BUDGET)
    x, y = batch()
    loss = F.cross_entropy(model(x).view(-1, prepare.VOCAB_SIZE), y.reshape(-1))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if GRAD_CLIP > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    step, tokens = step + 1, tokens + x.numel()
    if step % 50 == 0:
        print(f"step {step:5d} | loss {loss.item():.4f} | bpb {loss.item() / math.log(2):.3f} | {elapsed:.1f}s")

prepare.save_model(model, SEQ_LEN, steps=step, tokens=tokens, training_seconds=time.time() - start)
print(f"done: {step} steps, {tokens:,} tokens")
