"""Typed, frozen configuration, loaded once from TOML.

The dataclass defaults are DESIGN.md's locked defaults (the cluster shape). A preset overrides a
few of them, and an experiment file overrides the preset. Any key that is not a field is an error
that names the file, the key and what was expected: a typo must never silently run the default.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rfs import ROOT
from rfs.errors import RfsError


class ConfigError(RfsError, ValueError):
    """A config or hosts file that cannot run: the message names the file and the key."""


# The verdict's declared primary metrics (defined in rfs/evals/verdict.py and docs/verdict.md).
PRIMARY_METRICS = ("mean_improvement", "success_rate")


@dataclass(frozen=True)
class ExperimentCfg:
    name: str = "embedded"
    preset: str = "embedded"
    seed: int = 0
    arcs: tuple[str, ...] = ("A",)
    arms: tuple[str, ...] = ("S",)
    baselines: tuple[str, ...] = ("CTRL", "FLOOR")
    max_rounds: int = 3  # per arm; 0 means no cap (stop on budget, plateau or the collapse guard)
    budget_hours: float = 0.0  # 0: no wall-clock budget
    plateau_rounds: int = 0  # stop an arm after this many rounds without a new best; 0: never
    runs_dir: str = "runs"
    # Declared before the first rollout (frozen into experiment.toml): the one number the verdict tests.
    primary_metric: str = "mean_improvement"
    # Independent loops of every line, each with its own seeds: the verdict's unit of replication.
    # 1 on the cluster: one 72-hour loop per line already fills the budget (issue 16); raise it
    # when the budget allows, `rfs.py plan` says how many the wanted effect needs.
    replicates: int = 1
    # Control lines beside arm S: "noprefill" (arm S collected without its stamp prefill: weights
    # without the goal hint) and "placebo" (arm S trained on stamps permuted across its round).
    controls: tuple[str, ...] = ("placebo", "noprefill")


@dataclass(frozen=True)
class EnvCfg:
    name: str = "autoresearch"  # builtin | autoresearch
    budget_s: float = 300.0  # the training budget, the harness's own wall clock
    timeout_s: float = 600.0  # hard kill per training run (upstream autoresearch's 10 minutes)
    device: str = "cuda"  # cpu | cuda
    calibration_k: int = 10  # seed runs, each with its own training SEED where train.py has one


@dataclass(frozen=True)
class VllmCfg:
    executable: str = "vllm"  # vLLM pins its own torch, so it usually lives in its own environment
    top_p: float = 1.0  # with researcher.temperature, the sampling rfs sets (no model generation_config.json)
    tensor_parallel: int = 1
    max_model_len: int = 32768
    gpu_memory_utilization: float = 0.85
    extra_args: tuple[str, ...] = ()


@dataclass(frozen=True)
class ResearcherCfg:
    model: str = "Qwen2.5-Coder-7B-Instruct"  # "smollm2" (the embedded PyPI model) or a local dir
    backend: str = "vllm"  # llamacpp | vllm | external
    base_url: str = ""  # external backend only
    api_key_env: str = "OPENAI_API_KEY"  # external backend only: the variable holding the key
    action_space: str = "code"  # code | hparams
    max_turns: int = 12
    max_tokens: int = 2048  # per reply
    temperature: float = 0.8
    syntax_retries: int = 2
    turn_timeout_s: float = 300.0  # one researcher reply
    threads: int = 0  # server CPU threads; 0: the backend's default
    vllm: VllmCfg = field(default_factory=VllmCfg)


@dataclass(frozen=True)
class CollectCfg:
    rollouts: int = 48
    infra_retries: int = 2  # an infra_error is retried on another slot this many times
    quarantine_after: int = 3  # consecutive slot failures before a slot is taken out
    # The share of every wave's slots that run the unmodified starting train.py beside the
    # researcher's rollouts (at least one per wave): the noise under the wave's own conditions.
    seed_controls: float = 0.125


@dataclass(frozen=True)
class ConsolidateCfg:
    lora_r: int = 64
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    epochs: float = 2.0
    lr: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_seq_len: int = 4096
    batch_tokens: int = 16384  # packed tokens per optimizer step
    replay_fraction: float = 0.2
    replay_rounds: int = 5
    kl_lambda: float = 0.05
    kl_prompts: int = 50
    # On: without it the 7B shape at 16384 tokens/step does not fit an 80 GB H100, and with it the
    # throughput matches smaller steps without it (docs/LOG.md, bench/lora_shape.py).
    gradient_checkpointing: bool = True
    devices: int = 1  # GPUs the fit's base is spread over by a device map (the 32B path); 1: one device
    reason: str = ""  # the written reason for any departure from the locked defaults


@dataclass(frozen=True)
class LoopCfg:
    eval_every: int = 2  # held-out probes at V0, every n-th version and the last; 0: none
    # Consolidate the last round too. Its V_{n+1} collects nothing: it serves only the last probes,
    # the behaviour shift and whoever takes the weights away; false ends each gold loop on V_n.
    final_fit: bool = True
    stamp_margin: float = 0.01  # arm S conditions on (best so far - margin)
    # CTRL's memory in tokens: the served context window less the rest of a rollout's context
    # (docs/ctrl_memory.md); 0 sizes it from the window, a positive number caps it lower.
    ctrl_memory_tokens: int = 0
    floor_waves: int = 2
    max_concurrent: int = 2  # loops running at once (default: the headline arm beside CTRL)
    priority: tuple[str, ...] = ("A-S", "CTRL", "A-S-placebo", "A-S-noprefill", "B-F", "CTRL-B", "B-S", "A-F",
                                 "FLOOR", "FLOOR-B")  # lines; replicate k of every line after replicate k-1


@dataclass(frozen=True)
class GuardCfg:
    min_success_rate: float = 0.05
    min_ast_diversity: float = 0.02
    # A regression must be beyond what noise explains: mean val_bpb worse than the best mean by
    # more than z·σ/√n, σ the wave's seed-control (or calibrated) std, n the round's successes.
    regression_z: float = 3.0
    patience: int = 2  # rounds below threshold before the arm is paused (at least 2: never one noisy round)


@dataclass(frozen=True)
class EvalCfg:
    zero_shot_rollouts: int = 16
    transfer_depth: int = 12
    transfer_runs: int = 3  # per probed version, each paired with the seed train.py at the same depth and seed
    drift_window: int = 3
    code_problems: int = 20  # the HumanEval subset's size (rfs/evals/code_probe.py)
    # first actions sampled per version, after each gold round, for the behaviour shift (0: none)
    behaviour_samples: int = 32


@dataclass(frozen=True)
class MirrorCfg:
    url: str = ""  # fsspec URL (s3://bucket/run, file:///…); "": no mirror. Before every fit and publish.


@dataclass(frozen=True)
class Config:
    experiment: ExperimentCfg = field(default_factory=ExperimentCfg)
    env: EnvCfg = field(default_factory=EnvCfg)
    researcher: ResearcherCfg = field(default_factory=ResearcherCfg)
    collect: CollectCfg = field(default_factory=CollectCfg)
    consolidate: ConsolidateCfg = field(default_factory=ConsolidateCfg)
    loop: LoopCfg = field(default_factory=LoopCfg)
    guard: GuardCfg = field(default_factory=GuardCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    mirror: MirrorCfg = field(default_factory=MirrorCfg)


PRESETS: dict[str, dict[str, Any]] = {
    "cluster": {},
    "embedded": {
        # K = 1: on 2 cores one replicate of A-S, its placebo and no-prefill lines, CTRL and FLOOR
        # already takes the embedded run's time (every line's waves and fits share the two cores);
        # each further replicate repeats all of it. `rfs.py plan` says what K an effect needs.
        "experiment": {"replicates": 1},
        "env": {"name": "builtin", "budget_s": 30.0, "timeout_s": 90.0, "device": "cpu"},
        "researcher": {
            "model": "smollm2",
            "backend": "llamacpp",
            "action_space": "hparams",
            "max_turns": 6,
            "max_tokens": 192,
            "turn_timeout_s": 120.0,
            "threads": 1,
        },
        "collect": {"rollouts": 4},
        "consolidate": {
            "lora_r": 16,
            "lora_alpha": 16,
            "epochs": 3.0,
            "lr": 1e-3,
            "batch_tokens": 2048,
            "reason": "2 CPU cores, a round of 4 traces: 3 epochs at lr 1e-3 so a handful of steps moves the weights "
                      "(2 epochs at 2e-4 left KL to V0 at 0.0002); 2048 tokens a step (the 16384 default would make "
                      "a round one step); r=16 is the notes' measured LoRA rate (docs/LOG.md)",
        },
        # probes cost a wave each on 2 cores: V0 and the last of 3 versions (V3) only
        "loop": {"floor_waves": 1, "eval_every": 3},
        # behaviour shift: 12 first actions a version (36 after round 1) through llama.cpp, ~1 min on 2 cores
        "eval": {"zero_shot_rollouts": 4, "transfer_depth": 3, "behaviour_samples": 12},
    },
}


def key_path(where: str, key: str) -> str:
    """'file.toml:' + 'env' -> 'file.toml: env'; 'file.toml: env' + 'budget_s' -> 'file.toml: env.budget_s'."""
    return f"{where} {key}" if where.endswith(":") else f"{where}.{key}"


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check a TOML value against a field type; convert lists to tuples for frozen configs."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is tuple:
        (item,) = {a for a in typing.get_args(tp) if a is not Ellipsis}
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list of {item.__name__}, got {value!r}")
        return tuple(_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def _build(cls: type, table: dict[str, Any], where: str) -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in table:
        if key not in names:
            raise ConfigError(f"{key_path(where, key)}: unknown key (expected one of: {', '.join(sorted(names))})")
    return cls(**{k: _coerce(v, hints[k], key_path(where, k)) for k, v in table.items()})


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _check(cfg: Config, where: str) -> None:
    e, r = cfg.experiment, cfg.researcher
    rules = [
        (set(e.arcs) <= {"A", "B"} and e.arcs, "experiment.arcs", "a non-empty subset of A, B"),
        (set(e.arms) <= {"S", "F"} and e.arms, "experiment.arms", "a non-empty subset of S, F"),
        (set(e.baselines) <= {"CTRL", "FLOOR"}, "experiment.baselines", "a subset of CTRL, FLOOR"),
        (e.primary_metric in PRIMARY_METRICS, "experiment.primary_metric", " or ".join(PRIMARY_METRICS)),
        (e.max_rounds >= 0, "experiment.max_rounds", "0 (no cap) or more"),
        (cfg.env.name in ("builtin", "autoresearch"), "env.name", "builtin or autoresearch"),
        (cfg.env.device in ("cpu", "cuda"), "env.device", "cpu or cuda"),
        (cfg.env.budget_s > 0 and cfg.env.timeout_s > cfg.env.budget_s, "env.timeout_s", "greater than env.budget_s > 0"),
        (r.backend in ("llamacpp", "vllm", "external"), "researcher.backend", "llamacpp, vllm or external"),
        (r.action_space in ("code", "hparams"), "researcher.action_space", "code or hparams"),
        (r.backend != "external" or r.base_url, "researcher.base_url", "a URL when backend = external"),
        (cfg.collect.rollouts >= 1, "collect.rollouts", "at least 1"),
        (e.replicates >= 1, "experiment.replicates", "at least 1"),
        (set(e.controls) <= {"placebo", "noprefill"}, "experiment.controls", "a subset of placebo, noprefill"),
        (0 < cfg.collect.seed_controls < 1, "collect.seed_controls", "a share in (0, 1): at least one per wave"),
        (cfg.guard.patience >= 2, "guard.patience", "at least 2 (a regression over more than one round)"),
        (cfg.guard.regression_z > 0, "guard.regression_z", "> 0"),
        (0 <= cfg.consolidate.replay_fraction < 1, "consolidate.replay_fraction", "in [0, 1)"),
        (cfg.consolidate.kl_lambda >= 0, "consolidate.kl_lambda", ">= 0"),
        (cfg.consolidate.devices >= 1, "consolidate.devices", "at least 1"),
        (cfg.eval.transfer_runs >= 3, "eval.transfer_runs", "at least 3 (the design's transfer probe)"),
        (1 <= cfg.eval.code_problems <= 164, "eval.code_problems", "1 to 164 (HumanEval's problems)"),
    ]
    for ok, key, expected in rules:
        if not ok:
            raise ConfigError(f"{key_path(where, key)}: expected {expected}")


def load(path: Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Load an experiment file (or the default embedded preset when path is None)."""
    where = f"{path}:" if path else "<defaults>:"
    table: dict[str, Any] = {}
    if path is not None:
        try:
            table = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    table = _merge(table, overrides or {})
    preset = table.get("experiment", {}).get("preset", "embedded")
    if preset not in PRESETS:
        raise ConfigError(f"{where} experiment.preset: expected one of {sorted(PRESETS)}, got {preset!r}")
    cfg = _build(Config, _merge(PRESETS[preset], table), where)
    _check(cfg, where)
    return cfg


def to_toml(cfg: Config) -> str:
    """Serialise the effective config (what experiment.toml freezes at the start of a run)."""
    lines: list[str] = []

    def emit(prefix: str, obj: Any) -> None:
        scalars = [(f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj)]
        tables = [(k, v) for k, v in scalars if dataclasses.is_dataclass(v)]
        lines.append(f"[{prefix}]")
        for k, v in scalars:
            if not dataclasses.is_dataclass(v):
                lines.append(f"{k} = {_toml_value(v)}")
        lines.append("")
        for k, v in tables:
            emit(f"{prefix}.{k}", v)

    for f in dataclasses.fields(cfg):
        emit(f.name, getattr(cfg, f.name))
    return "\n".join(lines)


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return "[" + ", ".join(_toml_value(x) for x in v) + "]"


def cache_dir() -> Path:
    """Data, converted models and calibrations that outlive a run (never a hub cache)."""
    return Path(os.environ.get("RFS_CACHE", Path.home() / ".cache" / "rfs"))


def default_experiment() -> Path:
    return ROOT / "experiments" / "embedded.toml"


