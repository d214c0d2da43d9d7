"""`python -m rfs.serve.served_logits GGUF IN.json OUT.json`: llama.cpp's next-token log-probabilities
for fixed token sequences, from the GGUF file the server loads, in a child process.

A child, because llama.cpp can crash its process (ggml's extra CPU buffers segfault on AMX CPUs;
rfs.serve.no_extra_buffers turns them off here as in the server) and the caller is the loop itself.
IN: {"prompts": [[ids...], ...]}; OUT (.npy): [prompts, vocab] log-softmax of the next token.
"""

import json
import sys

import numpy as np

from rfs.serve import no_extra_buffers

no_extra_buffers.apply()


def main(gguf: str, inp: str, out: str) -> None:
    from llama_cpp import Llama  # after the patch above: every load starts from the safe params

    spec = json.loads(open(inp).read())
    width = max(len(p) for p in spec["prompts"]) + 8
    llm = Llama(gguf, n_threads=1, n_ctx=width, logits_all=True, verbose=False)
    rows = []
    for ids in spec["prompts"]:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[len(ids) - 1], dtype=np.float64)
        logp = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
        rows.append(logp)
    np.save(out, np.stack(rows))


if __name__ == "__main__":
    main(*sys.argv[1:4])
