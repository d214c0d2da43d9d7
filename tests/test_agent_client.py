"""The researcher client over real loopback HTTP to the scripted researcher (the test double)."""

from __future__ import annotations

import json
import os

import anyio
import pytest

from rfs.agent.client import ResearcherClient, ServerDown, ServerRejected
from rfs.config import ResearcherCfg
from tests.scripted_researcher import DIE, ScriptedResearcher, action

os.environ.setdefault("HF_HUB_OFFLINE", "1")
SCHEMA = {"type": "object", "properties": {"thought": {"type": "string", "maxLength": 50}}, "additionalProperties": False}
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "go"}]


def act(client: ResearcherClient, seed: int = 100, prefill: str = ""):
    async def go():
        async with client:
            return await client.act(MESSAGES, SCHEMA, max_tokens=64, temperature=0.5, seed=seed, prefill=prefill)

    return anyio.run(go)


@pytest.mark.parametrize("backend, kind", [("llamacpp", "json_object"), ("vllm", "json_schema")])
def test_reply_usage_and_the_backends_schema_field(backend, kind):
    with ScriptedResearcher({100: [action("run")]}) as server:
        reply = act(ResearcherClient(server.base_url, "m", ResearcherCfg(backend=backend)))
        (body,) = server.requests
    assert json.loads(reply.text)["action"] == "run"
    assert reply.prompt_tokens > 0 and reply.completion_tokens > 0 and reply.enforced
    assert body["response_format"]["type"] == kind and body["seed"] == 100 and body["max_tokens"] == 64


def test_external_backend_is_not_counted_as_enforced():
    with ScriptedResearcher({100: [action("run")]}) as server:
        cfg = ResearcherCfg(backend="external", base_url=server.base_url)
        assert not act(ResearcherClient(server.base_url, "m", cfg)).enforced


def test_vllm_prefill_continues_the_final_assistant_message():
    stamp = "<val_bpb=0.950 status=success steps=900>"
    with ScriptedResearcher({100: [action("run")]}) as server:
        reply = act(ResearcherClient(server.base_url, "m", ResearcherCfg(backend="vllm")), prefill=stamp)
        (body,) = server.requests
    assert body["messages"][-1] == {"role": "assistant", "content": stamp}
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert not reply.text.startswith("<val_bpb")


def test_llamacpp_prefill_renders_the_models_own_template(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hi": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
    PreTrainedTokenizerFast(tokenizer_object=tok, chat_template=template).save_pretrained(tmp_path)
    stamp = "<val_bpb=0.950 status=success steps=900>"
    with ScriptedResearcher({100: [action("run")]}) as server:
        client = ResearcherClient(server.base_url, "m", ResearcherCfg(backend="llamacpp"), model_dir=tmp_path)
        reply = act(client, prefill=stamp)
        (body,) = server.requests
    assert body["prompt"] == "<|system|>be brief\n<|user|>go\n<|assistant|>" + stamp
    assert "root ::=" in body["grammar"] and "messages" not in body
    assert json.loads(reply.text)["action"] == "run"


def test_a_killed_server_is_server_down_not_the_researchers_fault():
    with ScriptedResearcher({100: [DIE]}) as server:
        client = ResearcherClient(server.base_url, "m", ResearcherCfg(backend="llamacpp"))
        with pytest.raises(ServerDown):
            act(client)
        server.kill()
        with pytest.raises(ServerDown, match="ConnectError"):  # nothing listens any more
            act(ResearcherClient(server.base_url, "m", ResearcherCfg(backend="llamacpp")))


def test_a_4xx_is_a_clear_rejection(tmp_path):
    with ScriptedResearcher({}) as server:
        client = ResearcherClient(server.base_url + "/nowhere", "m", ResearcherCfg(backend="vllm"))
        with pytest.raises(ServerRejected, match="HTTP 404"):
            act(client)


def test_llamacpp_with_its_template_sends_every_request_the_same_way_prefill_or_not(tmp_path):
    """One request path for every line: arm S's prefilled requests and CTRL's plain ones are both
    rendered with the model's template and sent to /completions, differing only by the stamp."""
    test_llamacpp_prefill_renders_the_models_own_template(tmp_path)  # writes the tokenizer to tmp_path
    stamp = "<val_bpb=0.950 status=success steps=900>"
    with ScriptedResearcher({100: [action("run")], 200: [action("run")]}) as server:
        client = ResearcherClient(server.base_url, "m", ResearcherCfg(backend="llamacpp"), model_dir=tmp_path)
        plain, stamped = act(client), act(client, seed=200, prefill=stamp)
        bodies = server.requests
    assert [("prompt" in b, "messages" in b) for b in bodies] == [(True, False), (True, False)]
    assert bodies[1]["prompt"] == bodies[0]["prompt"] + stamp and bodies[0]["grammar"] == bodies[1]["grammar"]
    assert json.loads(plain.text)["action"] == json.loads(stamped.text)["action"] == "run"
