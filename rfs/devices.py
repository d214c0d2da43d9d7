"""Which device a LoRA fit runs on, decided without loading torch unless the answer needs it."""

from __future__ import annotations


def pick_device(device: str) -> str:
    """`device` as configured; "auto" is CUDA when there is a GPU, else the CPU."""
    if device != "auto":
        return device
    import torch  # the optional `train` extra, and slow to import: only "auto" needs it

    return "cuda" if torch.cuda.is_available() else "cpu"
