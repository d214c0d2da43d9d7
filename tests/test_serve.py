"""The researcher servers: a real llama.cpp server process on loopback, vLLM's command line, and
an external OpenAI-compatible service (the scripted researcher stands in for it)."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import anyio
import httpx
import pytest

from rfs import config
from rfs.events import EventLog, iter_events
from rfs.hosts import HostsFile, ServerCfg
from rfs.serve import ServerError, make_server, response_format
from rfs.serve.external import ExternalServer
from rfs.serve.llamacpp import LlamaCppServer
from rfs.serve.vllm import VllmServer, vllm_argv
from rfs.setup import embedded_gguf
from tests.scripted_researcher import ScriptedResearcher

pytest.importorskip("llama_cpp.server")
os.environ["HF_HUB_OFFLINE"] = "1"

ACTION = {
    "type": "object",
    "properties": {
        "thought": {"type": "string", "maxLength": 80},
        "name": {"type": "string", "enum": ["lr", "depth", "batch_size"]},
        "value": {"type": "number"},
    },
    "required": ["thought", "name", "value"],
    "additionalProperties": False,
}


def embedded_cfg(**over) -> config.ResearcherCfg:
    return config.load(overrides={"researcher": over} if over else None).researcher


async def ask(server, max_tokens: int = 48) -> dict:
    body = {
        "model": server.model_id,
        "messages": [{"role": "user", "content": "Choose one hyperparameter of train.py to change. Reply in JSON."}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "response_format": response_format("llamacpp", ACTION),
    }
    async with httpx.AsyncClient(timeout=120) as client:
        r = await client.post(server.base_url + "/chat/completions", json=body)
    r.raise_for_status()
    return r.json()


async def ask_streaming(server, max_tokens: int) -> tuple[str, str]:
    """Stream a free-text reply; returns (text, finish_reason)."""
    body = {"model": server.model_id, "messages": [{"role": "user", "content": "Tell a long story."}],
            "max_tokens": max_tokens, "temperature": 0.0, "stream": True}
    text, finish = "", ""
    async with httpx.AsyncClient(timeout=120) as client:
        async with client.stream("POST", server.base_url + "/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    choice = json.loads(line[6:])["choices"][0]
                    text += choice["delta"].get("content") or ""
                    finish = choice.get("finish_reason") or finish
    return text, finish


async def shared_by_two(server) -> tuple[tuple[str, str], dict]:
    """A streaming rollout and a second rollout asking while it streams."""
    out: dict = {}

    async def stream() -> None:
        out["stream"] = await ask_streaming(server, 40)

    async def second() -> None:
        await anyio.sleep(0.3)
        out["plain"] = await ask(server)

    async with anyio.create_task_group() as tg:
        tg.start_soon(stream)
        tg.start_soon(second)
    return out["stream"], out["plain"]


def test_llamacpp_serves_schema_survives_kill_and_restarts(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl")
    hosts = HostsFile(server=ServerCfg(cpus=(0,)))
    server = make_server(embedded_cfg(), hosts, embedded_gguf(), "A-S/v0", tmp_path / "server.log", events)
    assert isinstance(server, LlamaCppServer) and server.enforces_schema

    async def scenario() -> None:
        await server.start()
        try:
            assert await server.health()
            reply = await ask(server)
            assert reply["model"] == "A-S/v0"
            action = json.loads(reply["choices"][0]["message"]["content"])
            assert set(action) == {"thought", "name", "value"}
            assert action["name"] in ("lr", "depth", "batch_size") and isinstance(action["value"], (int, float))
            assert os.sched_getaffinity(server.pid) == {0}

            (text, finish), plain = await shared_by_two(server)
            assert finish == "length" and text  # not cut short by the second request
            assert json.loads(plain["choices"][0]["message"]["content"]) == action

            os.kill(server.pid, signal.SIGKILL)
            with anyio.fail_after(30):
                while "server_crashed" not in [e["kind"] for e in iter_events(events.path)]:
                    await anyio.sleep(0.05)
            assert not await server.health()
            with pytest.raises(httpx.ConnectError):
                await ask(server)

            old_url = server.base_url
            await server.restart(embedded_gguf(), "A-S/v1")
            assert server.base_url == old_url and await server.health()
            assert (await ask(server, max_tokens=16))["model"] == "A-S/v1"
        finally:
            await server.stop()
        assert not await server.health()

    anyio.run(scenario)
    kinds = [(e["kind"], e["version"]) for e in iter_events(events.path)]
    assert kinds == [("server_started", "A-S/v0"), ("server_crashed", "A-S/v0"),
                     ("server_restarted", "A-S/v1"), ("server_stopped", "A-S/v1")]
    crash = [e for e in iter_events(events.path) if e["kind"] == "server_crashed"][0]
    assert crash["exit_code"] == -signal.SIGKILL and crash["base_url"] == server.base_url


def test_llamacpp_start_failure_raises_with_the_log_tail(tmp_path: Path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    events = EventLog(tmp_path / "events.jsonl")
    server = make_server(embedded_cfg(), HostsFile(), bad, "A-S/v0", tmp_path / "server.log", events)
    with pytest.raises(ServerError, match="exited with") as err:
        anyio.run(server.start)
    assert str(tmp_path / "server.log") in str(err.value) and "gguf" in str(err.value).lower()
    assert not anyio.run(server.health)
    assert list(iter_events(events.path)) == []  # the caller got the error; it was never up to crash


def test_response_format_per_backend() -> None:
    assert response_format("llamacpp", ACTION) == {"type": "json_object", "schema": ACTION}
    vllm = response_format("vllm", ACTION)
    assert vllm["type"] == "json_schema" and vllm["json_schema"]["schema"] == ACTION and vllm["json_schema"]["strict"]
    with pytest.raises(ValueError, match="transformers"):
        response_format("transformers", ACTION)


def test_vllm_argv_has_every_flag() -> None:
    cfg = config.VllmCfg(executable="/opt/vllm-env/bin/vllm", top_p=0.95, tensor_parallel=4, max_model_len=16384,
                         gpu_memory_utilization=0.9, extra_args=("--enable-prefix-caching",))
    argv = vllm_argv(Path("/models/A-S/v2"), "A-S/v2", 8123, cfg, seed=7, temperature=0.8)
    assert argv[:3] == ["/opt/vllm-env/bin/vllm", "serve", "/models/A-S/v2"]
    flags = dict(zip(argv[3:-1:2], argv[4:-1:2]))
    sampling = json.loads(flags.pop("--override-generation-config"))
    assert flags == {"--served-model-name": "A-S/v2", "--host": "127.0.0.1", "--port": "8123",
                     "--tensor-parallel-size": "4", "--max-model-len": "16384",
                     "--gpu-memory-utilization": "0.9", "--seed": "7", "--generation-config": "vllm"}
    # the model's generation_config.json is not applied; rfs's own sampling is, with no repetition penalty
    assert sampling == {"temperature": 0.8, "top_p": 0.95, "repetition_penalty": 1.0}
    assert argv[-1] == "--enable-prefix-caching"


def test_make_server_places_vllm_on_the_server_gpus(tmp_path: Path) -> None:
    hosts = HostsFile(server=ServerCfg(gpus=(2, 3), port=8555))
    server = make_server(embedded_cfg(backend="vllm"), hosts, tmp_path, "A-S/v0", tmp_path / "vllm.log")
    assert isinstance(server, VllmServer)
    assert server.env["CUDA_VISIBLE_DEVICES"] == "2,3" and server.cpus == ()
    assert server.base_url == "http://127.0.0.1:8555/v1" and server.health_path == "/health"
    assert "vllm" not in __import__("sys").modules


def test_external_server_health_follows_the_service(tmp_path: Path) -> None:
    events = EventLog(tmp_path / "events.jsonl")
    with ScriptedResearcher({}) as service:
        cfg = embedded_cfg(backend="external", base_url=service.base_url + "/v1")
        server = make_server(cfg, HostsFile(), tmp_path, "CTRL/v0", tmp_path / "unused.log", events)
        assert isinstance(server, ExternalServer) and not server.enforces_schema
        anyio.run(server.start)
        assert anyio.run(server.health)
        service.kill()
        assert not anyio.run(server.health)
        with pytest.raises(ServerError, match="does not answer"):
            anyio.run(server.restart, tmp_path, "CTRL/v1")
    assert [e["kind"] for e in iter_events(events.path)] == ["server_started"]


CONTROLLER = """
import sys, anyio
from pathlib import Path
from rfs import config
from rfs.hosts import HostsFile
from rfs.serve import make_server
from rfs.setup import embedded_gguf

async def main():
    server = make_server(config.load().researcher, HostsFile(), embedded_gguf(), "v0", Path(sys.argv[1]))
    await server.start()
    print(server.pid, flush=True)
    await anyio.sleep(600)

anyio.run(main)
"""


def test_a_killed_controller_leaves_no_server(tmp_path: Path) -> None:
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    controller = subprocess.Popen([sys.executable, "-c", CONTROLLER, str(tmp_path / "server.log")], cwd=root,
                                  stdout=subprocess.PIPE, text=True)
    try:
        server_pid = int(controller.stdout.readline())
        os.kill(server_pid, 0)  # alive while the controller is
    finally:
        controller.kill()
        controller.wait()

    async def gone() -> None:
        with anyio.fail_after(30):
            while Path(f"/proc/{server_pid}").exists() and "Z" not in _state(server_pid):
                await anyio.sleep(0.05)

    anyio.run(gone)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return "Z"
