"""STAND-IN for karpathy/autoresearch's train.py, for CPU tests only; not upstream's code.

Upstream's layout: imports from prepare, a block of module-level hyperparameters, the model, a
training loop that stops at TIME_BUDGET of its own clock, then evaluate_bpb and upstream's summary.
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from prepare import MAX_SEQ_LEN, TIME_BUDGET, Tokenizer, evaluate_bpb, make_dataloader

t_start = time.time()

# ---------------------------------------------------------------------------
# Hyperparameters (edit these directly, no CLI flags needed)
# ---------------------------------------------------------------------------

# Model architecture
MODEL_DIM = 32          # embedding width
N_HEAD = 2              # attention heads

# Optimization
LEARNING_RATE = 3e-3    # AdamW learning rate
WEIGHT_DECAY = 0.0      # AdamW weight decay
WARMUP_RATIO = 0.0      # fraction of the budget spent warming up

# Model size
DEPTH = 8               # number of transformer layers
DEVICE_BATCH_SIZE = 8   # rows per step

torch.manual_seed(42)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(MODEL_DIM), nn.LayerNorm(MODEL_DIM)
        self.qkv, self.proj = nn.Linear(MODEL_DIM, 3 * MODEL_DIM), nn.Linear(MODEL_DIM, MODEL_DIM)
        self.mlp = nn.Sequential(nn.Linear(MODEL_DIM, 4 * MODEL_DIM), nn.GELU(), nn.Linear(4 * MODEL_DIM, MODEL_DIM))

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in self.qkv(self.ln1(x)).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab_size):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, MODEL_DIM)
        self.pos = nn.Embedding(MAX_SEQ_LEN, MODEL_DIM)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.ln = nn.LayerNorm(MODEL_DIM)
        self.head = nn.Linear(MODEL_DIM, vocab_size, bias=False)

    def forward(self, idx, targets=None, reduction="mean"):
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), reduction=reduction)


tokenizer = Tokenizer.from_directory()
model = GPT(tokenizer.get_vocab_size())
print(f"Model config: {{'n_layer': {DEPTH}, 'n_embd': {MODEL_DIM}, 'n_head': {N_HEAD}}}")  # as upstream prints its config
optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
train_loader = make_dataloader(tokenizer, DEVICE_BATCH_SIZE, MAX_SEQ_LEN, "train")
x, y, epoch = next(train_loader)
print(f"Time budget: {TIME_BUDGET}s")

step, total_training_time = 0, 0.0
while total_training_time < TIME_BUDGET:
    t0 = time.time()
    progress = total_training_time / TIME_BUDGET
    for group in optimizer.param_groups:
        group["lr"] = LEARNING_RATE * (min(1.0, progress / WARMUP_RATIO) if WARMUP_RATIO > 0 else 1.0)
    loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    x, y, epoch = next(train_loader)
    total_training_time += time.time() - t0
    step += 1
    print(f"\rstep {step:05d} | loss: {loss.item():.3f}    ", end="", flush=True)
print()

model.eval()
val_bpb = evaluate_bpb(model, tokenizer, DEVICE_BATCH_SIZE)
t_end = time.time()
print("---")
print(f"val_bpb:          {val_bpb:.6f}")
print(f"training_seconds: {total_training_time:.1f}")
print(f"total_seconds:    {t_end - t_start:.1f}")
print(f"peak_vram_mb:     {0.0:.1f}")
print(f"mfu_percent:      {0.0:.2f}")
print(f"total_tokens_M:   {step * DEVICE_BATCH_SIZE * MAX_SEQ_LEN / 1e6:.1f}")
print(f"num_steps:        {step}")
print(f"num_params_M:     {sum(p.numel() for p in model.parameters()) / 1e6:.1f}")
print(f"depth:            {DEPTH}")
