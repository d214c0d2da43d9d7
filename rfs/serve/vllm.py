"""vLLM on GPU nodes: the command line is a pure function; vllm itself is never imported here.

vLLM often lives in its own environment (it pins its own torch), so rfs runs its `vllm` command
rather than importing it, and only when a server is actually started.
"""

from __future__ import annotations

from pathlib import Path

from rfs.config import VllmCfg
from rfs.serve.process import ProcessServer


def vllm_argv(model: Path | str, model_id: str, port: int, cfg: VllmCfg, seed: int = 0,
              executable: str = "vllm") -> list[str]:
    return [
        executable, "serve", str(model),
        "--served-model-name", model_id,
        "--host", "127.0.0.1", "--port", str(port),
        "--tensor-parallel-size", str(cfg.tensor_parallel),
        "--max-model-len", str(cfg.max_model_len),
        "--gpu-memory-utilization", str(cfg.gpu_memory_utilization),
        "--seed", str(seed),
        *cfg.extra_args,
    ]


class VllmServer(ProcessServer):
    backend = "vllm"
    health_path = "/health"
    start_timeout_s = 1200.0  # a cold start loads weights and compiles CUDA graphs

    def __init__(self, *args, vllm: VllmCfg, seed: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self.vllm, self.seed = vllm, seed

    def argv(self, served: Path, model_id: str) -> list[str]:
        return vllm_argv(served, model_id, self.port, self.vllm, self.seed)
