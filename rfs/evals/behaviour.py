"""What the researcher does, not what it scores: its first actions on fixed prompts, per version.

Every round of a gold loop samples N first actions (cfg.eval.behaviour_samples) through the real
server from V_n, V_{n-1} and V0, on the same opening messages the loop starts from and with the
same seeds, and records the distribution of actions (name=value in the hparams space, the action
kind in the code space), its total variation distance to V_{n-1} and to V0, and the largest
changes. Sampling alone moves a distribution: two samples of V0 with different seeds give the
noise level, and a version within it "did not change beyond sampling noise".
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from rfs import tables
from rfs.agent import hparams, prompts
from rfs.agent.actions import Action, code_schema, hparams_schema, parse
from rfs.agent.client import ResearcherClient
from rfs.config import ResearcherCfg
from rfs.loop.serving import V0
from rfs.rundir import RunDir

TOP_CHANGES = 5
INVALID = "invalid"
NOISE_SEED_OFFSET = 1_000_003  # V0's second sample: other seeds, same prompts

SCHEMA = pa.schema([
    ("loop", pa.string()), ("round", pa.int32()), ("version", pa.int32()), ("samples", pa.int64()),
    ("distribution", pa.string()),  # JSON {label: count} of V_n's first actions
    ("tv_prev", pa.float64()),  # total variation distance to V_{n-1}'s distribution
    ("tv_v0", pa.float64()),  # … to V0's
    ("tv_noise", pa.float64()),  # … between two samples of V0 with different seeds: what sampling alone gives
    ("changed", pa.bool_()),  # tv_v0 > tv_noise
    ("top_changes", pa.string()),  # JSON [[label, rate V0, rate V_n], …], largest |change| first
])


def opening(program_md: str, train_py: str, space: str, start_val_bpb: float) -> list[dict[str, str]]:
    """The loop's first messages, exactly as rfs.agent.rollout opens a session."""
    return [{"role": "system", "content": prompts.system(program_md, space)},
            {"role": "user", "content": prompts.first_user(train_py, space, start_val_bpb)}]


def label(action: Any) -> str:
    """'NAME=value' for a set, the action kind otherwise, 'invalid' for an unusable reply."""
    if not isinstance(action, Action):
        return INVALID
    return f"{action.name}={action.value!r}" if action.kind == "set" else action.kind


async def first_actions(client: ResearcherClient, cfg: ResearcherCfg, messages: list[dict[str, str]], train_py: str,
                        n: int, seed: int = 0, prefill: str = "") -> list[str]:
    """n first actions' labels, one request each with seeds seed..seed+n-1, under the first turn's schema."""
    params = hparams.parse(train_py) if cfg.action_space == "hparams" else ()
    schema = (hparams_schema(params, cfg.max_tokens, allow_stop=False) if params
              else code_schema(cfg.max_tokens, whole_file=False))
    out = []
    for i in range(n):
        reply = await client.act(messages, schema, max_tokens=cfg.max_tokens, temperature=cfg.temperature,
                                 seed=(seed + i) % 2**31, prefill=prefill)
        out.append(label(parse(reply.text, cfg.action_space, params)))
    return out


def rates(counts: dict[str, int]) -> dict[str, float]:
    total = sum(counts.values())
    return {k: v / total for k, v in counts.items()} if total else {}


def tv(a: dict[str, int], b: dict[str, int]) -> float:
    """Total variation distance between two samples' empirical distributions (0 = same, 1 = disjoint)."""
    ra, rb = rates(a), rates(b)
    return 0.5 * sum(abs(ra.get(k, 0.0) - rb.get(k, 0.0)) for k in ra.keys() | rb.keys())


def top_changes(before: dict[str, int], after: dict[str, int], k: int = TOP_CHANGES) -> list[tuple[str, float, float]]:
    ra, rb = rates(before), rates(after)
    keys = sorted(ra.keys() | rb.keys(), key=lambda x: (-abs(rb.get(x, 0.0) - ra.get(x, 0.0)), x))
    return [(x, ra.get(x, 0.0), rb.get(x, 0.0)) for x in keys[:k] if rb.get(x, 0.0) != ra.get(x, 0.0)]


def row(loop: str, round_: int, now: dict[str, int], prev: dict[str, int], v0: dict[str, int],
        noise: float) -> dict[str, Any]:
    """V_round's row: its distribution against V_{round-1}'s and V0's (round 0 is V0 itself);
    noise: the TV between two samples of V0 with different seeds."""
    moved = tv(v0, now)
    return {
        "loop": loop, "round": round_, "version": round_, "samples": sum(now.values()),
        "distribution": json.dumps(dict(Counter(now).most_common())),
        "tv_prev": tv(prev, now), "tv_v0": moved, "tv_noise": noise, "changed": moved > noise,
        "top_changes": json.dumps(top_changes(v0, now)),
    }


def record(run: RunDir, rows: list[dict[str, Any]]) -> None:
    tables.upsert(run.metrics("behaviour"), SCHEMA, ("loop", "round"), rows)


def _rows(run: RunDir, loop: str, round_: int) -> list[dict[str, Any]]:
    return [r for r in tables.read(run.metrics("behaviour"), SCHEMA).to_pylist() if r["loop"] == loop and r["round"] == round_]


def _recorded(run: RunDir, loop: str, round_: int) -> dict[str, int] | None:
    found = _rows(run, loop, round_)
    return json.loads(found[0]["distribution"]) if found else None


async def _counts(served: Any, ex: Any, n: int, seed: int) -> dict[str, int]:
    train_py = ex.env.seed_train_py()
    messages = opening(ex.env.program_md(), train_py, ex.cfg.researcher.action_space, ex.noise.mean)
    return dict(Counter(await first_actions(served.client, ex.cfg.researcher, messages, train_py, n, seed)))


async def measure(ex: Any, loop: str, r: int) -> None:
    """After a gold loop's round r: V_r's first actions on the loop's opening (the seed train.py, no
    memory, no stamp: the same prompt for every version), against V_{r-1}'s and V0's, recorded.

    V0's two samples (the second with other seeds: the noise level) are taken once per loop and
    kept as its round-0 row; V_{r-1}'s come from its own row (the same seeds, the same prompt).
    ex: the rfs.loop.experiment.Experiment (typed loosely: rfs.loop imports this module)."""
    n = ex.cfg.eval.behaviour_samples
    if n <= 0 or _rows(ex.run, loop, r):  # a resumed round measured already
        return
    seed = ex.cfg.experiment.seed
    v0 = _recorded(ex.run, loop, 0)
    if v0 is None:
        served = await ex.servers.serve(V0, 0)
        v0 = await _counts(served, ex, n, seed)
        again = await _counts(served, ex, n, seed + NOISE_SEED_OFFSET)
        record(ex.run, [row(loop, 0, v0, v0, v0, tv(v0, again))])
    noise = _rows(ex.run, loop, 0)[0]["tv_noise"]
    prev = _recorded(ex.run, loop, r - 1) or v0
    now = await _counts(await ex.servers.serve(loop, r), ex, n, seed)  # the loop's swap to V_r
    record(ex.run, [row(loop, r, now, prev, v0, noise)])


def verdict(r: dict[str, Any]) -> str:
    if not r["changed"]:
        return f"no change beyond sampling noise (TV to V0 {r['tv_v0']:.2f} ≤ {r['tv_noise']:.2f}, V0 against itself)"
    return f"changed: TV to V0 {r['tv_v0']:.2f} > {r['tv_noise']:.2f} (V0 against itself)"


def behaviour_md(run: RunDir) -> str:
    """The report's section: per loop and round, the divergences, the verdict and the top changes."""
    path = run.metrics("behaviour")
    if not path.exists():
        return ""
    rows = sorted(tables.read(path, SCHEMA).to_pylist(), key=lambda r: (r["loop"], r["round"]))
    lines = ["## Behaviour shift (first actions on the loop's opening prompts)", "",
             "| loop | V | samples | TV to V_{n-1} | TV to V0 | V0 vs V0 | verdict | top changes (V0 → V_n) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        changes = ", ".join(f"{x} {a:.0%}→{b:.0%}" for x, a, b in json.loads(r["top_changes"])[:3])
        lines.append(f"| {r['loop']} | {r['version']} | {r['samples']} | {r['tv_prev']:.2f} | {r['tv_v0']:.2f} | "
                     f"{r['tv_noise']:.2f} | {verdict(r)} | {changes or '—'} |")
    return "\n".join(lines) + "\n"
