"""One rollout: a ReAct conversation with the researcher around one training run → one trace row.

Each turn the researcher sends one structured action; the observation goes back as a user
message. In the hparams space the request offers only `set` until train.py has changed (the
row's response_schema is the full schema; the narrowed one is its `set` branches). `run` is syntax-checked with compile() first (a failure is an observation, up to
cfg.syntax_retries), then trained by the wave's `run_training`. After the run the researcher gets
one more turn to read the result, and the rollout ends.

How the status is decided (truthful, rfs/trace.py STATUSES):
- the run's own status whenever a run happened (a server failure after it only costs the last turn);
- `no_edit` when the researcher runs or finishes with train.py unchanged: the unchanged file is
  not trained, because its number would measure the start, not the researcher;
- an edit that was never run (finish, or out of turns) is run once, with no syntax retry left;
- `syntax_error` when the syntax retries ran out; `harness_violation` when the researcher
  insists (a second time) on editing anything but train.py; `agent_error` when no reply ever
  was a usable action;
- `context_overflow` when the chat outgrows the served context window before any run (counted
  before sending, or the server's 400 for a too-long prompt): the researcher's own limit, never
  retried; an unrun edit is left unrun, so the row says the window ended the session;
- any other researcher server failure (ServerDown, or ServerRejected for another 4xx) before any
  run is *raised*: the wave retries the rollout
  and, when its retries run out, writes the infra_error row itself (rfs/collect/wave.py).
"""

from __future__ import annotations

import difflib
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import anyio

from rfs.agent import hparams, prompts
from rfs.agent.actions import TRAIN_PY, Action, Invalid, code_caps, code_schema, hparams_schema, parse, whole_file_fits
from rfs.agent.client import ContextOverflow, Reply, ResearcherClient, ServerDown, ServerRejected
from rfs.config import ResearcherCfg
from rfs.envs.base import RunResult
from rfs.events import EventLog
from rfs.trace import new_row, text_sha256

STORED_INVALID_CHARS = 4000  # an invalid reply is kept (truncated) so the trace shows what went wrong
READ_LINES = 200  # one read shows at most this many lines (autoresearch's train.py is 630)
READ_CHARS = 8000  # … and at most this many characters: every read stays in the chat for good


@dataclass(frozen=True)
class RolloutSpec:
    experiment: str
    loop: str  # rfs.trace's vocabulary: "A-S" …, CTRL, FLOOR, SHARED, PROBE
    arc: str
    round: int
    version: int
    thread: int
    rollout_id: str
    seed: int
    start_train_py: str
    start_val_bpb: float  # NaN if unknown
    memory: str  # CTRL's in-context memory; "" otherwise
    conditioning_stamp: str  # arm S pre-fill; "" when unconditioned
    researcher_model: str
    researcher_weights_sha256: str
    env_name: str
    program_md: str
    seed_train_py_sha256: str
    program_md_sha256: str
    line: str = ""  # the loop's line; "" when the loop is its line's only replicate
    replicate: int = 0

    def columns(self) -> dict[str, Any]:
        """The trace columns this rollout's row takes from its spec, whatever became of it."""
        return {
            "experiment": self.experiment, "loop": self.loop, "line": self.line or self.loop, "replicate": self.replicate,
            "arc": self.arc, "round": self.round,
            "version": self.version, "thread": self.thread, "rollout_id": self.rollout_id, "seed": self.seed,
            "env": self.env_name, "program_md_sha256": self.program_md_sha256,
            "seed_train_py_sha256": self.seed_train_py_sha256, "start_train_py_sha256": text_sha256(self.start_train_py),
            "start_val_bpb": float(self.start_val_bpb), "researcher_model": self.researcher_model,
            "researcher_weights_sha256": self.researcher_weights_sha256,
            "conditioning_stamp": self.conditioning_stamp, "memory": self.memory,
        }


@dataclass(frozen=True)
class Executed:
    result: RunResult
    host: str
    slot: str
    gpu_type: str
    job_id: str
    infra_attempts: int
    blob_path: str


RunTraining = Callable[[str], Awaitable[Executed]]


@dataclass(frozen=True)
class _End:
    status: str
    detail: str


@dataclass
class _Tally:
    replies: list[Reply] = field(default_factory=list)
    valid: int = 0
    invalid: int = 0
    tool_calls: int = 0
    edit_attempts: int = 0
    syntax_failures: int = 0
    violations: int = 0
    researcher_seconds: float = 0.0


def _clean(text: str) -> str:
    """Valid UTF-8 for Parquet: a reply can carry lone surrogates decoded from JSON escapes."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _syntax(train_py: str) -> str:
    """'' when train.py compiles, else the error as the researcher should see it."""
    try:
        compile(train_py, TRAIN_PY, "exec")
    except SyntaxError as exc:
        return f"SyntaxError on line {exc.lineno}: {exc.msg}"
    except ValueError as exc:  # e.g. NUL bytes in the source
        return f"ValueError: {exc}"
    return ""


class _Rollout:
    def __init__(
        self,
        spec: RolloutSpec,
        cfg: ResearcherCfg,
        client: ResearcherClient,
        run_training: RunTraining,
        events: EventLog | None,
        wall_s: float,
    ):
        self.spec, self.cfg, self.client, self.run_training, self.events = spec, cfg, client, run_training, events
        self.space, self.wall_s = cfg.action_space, wall_s
        self.params = hparams.parse(spec.start_train_py) if self.space == "hparams" else ()
        # a whole-file edit is offered only where the file fits the reply budget (else it would be cut)
        self.whole_file = whole_file_fits(spec.start_train_py, cfg.max_tokens)
        self.caps = code_caps(cfg.max_tokens) if self.space == "code" else {}
        self.schema = (hparams_schema(self.params, cfg.max_tokens) if self.params
                       else code_schema(cfg.max_tokens, whole_file=self.whole_file))
        self.train_py = spec.start_train_py
        self.executed: Executed | None = None
        self.tally = _Tally()
        self.stopped = ""  # why the loop stopped early, for the row's detail
        system = prompts.system(spec.program_md, self.space, spec.memory, whole_file=self.whole_file)
        user = prompts.first_user(spec.start_train_py, self.space, spec.start_val_bpb)
        self.chat = [{"role": "system", "content": system}, {"role": "user", "content": user}]
        self.record = [{"role": m["role"], "content": m["content"], "reasoning": ""} for m in self.chat]

    async def play(self) -> _End:
        try:
            for turn in range(self.cfg.max_turns):
                if self.tally.researcher_seconds >= self.wall_s:
                    self.stopped = f" (stopped at the {self.wall_s:g} s cap on researcher time)"
                    break
                ran_before = self.executed is not None
                if end := await self._turn(turn):
                    return end
                if ran_before:
                    break
            return await self._close()
        except ContextOverflow as exc:
            if self.executed:
                return self._measured(f"; the chat outgrew the context window after the run: {exc}")
            return _End("context_overflow", str(exc))
        except (ServerDown, ServerRejected) as exc:  # the wave retries these (or records infra_error)
            if not self.executed:
                raise
            return self._measured(f"; the researcher server failed after the run: {exc}")

    async def _turn(self, turn: int) -> _End | None:
        reply = await self._ask()
        action = parse(reply.text, self.space, self.params, self.caps)
        valid = isinstance(action, Action)
        if self.events:
            kind = action.kind if valid else "invalid"
            s = self.spec
            self.events.emit("turn", loop=s.loop, round=s.round, rollout_id=s.rollout_id, turn=turn, action=kind, valid=valid)
        sent = reply.text if valid else reply.text[:STORED_INVALID_CHARS]
        self.chat.append({"role": "assistant", "content": self.spec.conditioning_stamp + sent})
        if isinstance(action, Invalid):
            self.tally.invalid += 1
            self.record.append({"role": "assistant", "content": _clean(sent), "reasoning": ""})
            return self._observe(f"invalid action: {action.reason}. Reply with exactly one JSON object.")
        self.tally.valid += 1
        self.record.append({"role": "assistant", "content": _clean(action.as_json()), "reasoning": _clean(action.thought)})
        if action.kind == "finish":
            return await self._finish()
        self.tally.tool_calls += 1
        if action.kind == "run":
            return await self._run(final=False)
        if action.kind == "read":
            return self._read(action)
        return self._edit(action)

    async def _ask(self) -> Reply:
        t0 = time.monotonic()
        try:
            with anyio.fail_after(self.cfg.turn_timeout_s):
                reply = await self.client.act(
                    self.chat,
                    self._request_schema(),
                    max_tokens=self.cfg.max_tokens,
                    temperature=self.cfg.temperature,
                    seed=(self.spec.seed + len(self.tally.replies)) % 2**31,
                    prefill=self.spec.conditioning_stamp,
                )
        except TimeoutError:
            raise ServerDown(f"no reply within turn_timeout_s={self.cfg.turn_timeout_s}") from None
        finally:
            self.tally.researcher_seconds += time.monotonic() - t0
        self.tally.replies.append(reply)
        return reply

    def _request_schema(self) -> dict[str, Any]:
        """In the hparams space nothing but `set` is offered until train.py has changed."""
        if self.params and self.train_py == self.spec.start_train_py:
            return hparams_schema(self.params, self.cfg.max_tokens, allow_stop=False)
        return self.schema

    def _observe(self, text: str) -> None:
        content = prompts.observe(_clean(text))
        self.chat.append({"role": "user", "content": content})
        self.record.append({"role": "user", "content": content, "reasoning": ""})

    def _read(self, action: Action) -> None:
        if action.path.removeprefix("./") != TRAIN_PY:
            return self._observe(f"{action.path!r} is not readable here: train.py is the only file (program.md is above).")
        lines = self.train_py.splitlines()
        if not action.start and len(lines) <= READ_LINES and len(self.train_py) <= READ_CHARS:
            return self._observe(f"train.py:\n```python\n{self.train_py}\n```")
        return self._observe(numbered(lines, action.start or 1, action.end or READ_LINES))

    def _edit(self, action: Action) -> _End | None:
        if action.edits_harness:
            self.tally.violations += 1
            if self.tally.violations > 1:
                return _End("harness_violation", f"insisted on editing {action.path!r}; only train.py may change")
            return self._observe(
                f"refused: {action.path!r} is part of the harness; you may edit train.py only."
                " Insisting ends the session as a harness violation."
            )
        self.tally.edit_attempts += 1
        if action.kind == "set":
            new = hparams.apply(self.train_py, action.name, action.value)  # the parser checked name and range
            done = f"{action.name} = {action.value!r} set."
        elif action.content:
            new, done = action.content, "train.py replaced."
        else:
            found = self.train_py.count(action.search)
            if found != 1:
                return self._observe(
                    f"edit not applied: the search text occurs {found} times in train.py; it must occur exactly once."
                )
            new, done = self.train_py.replace(action.search, action.replace), "edit applied."
        self.train_py = new
        error = _syntax(new)
        return self._observe(f"{done} Syntax check: {error or 'ok'}.")

    async def _run(self, final: bool) -> _End | None:
        if self.executed:
            return self._observe("the one training run of this session is done; reply with finish.")
        if self.train_py == self.spec.start_train_py:
            return _End("no_edit", "asked to run train.py unchanged; nothing of the researcher's to measure")
        if error := _syntax(self.train_py):
            self.tally.syntax_failures += 1
            if final or self.tally.syntax_failures > self.cfg.syntax_retries:
                return _End("syntax_error", f"{error} (syntax check {self.tally.syntax_failures} failed)")
            return self._observe(f"not run: {error}. Fix train.py and run again.")
        self.executed = await self.run_training(self.train_py)
        if final:
            return self._measured()
        return self._observe(prompts.run_report(self.executed.result))

    async def _finish(self) -> _End:
        if self.executed:
            return self._measured()
        if self.train_py == self.spec.start_train_py:
            return _End("no_edit", "finished without changing train.py")
        return await self._run_last()

    async def _close(self) -> _End:
        """Out of turns (or time): measure what the researcher made, or say why there is nothing."""
        if self.executed:
            return self._measured()
        if self.tally.valid == 0:
            return _End("agent_error", f"no usable action in {len(self.tally.replies)} replies{self.stopped}")
        if self.train_py == self.spec.start_train_py:
            return _End("no_edit", f"{len(self.tally.replies)} turns without a change to train.py{self.stopped}")
        return await self._run_last()

    async def _run_last(self) -> _End:
        """Run the researcher's unrun edit once, with no syntax retry left (it has stopped acting)."""
        end = await self._run(final=True)
        assert end is not None, "a final run always ends the rollout"
        return end

    def _measured(self, note: str = "") -> _End:
        result = self.executed.result
        return _End(result.status, result.detail + note)


def numbered(lines: list[str], start: int, end: int) -> str:
    """Lines start..end of train.py (1-based, inclusive), numbered, bounded by READ_LINES and READ_CHARS."""
    n = len(lines)
    if start > n:
        return f"train.py has {n} lines; read a range within 1..{n}."
    shown, chars = [], 0
    for i in range(start, min(end, n, start + READ_LINES - 1) + 1):
        text = f"{i:4d}| {lines[i - 1]}"
        if shown and chars + len(text) > READ_CHARS:
            break
        shown.append(text)
        chars += len(text) + 1
    last = start + len(shown) - 1
    more = f" Lines {last + 1}..{n} are not shown: read them with start and end." if last < n else ""
    return f"train.py lines {start}..{last} of {n} (numbered; the numbers are not part of the file):{more}\n" + "\n".join(shown)


def _row(r: _Rollout, end: _End, started: float) -> dict[str, Any]:
    s, t, ex = r.spec, r.tally, r.executed
    res = ex.result if ex else RunResult(status=end.status)
    diff = difflib.unified_diff(s.start_train_py.splitlines(True), r.train_py.splitlines(True), "a/train.py", "b/train.py")
    placement = {"host": ex.host, "slot": ex.slot, "gpu_type": ex.gpu_type, "job_id": ex.job_id,
                 "blob_path": ex.blob_path, "infra_attempts": ex.infra_attempts} if ex else {}
    return new_row(
        **s.columns(), **placement,
        action_space=r.space, response_schema=json.dumps(r.schema, sort_keys=True),
        schema_enforced=bool(t.replies) and all(x.enforced for x in t.replies), messages=r.record,
        final_train_py=_clean(r.train_py), diff=_clean("".join(diff)),
        exit_code=res.exit_code, status=end.status, detail=_clean(end.detail.splitlines()[0] if end.detail else ""),
        val_bpb=float(res.val_bpb) if end.status == "success" else math.nan,
        steps=int(res.steps), tokens=int(res.tokens), peak_vram_mb=float(res.peak_memory_mb),
        training_seconds=float(res.training_seconds), wall_seconds=float(res.wall_seconds),
        stdout_tail=_clean(res.stdout_tail),
        prompt_tokens=sum(x.prompt_tokens for x in t.replies),
        completion_tokens=sum(x.completion_tokens for x in t.replies),
        reasoning_tokens=sum(x.reasoning_tokens for x in t.replies),
        turns=len(t.replies), tool_calls=t.tool_calls, valid_actions=t.valid, invalid_actions=t.invalid,
        edit_attempts=t.edit_attempts, started_at=started, finished_at=time.time(),
    )


async def rollout(
    spec: RolloutSpec,
    cfg: ResearcherCfg,
    client: ResearcherClient,
    run_training: RunTraining,
    events: EventLog | None = None,
    *,
    wall_s: float | None = None,  # cap on the researcher's total reply time (training excluded)
) -> dict[str, Any]:
    """Play one rollout and return its trace row (it passes rfs.trace.validate)."""
    started = time.time()
    r = _Rollout(spec, cfg, client, run_training, events, wall_s if wall_s is not None else cfg.max_turns * cfg.turn_timeout_s)
    end = await r.play()
    return _row(r, end, started)
