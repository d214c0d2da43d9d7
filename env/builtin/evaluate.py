"""The trusted evaluator: `python evaluate.py WORKDIR` (started by harness.py in its own process).

Runs from the pristine env directory, loads the exported model (graph + weights, none of
train.py's code), checks causality, then scores bits-per-byte on the fixed validation slice.
Prints one JSON line: {"val_bpb": float} or {"violation": why} or {"error": why}.
"""

import json
import os
import sys

import torch

import prepare


def main(workdir: str) -> dict:
    try:
        with open(os.path.join(workdir, "model.json")) as f:
            seq_len = int(json.load(f)["seq_len"])
        model = prepare.load_model(os.path.join(workdir, "model.pt2"))
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        return {"error": f"no loadable model: {type(exc).__name__}: {exc}"}
    try:
        why = prepare.causality_error(model, seq_len)
        if why:
            return {"violation": f"causality check failed: {why}"}
        return {"val_bpb": prepare.evaluate_bpb(model, seq_len)}
    except Exception as exc:  # the model itself failed to run: the edit's fault
        return {"error": f"the exported model failed to run: {type(exc).__name__}: {exc}"}


if __name__ == "__main__":
    torch.set_num_threads(int(os.environ.get("RFS_THREADS", "1")))
    print(json.dumps(main(sys.argv[1])))
