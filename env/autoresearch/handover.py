"""Runs autoresearch's edited train.py so that the model leaves it (started by rfs's autoresearch
runner inside sandbox.py): `python handover.py train.py`, in a working directory holding the pristine
prepare.py. Before train.py's first line, two of prepare's functions are replaced in the module
train.py will import them from:

- make_dataloader(..., "train") tells the runner when the first batch is drawn (its training clock
  starts); the validation split is refused (and the file itself is hidden by the sandbox);
- evaluate_bpb(model, tokenizer, batch_size) evaluates nothing: it exports model(x, y,
  reduction='none') with torch.export to model.pt2, tells the runner, and waits to be killed. A
  separate process scores that graph with the pristine evaluate_bpb. A train.py that bypasses this
  (its own evaluator, a number it prints) hands no model over and scores nothing.
"""

import json
import os
import runpy
import sys
import time

FD = int(os.environ["RFS_HANDOVER_FD"])
_write = os.write  # bound before train.py could replace os.write

sys.path.insert(0, os.getcwd())
import prepare  # noqa: E402  the pristine copy the runner put here

_make_dataloader = prepare.make_dataloader


def make_dataloader(tokenizer, B, T, split, *args, **kwargs):
    if split != "train":
        raise PermissionError("harness: train.py gets the training split only; the harness evaluates")
    batches = _make_dataloader(tokenizer, B, T, split, *args, **kwargs)
    first = next(batches)
    _write(FD, b"1")  # the first batch is drawn: the runner's training clock starts
    yield first
    yield from batches


def evaluate_bpb(model, tokenizer, batch_size):
    import torch  # noqa: PLC0415  train.py has imported it already

    class Scored(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x, y):
            return self.inner(x, y, reduction="none")

    inner = getattr(model, "_orig_mod", model)  # a torch.compile'd model: export the module itself
    device = next(inner.parameters()).device
    example = torch.zeros(batch_size, prepare.MAX_SEQ_LEN, dtype=torch.long, device=device)
    with torch.no_grad():
        program = torch.export.export(Scored(inner).eval(), (example, example.clone()))  # two inputs, not one aliased
    torch.export.save(program, "model.pt2")
    caller = sys._getframe(1).f_globals  # train.py's own counts, for the record only
    steps = caller.get("step", 0)
    vram = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else 0.0
    with open("model.json", "w") as f:
        json.dump({"batch_size": batch_size, "device": str(device),
                   "num_steps": steps if isinstance(steps, int) else 0, "peak_vram_mb": vram}, f)
    _write(FD, b"2")  # handed over: the runner stops its clock and ends this process
    time.sleep(3600)


prepare.make_dataloader, prepare.evaluate_bpb = make_dataloader, evaluate_bpb

if __name__ == "__main__":
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
