"""vLLM on GPU nodes: the command line is a pure function; vllm itself is never imported here.

vLLM often lives in its own environment (it pins its own torch), so rfs runs its `vllm` command
rather than importing it, and only when a server is actually started.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import anyio

from rfs.config import VllmCfg
from rfs.serve.base import ServerError
from rfs.serve.process import ProcessServer


def vllm_argv(model: Path | str, model_id: str, port: int, cfg: VllmCfg, seed: int = 0,
              temperature: float = 1.0) -> list[str]:
    """`--generation-config vllm` keeps the model's generation_config.json (repetition penalty,
    top-k) out of sampling: a repetition penalty works against copying exact `search` text. The
    sampling rfs intends is then set explicitly, repetition penalty 1.0 included."""
    sampling = {"temperature": temperature, "top_p": cfg.top_p, "repetition_penalty": 1.0}
    return [
        cfg.executable, "serve", str(model),
        "--served-model-name", model_id,
        "--host", "127.0.0.1", "--port", str(port),
        "--tensor-parallel-size", str(cfg.tensor_parallel),
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--seed", str(seed),
        "--generation-config", "vllm",
        "--override-generation-config", json.dumps(sampling),
        *cfg.extra_args,
    ]


class VllmServer(ProcessServer):
    backend = "vllm"
    health_path = "/health"
    start_timeout_s = 1200.0  # a cold start loads weights and compiles CUDA graphs

    def __init__(self, *args, vllm: VllmCfg, seed: int = 0, temperature: float = 1.0,
                 gpus: tuple[int, ...] = (), **kwargs):
        super().__init__(*args, **kwargs)
        self.vllm, self.seed, self.temperature, self.gpus = vllm, seed, temperature, gpus

    def argv(self, served: Path, model_id: str) -> list[str]:
        return vllm_argv(served, model_id, self.port, self.vllm, self.seed, self.temperature)

    async def before_launch(self) -> None:
        """Start only once the GPUs' memory is back: vLLM refuses a GPU without
        gpu_memory_utilization of it free, and a killed server's memory is freed late."""
        reason = await gpus_free(self.gpus, self.vllm.gpu_memory_utilization)
        if reason:
            self._emit("gpu_wait_skipped", reason=reason)


def _free_fraction(gpus: tuple[int, ...]) -> dict[int, float] | None:
    """Each GPU's free memory as a fraction of its total, from nvidia-smi; None without it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.free,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    free = {}
    for line in out.stdout.splitlines():
        index, mib_free, mib_total = (int(float(x)) for x in line.split(","))
        free[index] = mib_free / max(1, mib_total)
    return {g: free.get(g, 0.0) for g in gpus}


async def gpus_free(gpus: tuple[int, ...], need: float, timeout_s: float = 300.0, poll_s: float = 1.0) -> str:
    """Wait until every GPU in `gpus` has `need` of its memory free. Returns "" once it has, or the
    reason the wait was skipped (no GPUs placed, no nvidia-smi); a ServerError after `timeout_s`."""
    if not gpus:
        return "no GPUs placed for this server"
    deadline = time.monotonic() + timeout_s
    while True:
        free = await anyio.to_thread.run_sync(_free_fraction, gpus)
        if free is None:
            return "nvidia-smi is not here to say when the GPUs are free"
        short = {g: f for g, f in free.items() if f < need}
        if not short:
            return ""
        if time.monotonic() > deadline:
            g, f = next(iter(short.items()))
            raise ServerError(f"GPU {g} still has only {f:.0%} of its memory free after {timeout_s:.0f} s, vLLM "
                              f"needs {need:.0%}; find what holds it with nvidia-smi")
        await anyio.sleep(poll_s)
