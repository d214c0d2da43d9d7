"""`rfs report`: the run directory → report/{report.md, decomposition.md, hero.png, results.tsv}.

Works on any run, finished or not: what is not there yet is listed under "Missing", never a crash.
"""

from __future__ import annotations

import math
import tomllib
from collections import Counter
from pathlib import Path
from typing import Any

from rfs import atomic, config
from rfs.evals import drift, load, metrics, plot, power, verdict
from rfs.evals.behaviour import behaviour_md
from rfs.events import read_events
from rfs.rundir import RunDir
from rfs.trace import CTRL, FLOOR, PROBE, SHARED, STATUSES

CONFIG_KEYS = (
    ("experiment", ("name", "preset", "seed", "arcs", "arms", "baselines", "max_rounds", "replicates", "primary_metric")),
    ("env", ("name", "budget_s", "device")),
    ("researcher", ("model", "backend", "action_space", "max_turns")),
    ("collect", ("rollouts",)),
    ("consolidate", ("lora_r", "lora_alpha", "epochs", "kl_lambda", "replay_fraction", "reason")),
    ("eval", ("zero_shot_rollouts", "transfer_depth", "drift_window")),
)


def report(run_dir: Path) -> Path:
    """Write the report files for a run directory and return the path of report.md."""
    run = RunDir(Path(run_dir))
    if not run.root.is_dir():
        raise FileNotFoundError(f"{run.root}: no such run directory")
    missing: list[str] = []
    cfg = _config(run, missing)
    groups = load.by_loop_round(load.traces(run))
    if not groups:
        missing.append("traces: no finished round yet (traces/<loop>/round-<n>.parquet)")
    noise = run.read_state().get("noise")
    if not noise:
        missing.append("calibration: state.json has no seed noise measurement, so no noise band")
    aggs = metrics.read(run.metrics("round_aggregates"), metrics.ROUND_AGGREGATES).to_pylist()
    if groups and not aggs:
        missing.append("metrics/round_aggregates.parquet: absent, so points show no diversity colour")
    version_eval = metrics.read(run.metrics("version_eval"), metrics.VERSION_EVAL)
    if version_eval.num_rows == 0:
        missing.append("metrics/version_eval.parquet: no probes yet (zero-shot, transfer, code)")
    gold = sorted({l for l, _ in groups if l not in (SHARED, CTRL, FLOOR, PROBE)})

    title = f"{cfg.get('experiment', {}).get('name', run.root.name)}: best val_bpb per round"
    plot.hero(_points(groups, aggs), noise, title, run.report / "hero.png")
    metric = cfg.get("experiment", {}).get("primary_metric", "mean_improvement")
    scored = verdict.scored_run(run, metric)
    decomposition = _decomposition(run, scored, missing)
    atomic.write_text(run.report / "decomposition.md", decomposition)
    atomic.write_text(run.report / "results.tsv", results_tsv(groups))
    alarms = _alarms(run, version_eval, gold, cfg)
    parts = [
        f"# rfs report: {run.root.name}\n",
        _metric_md(scored, "primary_metric" in cfg.get("experiment", {})),
        _config_md(cfg),
        _loops_md(run.read_state(), noise),
        "## Statuses per loop and round\n\n" + _status_md(groups),
        "## Anomaly flags\n\n" + _anomaly_md(groups),
        "## Alarms\n\n" + ("\n".join(f"- {a}" for a in alarms) + "\n" if alarms else "none\n"),
        "## Verdict\n\n" + decomposition + _best_of_n_md(groups, gold),
        "## Noise\n\n" + _noise_md(scored, noise),
        behaviour_md(run),
        "## Plan: what this run's variance implies\n\n" + _plan_md(run, groups, noise, metric, missing),
        "## Hero plot\n\n![best val_bpb per round](hero.png)\n\nEvery rollout: [results.tsv](results.tsv) "
        "(autoresearch's format).\n",
        "## Missing\n\n" + ("\n".join(f"- {m}" for m in missing) + "\n" if missing else "nothing\n"),
    ]
    out = run.report / "report.md"
    atomic.write_text(out, "\n".join(parts))
    return out


def _config(run: RunDir, missing: list[str]) -> dict[str, Any]:
    try:
        return tomllib.loads(run.config.read_text())
    except FileNotFoundError:
        missing.append("experiment.toml: absent, so no config summary")
    except tomllib.TOMLDecodeError as exc:
        missing.append(f"experiment.toml: not valid TOML ({exc})")
    return {}


def _config_md(cfg: dict[str, Any]) -> str:
    rows = [
        f"| {section}.{key} | {cfg[section][key]!r} |"
        for section, keys in CONFIG_KEYS
        for key in keys
        if key in cfg.get(section, {})
    ]
    body = "| key | value |\n|---|---|\n" + "\n".join(rows) + "\n" if rows else "no experiment.toml\n"
    return "## Configuration (from experiment.toml)\n\n" + body


def _loops_md(state: dict[str, Any], noise: dict[str, float] | None) -> str:
    lines = ["## Loops\n"]
    if noise:
        lines.append(f"Seed train.py: val_bpb {noise['mean']:.4f} ± {noise['std']:.4f} (calibrated noise).\n")
    loops = state.get("loops", {})
    if loops:
        lines.append("| loop | status | rounds | best val_bpb | why |\n|---|---|---:|---:|---|")
        for name, st in sorted(loops.items()):
            best = st.get("best_val_bpb", math.nan)
            lines.append(
                f"| {name} | {st.get('status', '?')} | {len(st.get('history', []))} | "
                f"{_fmt(best)} | {st.get('reason', '')} |"
            )
    return "\n".join(lines) + "\n"


def _status_md(groups: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    if not groups:
        return "no traces yet\n"
    head = "| loop | round | n | " + " | ".join(STATUSES) + " |"
    rows = [head, "|---|---:|---:|" + "---:|" * len(STATUSES)]
    for (loop, round_), rs in sorted(groups.items()):
        counts = Counter(r["status"] for r in rs)
        rows.append(f"| {loop} | {round_} | {len(rs)} | " + " | ".join(str(counts[s]) for s in STATUSES) + " |")
    return "\n".join(rows) + "\n"


def _anomaly_md(groups: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    counts: Counter[tuple[str, str]] = Counter(
        (loop, flag) for (loop, _), rs in groups.items() for r in rs for flag in r["anomaly_flags"]
    )
    if not counts:
        return "none\n"
    rows = ["| loop | flag | rollouts |", "|---|---|---:|"]
    rows += [f"| {loop} | {flag} | {n} |" for (loop, flag), n in sorted(counts.items())]
    return "\n".join(rows) + "\n"


def _alarms(run: RunDir, version_eval: Any, gold: list[str], cfg: dict[str, Any]) -> list[str]:
    events, _ = read_events(run.events)  # a torn line is skipped by the reader
    out = [f"{e.get('loop', '?')} {e.get('alarm', '?')}: {e.get('message', '')}" for e in events if e.get("kind") == "alarm"]
    window = int(cfg.get("eval", {}).get("drift_window", 3))
    return out + [f"drift (computed now) {msg}" for loop in gold for msg in drift.alarms(version_eval, loop, window)]


def _metric_md(s: verdict.Scored, frozen: bool) -> str:
    how = "frozen in experiment.toml" if frozen else "the default: this run's experiment.toml predates the field"
    return (f"## Primary metric: {s.metric}\n\n{verdict.DEFINITIONS[s.metric]}. Declared before the first "
            f"rollout ({how}). A round's start: {s.start}.\n")


def _decomposition(run: RunDir, scored: verdict.Scored, missing: list[str]) -> str:
    rows = verdict.decompose_scored(scored) + verdict.probe_rows(run, 0, 2000)
    if not any(l in scored.lines for l in verdict.GOLD):
        missing.append("verdict: no gold loop has a round beyond the shared round 1")
    missing += [f"verdict: {e.name}: {e.note.removeprefix('missing: ')}" for e in rows if e.note.startswith("missing:")]
    matched = [f"{g} → {verdict.matched_ctrl(scored, g[0]) or 'none (no decomposition)'}"
               for g in verdict.GOLD if g in scored.lines]
    return verdict.to_markdown(rows) + "\n" + _VERDICT_NOTE + f"Matched baselines: {', '.join(matched) or 'none'}.\n"


_VERDICT_NOTE = (
    "Δ is an improvement (positive = better) on the primary metric, rounds ≥ 2 pooled up to the last round "
    "both sides reached. 95% intervals: hierarchical bootstrap (replicates resampled with their rollouts; "
    "replicates paired by index, rollouts by (round, thread)), value ± t(K−1) · SE (docs/verdict.md), seed 0. "
    "Probe rows: V0 against the loop's last probed version, mean of successful runs (code: pass rate).\n"
)


def _best_of_n_md(groups: dict[tuple[str, int], list[dict[str, Any]]], gold: list[str]) -> str:
    """Best-of-N: a secondary, descriptive figure (a minimum has no consistent bootstrap interval)."""
    out = []
    for loop in gold:
        k = load.last_round(groups, loop)
        r1, rk = (min((v for v in metrics.rollout_values(groups.get(load.round_key(groups, loop, r), []))
                       if math.isfinite(v)), default=math.nan) for r in (1, k))
        out.append(f"{loop} {_fmt(r1)} (round 1) → {_fmt(rk)} (round {k})")
    return "\nBest val_bpb of a round (secondary, descriptive, no interval): " + ("; ".join(out) or "—") + ".\n"


def _noise_md(s: verdict.Scored, noise: dict[str, float] | None) -> str:
    if len(s.seed_controls) > 1:
        v = s.seed_controls
        mean = sum(v) / len(v)
        std = math.sqrt(sum((x - mean) ** 2 for x in v) / (len(v) - 1))
        return (f"From the seed controls run inside the waves: val_bpb {mean:.4f} ± {std:.4f} over {len(v)} runs "
                f"in {s.waves_with_controls} waves; each round's improvement is judged against its own wave's.\n")
    if noise:
        return f"No seed controls in this run: the calibration's {noise['mean']:.4f} ± {noise['std']:.4f} (k={noise.get('k', '?')}).\n"
    return "No seed controls and no calibration in this run.\n"


def _plan_md(run: RunDir, groups: dict, noise: dict[str, float] | None, metric: str, missing: list[str]) -> str:
    try:
        cfg = config.load(run.config)
    except config.ConfigError as exc:
        missing.append(f"plan: {exc}")
        return "no plan: the run's experiment.toml does not load\n"
    if not noise:
        return "no plan: no seed noise measured\n"
    rows = sum(groups.values(), [])
    var = power.measured(rows, metric, noise["mean"], power.assumed(cfg, noise["std"]))
    slots = len({r["slot"] for r in rows if r["slot"]}) or 1
    return "```\n" + power.table(cfg, var, 2 * noise["std"], slots) + "```\n"


def _points(groups: dict[tuple[str, int], list[dict[str, Any]]], aggs: list[dict[str, Any]]) -> list[plot.Point]:
    """One point per (loop, round); every loop but FLOOR starts at the shared round 1."""
    diversity = {(a["loop"], a["round"]): a["ast_diversity"] for a in aggs}
    round1 = next((a["ast_diversity"] for a in aggs if a["round"] == 1), math.nan)  # the same for every loop
    own = {l for l, _ in groups}
    curves = own - {SHARED} if own - {SHARED, FLOOR} else own  # shared alone: a one-round run
    out = []
    for loop in sorted(curves):
        rounds = {r for l, r in groups if l == loop} | ({1} if loop != FLOOR and (SHARED, 1) in groups else set())
        for r in sorted(rounds):
            vals = [v for v in metrics.rollout_values(groups[load.round_key(groups, loop, r)]) if math.isfinite(v)]
            div = diversity.get((loop, r), round1 if r == 1 and loop != FLOOR else math.nan)
            out.append(plot.Point(loop, r, min(vals) if vals else math.nan, div))
    return out


def results_tsv(groups: dict[tuple[str, int], list[dict[str, Any]]]) -> str:
    """Every rollout in autoresearch's results.tsv format: commit, val_bpb, memory_gb, status, description.

    `commit` is the rollout id; status is keep (a new best for its loop, which starts from the shared
    round's best), discard, or crash (any
    failed run; the description says which status, so an infra_error is not passed off as a crash of
    the researcher's code).
    """
    rows = ["commit\tval_bpb\tmemory_gb\tstatus\tdescription"]
    shared = [v for v in metrics.rollout_values(groups.get((SHARED, 1), [])) if math.isfinite(v)]
    for loop in sorted({l for l, _ in groups}):
        # A loop that starts from the shared round must beat that round's best to "keep".
        best = min(shared, default=math.inf) if loop not in (SHARED, FLOOR) else math.inf
        for (l, round_), rs in sorted(groups.items()):
            if l != loop:
                continue
            for r in rs:
                ok = r["status"] == "success"
                keep = ok and r["val_bpb"] < best
                best = min(best, r["val_bpb"]) if ok else best
                what = _describe(r)
                rows.append(
                    f"{r['rollout_id']}\t{r['val_bpb'] if ok else 0.0:.6f}\t{r['peak_vram_mb'] / 1024 if ok else 0.0:.1f}\t"
                    f"{'keep' if keep else 'discard' if ok else 'crash'}\t{loop} r{round_} {r['status']}: {what}"
                )
    return "\n".join(rows) + "\n"


def _describe(row: dict[str, Any]) -> str:
    """What the rollout tried: its diff's added lines, or else the status detail, on one line."""
    added = [l[1:].strip() for l in row["diff"].splitlines() if l.startswith("+") and not l.startswith("+++")]
    text = "; ".join(a for a in added if a) or row["detail"] or "no change"
    return " ".join(text.split())[:120]


def _fmt(x: float) -> str:
    return f"{x:.4f}" if isinstance(x, float) and math.isfinite(x) else "—"
