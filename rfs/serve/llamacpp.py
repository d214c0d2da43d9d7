"""The embedded researcher server: llama-cpp-python's OpenAI server on a few CPU cores.

Chosen over `transformers serve` because it enforces a JSON schema (`response_format` compiled to
a grammar) and decodes faster on CPU in less memory. It serves GGUF,
so each model directory is converted once (cached by weights hash) before it is loaded.
"""

from __future__ import annotations

import sys
from pathlib import Path

from rfs.serve.convert import ensure_gguf
from rfs.serve.process import ProcessServer

N_CTX = 8192  # SmolLM2's trained context; its KV cache is small beside the weights


def llamacpp_argv(gguf: Path, model_id: str, port: int, threads: int, n_ctx: int = N_CTX) -> list[str]:
    return [
        sys.executable, "-m", "rfs.serve.llamacpp_main",  # llama_cpp.server, made safe on AMX CPUs
        "--model", str(gguf), "--model_alias", model_id,
        "--host", "127.0.0.1", "--port", str(port),
        "--n_threads", str(threads), "--n_threads_batch", str(threads),
        "--n_ctx", str(n_ctx), "--verbose", "False",
        # Parallel rollouts share one server: by default a new request cuts a streaming one short.
        "--interrupt_requests", "False",
    ]


class LlamaCppServer(ProcessServer):
    backend = "llamacpp"
    start_timeout_s = 120.0

    def __init__(self, *args, threads: int = 1, **kwargs):
        super().__init__(*args, **kwargs)
        self.threads = threads

    def prepare(self, model_dir: Path) -> Path:
        return model_dir if model_dir.suffix == ".gguf" else ensure_gguf(model_dir)

    def argv(self, served: Path, model_id: str) -> list[str]:
        return llamacpp_argv(served, model_id, self.port, self.threads)
