"""Serving the researcher over the OpenAI chat API: llama.cpp (embedded), vLLM, or external."""

from __future__ import annotations

from pathlib import Path

from rfs.config import ResearcherCfg
from rfs.events import EventLog
from rfs.hosts import HostsFile
from rfs.serve.base import Server, ServerError, free_port, response_format
from rfs.serve.external import ExternalServer
from rfs.serve.llamacpp import LlamaCppServer
from rfs.serve.vllm import VllmServer

__all__ = ["Server", "ServerError", "make_server", "response_format"]


def make_server(cfg: ResearcherCfg, hosts: HostsFile, model_dir: Path, model_id: str, log_path: Path,
                events: EventLog | None = None, seed: int = 0, gpus: tuple[int, ...] | None = None,
                port: int = 0) -> Server:
    """A server for `model_dir` named `model_id`; nothing starts until `await server.start()`.

    `gpus` and `port` are the server's place in rfs.placement; by default all of [server] gpus
    and its port (a lone server)."""
    if cfg.backend == "external":
        return ExternalServer(cfg.base_url, model_id, cfg.api_key_env, events)
    port = port or hosts.server.port or free_port()
    gpus = hosts.server.gpus if gpus is None else gpus
    if cfg.backend == "llamacpp":
        threads = cfg.threads or len(hosts.server.cpus) or 1
        return LlamaCppServer(model_dir, model_id, port, log_path, events, cpus=hosts.server.cpus,
                              env={"HF_HUB_OFFLINE": "1"}, threads=threads)
    if cfg.backend == "vllm":
        env = {"CUDA_VISIBLE_DEVICES": ",".join(map(str, gpus))} if gpus else {}
        return VllmServer(model_dir, model_id, port, log_path, events, env=env, vllm=cfg.vllm, seed=seed,
                          temperature=cfg.temperature, gpus=gpus)
    raise ServerError(f"researcher.backend {cfg.backend!r}: set it to llamacpp, vllm or external")
