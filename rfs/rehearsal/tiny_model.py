"""STAND-IN researcher weights: a tiny random Llama-shaped model, built in-process without any hub
(the tests' model, and the one `rfs rehearse` serves and fits).

A byte-level BPE is trained on a few KB of text that looks like the traces (JSON actions, logs,
Python), wrapped in a fast tokenizer with a ChatML template like SmolLM2's, and saved beside a
randomly initialised LlamaForCausalLM (hidden 64, 2 layers). Seconds on CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def _corpus() -> list[str]:
    action = {"thought": "lower the learning rate", "action": "set", "name": "lr", "value": 0.001}
    lines = [
        json.dumps(action),
        "<val_bpb=0.943 status=success steps=940> <val_bpb=nan status=crash steps=0>",
        "def train(model, data, lr=3e-4, steps=100):\n    for step in range(steps):\n        loss = model(data)\n",
        "val_bpb: 1.234\nsteps: 120\nstatus: success\n| step 10 loss 3.21\n| Traceback (most recent call last):",
        "You are a careful ML researcher. Edit train.py to lower val_bpb. Reply with one JSON action.",
        "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 {}[]()<>=:;,.'\"_-+*/\\|#!?",
    ]
    return lines * 20


def build(out: Path, vocab_size: int = 512, hidden: int = 64, layers: int = 2, seed: int = 0) -> Path:
    """Write a tiny model + tokenizer to `out` (a dir AutoModel/AutoTokenizer can load)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        initializer_range=0.2,  # peaked outputs, so a frozen head still lets LoRA move the loss and the KL
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out
