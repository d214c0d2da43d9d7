"""The code-skill probe: small Python functions unrelated to the research task, hidden tests.

The researcher is asked once per task (`ask(prompt) -> reply text`, the loop supplies the client)
for a JSON reply {"code": "..."}. The code runs in a sandboxed subprocess (own temp dir, isolated
interpreter, rlimits, wall-clock timeout, whole process group killed) that only ever sees the
hidden cases' *inputs*: it writes what the function returned, and this process compares with the
expected outputs. Code that tampers with the runner or prints fake results therefore gains nothing.
"""

from __future__ import annotations

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
from typing import TYPE_CHECKING, Any, Callable

import anyio.from_thread
import anyio.to_thread

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
    with tempfile.TemporaryDirectory(prefix="rfs-code-probe-") as tmp:
        work = Path(tmp)
        (work / "solution.py").write_text(code)
        (work / "runner.py").write_text(_RUNNER)
        (work / "cases.json").write_text(json.dumps([args for args, _ in task.cases]))
        with open(work / "stderr.txt", "wb") as err:  # a file, not a pipe a background child could hold open
            proc = subprocess.Popen(
                [sys.executable, "-I", "runner.py", task.name, str(case_timeout_s)],
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
            return TaskScore(task.name, 0, len(task.cases), f"timed out after {timeout_s:g} s")
        finally:
            _killpg_quietly(proc.pid)  # the runner, or stragglers it left in the background
            proc.wait()
        try:
            results = json.loads((work / "results.json").read_text())
        except (OSError, json.JSONDecodeError):
            tail = (work / "stderr.txt").read_text(errors="replace").strip().splitlines()[-1:]
            return TaskScore(task.name, 0, len(task.cases), f"no results: {(tail or [f'exit {proc.returncode}'])[0][:200]}")
    return _compare(task, results)


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
