"""What fits: a chat that outgrows the served window is counted before it is sent (or refused by the
server with a 400) and recorded as the researcher's context_overflow, never as an infra_error for
the wave to retry; reads of a long train.py are bounded, numbered line ranges. The scripted
researcher (a test double) serves over loopback."""

from __future__ import annotations

import json
import re

import anyio
import pytest

from rfs.agent import ContextOverflow, ResearcherClient, ServerRejected, rollout
from rfs.agent.rollout import READ_CHARS
from rfs.agent.client import CHARS_PER_TOKEN, context_window, request_tokens
from rfs.config import ResearcherCfg, VllmCfg
from rfs.serve.llamacpp import N_CTX
from rfs.trace import validate
from tests.scripted_researcher import Refuse, ScriptedResearcher, action
from tests.test_agent import never, spec

MAX_TOKENS = 512


def cfg_with_window(window: int) -> ResearcherCfg:
    return ResearcherCfg(backend="vllm", action_space="code", max_turns=8, max_tokens=MAX_TOKENS, turn_timeout_s=30.0,
                         vllm=VllmCfg(max_model_len=window))


def play(plan: list, cfg: ResearcherCfg) -> tuple[dict, list[dict]]:
    async def go():
        with ScriptedResearcher({100: plan}) as server:
            async with ResearcherClient(server.base_url, "scripted", cfg) as client:
                return await rollout(spec(100), cfg, client, never), server.requests

    row, requests = anyio.run(go)
    validate(row)
    return row, requests


def first_chat_tokens() -> int:
    """The estimate for the opening request (system + first user message)."""
    row, requests = play([action("finish")], cfg_with_window(10**6))
    return request_tokens(requests[0]["messages"], "", None)


def test_a_long_chat_is_a_context_overflow_and_is_never_sent():
    opening = first_chat_tokens()
    window = opening + MAX_TOKENS + 1500  # room for the opening and a little more, not for many reads
    reads = [action("read", "look again", path="train.py")] * 8
    row, requests = play(reads, cfg_with_window(window))
    assert row["status"] == "context_overflow", row["detail"]
    assert "window of" in row["detail"] and row["exit_code"] is None
    assert 1 <= len(requests) < 8  # the over-long request never reached the server
    assert all(request_tokens(r["messages"], "", None) + MAX_TOKENS <= window for r in requests)
    assert row["turns"] == len(requests)


def test_the_servers_400_for_a_too_long_prompt_is_a_context_overflow():
    too_long = Refuse(400, "This model's maximum context length is 32768 tokens. However, you requested 40000 tokens.")
    row, requests = play([action("read", "look", path="train.py"), too_long], cfg_with_window(10**6))
    assert row["status"] == "context_overflow" and "too long" in row["detail"]
    assert len(requests) == 2


def test_another_400_is_still_a_rejected_request_for_the_wave():
    bad = Refuse(400, "unknown field 'grammar'")
    with pytest.raises(ServerRejected) as err:
        play([bad], cfg_with_window(10**6))
    assert not isinstance(err.value, ContextOverflow)


def test_the_window_is_the_served_one_and_the_estimate_errs_long():
    assert context_window(ResearcherCfg(backend="vllm", vllm=VllmCfg(max_model_len=4096))) == 4096
    assert context_window(ResearcherCfg(backend="llamacpp")) == N_CTX
    assert context_window(ResearcherCfg(backend="external")) == 0  # unknown: only the server's 400 tells
    messages = [{"role": "user", "content": "x" * 1000}]
    estimate, bound = request_tokens(messages, "", None), request_tokens(messages, "", None, upper=True)
    assert estimate >= 1000 / CHARS_PER_TOKEN and bound >= 1000 and estimate <= bound


def test_the_count_uses_the_researchers_tokenizer_when_there_is_one(tmp_path):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer  # train extra

    from tests import tiny_model

    model_dir = tiny_model.build(tmp_path / "tiny")
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    messages = [{"role": "system", "content": "You edit train.py."}, {"role": "user", "content": tiny_model.TRAIN_PY * 4}]
    exact = len(tok(tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"])
    assert exact != request_tokens(messages, "", None)  # else this test could not tell the two counts apart
    for window, fits in ((exact + MAX_TOKENS, True), (exact + MAX_TOKENS - 1, False)):
        client = ResearcherClient("http://127.0.0.1:9", "tiny", cfg_with_window(window), model_dir=model_dir)
        if fits:
            client.check_fits(messages, MAX_TOKENS)
        else:
            with pytest.raises(ContextOverflow):
                client.check_fits(messages, MAX_TOKENS)


BIG_PY = "".join(f"x_{i} = {i}  # line {i} of a long train.py\n" for i in range(1, 631))


def test_reads_of_a_long_file_are_numbered_ranges_and_bounded(tmp_path):
    cfg = cfg_with_window(10**6)
    plan = [action("read", "the middle", path="train.py", start=100, end=160), action("read", "all of it", path="train.py"),
            action("read", "past the end", path="train.py", start=700, end=710), action("finish")]

    async def go():
        with ScriptedResearcher({100: plan}) as server:
            async with ResearcherClient(server.base_url, "scripted", cfg) as client:
                return await rollout(spec(100, start=BIG_PY), cfg, client, never)

    row = anyio.run(go)
    validate(row)
    middle, whole, past = [m["content"] for m in row["messages"] if m["role"] == "user"][1:4]
    assert "train.py lines 100..160 of 630" in middle
    assert " 100| x_100 = 100  #" in middle and " 160| x_160" in middle and "x_99 " not in middle and "x_161 " not in middle
    last = int(re.search(r"lines 1\.\.(\d+) of 630", whole).group(1))
    assert 1 < last < 630 and f"Lines {last + 1}..630 are not shown" in whole and f"x_{last + 1} " not in whole
    assert f"x_{last} = " in whole and len(whole) <= READ_CHARS + 200
    assert "has 630 lines" in past
    assert not any("content" in b["properties"] for b in json.loads(row["response_schema"])["anyOf"])
    assert '"content"' not in row["messages"][0]["content"]  # the prompt offers no whole-file edit of this file
