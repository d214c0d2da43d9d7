"""The command line: `python rfs.py <command>` (or the `rfs` console script)."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

import anyio

from rfs import ROOT, config, hosts, mirror
from rfs.config import ConfigError
from rfs.doctor import doctor, doctor_hosts
from rfs.envs import RunResult, environment, execute
from rfs.envs.calibrate import announce, calibrate, load_calibration
from rfs.evals import load, power
from rfs.errors import RfsError
from rfs.collect.slots import SlotPool
from rfs.launch import launcher_for, wave_launchers
from rfs.loop.driver import drive
from rfs.rehearse import rehearse, rehearse_here
from rfs.rundir import RunDir
from rfs.setup import setup_embedded
from rfs.tui import watch
from rfs.tui.plain import plain_progress

HELP = """\
rfs: does a coding model become a better ML researcher when its own grounded research experience
is consolidated into its weights, round after round, and does that beat the same frozen model that
keeps the experience in its context?

A round: COLLECT N rollouts (the researcher edits train.py, one training run each, one Parquet row
each) -> CONSOLIDATE (stamp or filter, mask, replay, KL anchor, LoRA, merge) -> V_{n+1} -> repeat.
Everything a run knows lives in runs/<experiment>/; `resume` continues it after any interruption.
"""


def _run_dir(cfg: config.Config) -> RunDir:
    base = Path(cfg.experiment.runs_dir)
    return RunDir((base if base.is_absolute() else ROOT / base) / cfg.experiment.name)


def _latest_run() -> Path:
    runs = sorted((ROOT / "runs").glob("*/state.json"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise ConfigError("no run found under runs/; start one with `python rfs.py run`")
    return runs[-1].parent


def _given_run(args: argparse.Namespace) -> Path:
    run = Path(args.run) if args.run else _latest_run()
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run directory; `ls runs/` lists the runs")
    return run


def cmd_run(args: argparse.Namespace) -> int:
    overrides: dict = {}
    if args.rounds is not None:
        overrides.setdefault("experiment", {})["max_rounds"] = args.rounds
    if args.name:
        overrides.setdefault("experiment", {})["name"] = args.name
    cfg = config.load(Path(args.experiment) if args.experiment else config.default_experiment(), overrides)
    run = _run_dir(cfg)
    frozen = config.to_toml(cfg)
    if run.config.exists() and run.config.read_text() != frozen:
        raise ConfigError(
            f"{run.root} was started with a different config ({run.config}); "
            "continue it with `python rfs.py resume`, or start a new one with --name"
        )
    return drive(cfg, run, hosts.load(Path(args.hosts) if args.hosts else None), plain=args.plain)


def cmd_resume(args: argparse.Namespace) -> int:
    if args.from_url:  # a new machine: the run directory comes back from the object-storage mirror
        dest = Path(args.run) if args.run else ROOT / "runs" / args.from_url.rstrip("/").rsplit("/", 1)[-1]
        print(f"restoring {dest} from {args.from_url} …", flush=True)
        mirror.restore(args.from_url, dest)
        args.run = str(dest)
    run = RunDir(_given_run(args))
    if not run.config.exists():
        raise ConfigError(f"{run.root}: not a run directory (no experiment.toml)")
    cfg = config.load(run.config)
    return drive(cfg, run, hosts.load(Path(args.hosts) if args.hosts else None), plain=args.plain)


def cmd_watch(args: argparse.Namespace) -> int:
    run = _given_run(args)
    if sys.stdout.isatty() and not args.plain:
        watch(run)
    else:
        plain_progress(run, follow=True)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from rfs.evals.report import report  # lazy: it plots with matplotlib, which only `report` needs

    out = report(_given_run(args))
    print(f"report written to {out}")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    cfg = config.load(Path(args.experiment) if args.experiment else config.default_experiment())
    here = hosts.slots(hosts.load(Path(args.hosts) if args.hosts else None))
    slots = args.slots or len(here)  # --slots prices another layout; the noise floor is this one's
    run = RunDir(Path(args.run)) if args.run else None
    noise = (run.read_state().get("noise") if run else None) or load_calibration(cfg.env, here)
    sigma = args.sigma or (noise or {}).get("std")
    if not sigma:
        raise ConfigError(f"no calibration for env {cfg.env.name} on {cfg.env.device} at these {len(here)} slots: "
                          "run `python rfs.py env calibrate`, pass a run directory, or give --sigma")
    var = power.assumed(cfg, sigma)
    if run:
        rows = sum(load.by_loop_round(load.traces(run)).values(), [])
        var = power.measured(rows, cfg.experiment.primary_metric, (noise or {}).get("mean", float("nan")), var)
    print(f"plan for {args.experiment or config.default_experiment()} (seed noise σ = {sigma:.4f})")
    print(power.table(cfg, var, args.effect if args.effect is not None else 2 * sigma, slots), end="")
    return 0


def cmd_setup(args: argparse.Namespace) -> int:
    cfg = config.load(Path(args.experiment) if args.experiment else None)
    print("preparing the environment's data …", flush=True)
    environment(cfg.env).prepare()
    if cfg.researcher.model == "smollm2":
        print(f"embedded researcher ready at {setup_embedded(force=args.force)}")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    hosts_path = Path(args.hosts) if args.hosts else None
    if args.hosts:  # every host, GPU, vLLM and the SLURM partition, as the run will use them
        return doctor_hosts(hosts_path, Path(args.experiment) if args.experiment else None)
    return doctor(hosts_path)


def cmd_rehearse(args: argparse.Namespace) -> int:
    if args.hosts:
        return rehearse(Path(args.hosts), Path(args.keep) if args.keep else None, verbose=args.verbose)
    return rehearse_here(Path(args.keep) if args.keep else None, verbose=args.verbose)


def cmd_env(args: argparse.Namespace) -> int:
    given = _train_py(args.file) if args.action == "run" else None  # a bad path fails before any setup
    cfg = config.load(Path(args.experiment) if args.experiment else None)
    hf = hosts.load(Path(args.hosts) if args.hosts else None)
    slots = hosts.slots(hf)
    env = environment(cfg.env)
    env.prepare()
    if args.action in ("seed", "run"):
        label, train_py = given or ("seed train.py", env.seed_train_py())
        slot = next((s for s in slots if s.launcher == "local"), slots[0])
        print(f"{label} on {slot.name}: training budget {cfg.env.budget_s:g} s (harness clock), "
              f"then the harness's own evaluation …", flush=True)
        result, _ = anyio.run(execute, env, launcher_for(slot, hf), slot, train_py, args.action)
        return _print_result(label, result)
    k = args.k or cfg.env.calibration_k

    async def calibrated() -> dict:
        async with wave_launchers(slots, hf) as launcher_of:  # each run through its own slot's launcher
            return await calibrate(env, SlotPool(slots, cfg.collect), k, launcher_of, cfg.env, announce(k))

    stats = anyio.run(calibrated)
    print(f"val_bpb over {stats['k']} seed runs at concurrency {stats['concurrency']}: "
          f"{stats['mean']:.4f} ± {stats['std']:.4f}  (values {', '.join(f'{v:.4f}' for v in stats['values'])})")
    return 0


def _train_py(file: str | None) -> tuple[str, str]:
    if not file:
        raise ConfigError("env run needs a train.py: `python rfs.py env run path/to/train.py`")
    path = Path(file)
    try:
        return str(path), path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read it ({exc.strerror}); give the path of a train.py") from None


ERROR_TAIL = 15  # lines of a failed run's output: enough for a traceback's end


def _print_result(label: str, r: RunResult) -> int:
    """The autoresearch summary: status and the harness's val_bpb; a failed run's output tail. 0 on success."""
    print(f"{label}: status={r.status} val_bpb={r.val_bpb:.4f} steps={r.steps} "
          f"training_seconds={r.training_seconds:.1f}  ({r.detail})", flush=True)
    if r.status == "success":
        return 0
    lines = r.stdout_tail.rstrip().splitlines()
    ends = [i for i, line in enumerate(lines) if line.strip() == "---"]  # the harness's summary follows
    tail = lines[: ends[-1] if ends else len(lines)][-ERROR_TAIL:]  # the summary was printed above
    if tail:
        print(f"last {len(tail)} lines of its output:\n" + "\n".join(f"  {line}" for line in tail), flush=True)
    return 1


def cmd_control(args: argparse.Namespace) -> int:
    from rfs.control import control, fit_cfg  # lazy: it loads torch and transformers (the train extra)

    cfg = config.load(Path(args.experiment) if args.experiment else None)
    fit = fit_cfg(cfg.consolidate, epochs=args.epochs, lr=args.lr)
    res = anyio.run(lambda: control(cfg, hosts.load(Path(args.hosts) if args.hosts else None), fit,
                                    examples=args.examples, samples=args.samples,
                                    where=Path(args.run) if args.run else None))
    print(json.dumps(res, indent=1))
    print(f"control: {res['target']} after {res['stamp']}: V0 {res['rate_v0']:.0%}, V1 {res['rate_v1']:.0%} "
          f"of {res['samples']} first actions each (ratio {res['ratio']:.1f}); {res['wall_s']:.0f} s")
    return 0 if res["rate_v1"] > res["rate_v0"] else 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rfs", description=HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, fn, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.set_defaults(fn=fn)
        return sp

    sp = add("run", cmd_run, "start (or continue) an experiment; with no arguments, the embedded default")
    sp.add_argument("experiment", nargs="?", help="experiment TOML (default: experiments/embedded.toml)")
    sp.add_argument("--rounds", type=int, help="override experiment.max_rounds")
    sp.add_argument("--name", help="override experiment.name (the run directory's name)")
    sp.add_argument("--hosts", help="hosts TOML (default: hosts.toml)")
    sp.add_argument("--plain", action="store_true", help="plain progress lines instead of the TUI")

    sp = add("resume", cmd_resume, "continue a run from its state file after a stop, crash or preemption")
    sp.add_argument("run", nargs="?", help="run directory (default: the most recent under runs/; with --from, "
                    "the new directory to rebuild, default runs/<the URL's last part>)")
    sp.add_argument("--from", dest="from_url", metavar="URL",
                    help="rebuild the run directory from its object-storage mirror (mirror.url) first")
    sp.add_argument("--hosts", help="hosts TOML (default: hosts.toml)")
    sp.add_argument("--plain", action="store_true", help="plain progress lines instead of the TUI")

    sp = add("watch", cmd_watch, "follow a run (started here or elsewhere) in the terminal UI; q quits, the run goes on")
    sp.add_argument("run", nargs="?", help="run directory (default: the most recent under runs/)")
    sp.add_argument("--plain", action="store_true", help="plain progress lines instead of the TUI")

    sp = add("report", cmd_report, "write report/ (hero plot, decomposition table, report.md, results.tsv)")
    sp.add_argument("run", nargs="?", help="run directory (default: the most recent under runs/)")

    sp = add("plan", cmd_plan, "the rollouts × rounds × replicates needed to detect an effect at 80%% power on "
             "the declared primary metric, and their cost in hours (docs/verdict.md)")
    sp.add_argument("experiment", nargs="?", help="experiment TOML (default: experiments/embedded.toml)")
    sp.add_argument("--run", help="a run directory: its calibration and its traces' measured variance")
    sp.add_argument("--effect", type=float, help="the shift in successful val_bpb to detect (default: 2σ of the seed noise)")
    sp.add_argument("--sigma", type=float, help="the seed's noise σ in val_bpb (default: the run's or the stored calibration)")
    sp.add_argument("--slots", type=int, help="training slots (default: those of the hosts file)")
    sp.add_argument("--hosts", help="hosts TOML (default: hosts.toml)")

    sp = add("setup", cmd_setup, "prepare the environment's data and the embedded researcher model (once)")
    sp.add_argument("experiment", nargs="?", help="experiment TOML (default: the embedded preset)")
    sp.add_argument("--force", action="store_true", help="redo the model conversion")

    sp = add("control", cmd_control, "the positive control: one synthetic round in which one value of one "
             "hyperparameter always carries the best stamp, consolidated once; prints how often V0 and V1, "
             "served and conditioned on the good stamp, choose it (exit 1 unless V1 chooses it more often)")
    sp.add_argument("--examples", type=int, default=16, help="synthetic traces, half of them good (default: 16)")
    sp.add_argument("--samples", type=int, default=50, help="first actions sampled per version (default: 50)")
    sp.add_argument("--epochs", type=float, help="override the fit's epochs (default: the control's)")
    sp.add_argument("--lr", type=float, help="override the fit's learning rate (default: the control's)")
    sp.add_argument("--run", help="directory for the round, V1 and the server logs (default: a new temp dir)")
    sp.add_argument("--experiment", help="experiment TOML (default: the embedded preset)")
    sp.add_argument("--hosts", help="hosts TOML (default: hosts.toml)")

    sp = add("doctor", cmd_doctor, "check Python, packages, the environment manifest, hosts and disk")
    sp.add_argument("--hosts", help="hosts TOML: also check each host over ssh (same Python, rfs, manifest; "
                    "GPUs), the placement, the vLLM executable and the SLURM job shape")
    sp.add_argument("--experiment", help="experiment TOML for --hosts (default: experiments/embedded.toml)")

    sp = add("rehearse", cmd_rehearse, "the smoke test before a long run: the real controller on HOSTS.toml's "
             "server GPUs, slots and SLURM partition with a stand-in vllm, stand-in jobs and real LoRA fits on a "
             "tiny model: A-S beside CTRL for 2 rounds (a SLURM preemption mid-wave, a kill -9, resume --from "
             "the mirror into a fresh directory), then B-F; one ok/FAIL line per rule (exit 1 on any FAIL). "
             "Without HOSTS.toml it starts a local SLURM and sshd first (tests/infra.py: needs the dev extra, "
             "slurm-wlm, munge, openssh-server)")
    sp.add_argument("hosts", nargs="?", metavar="HOSTS.toml", help="the hosts file of the long run (default: local infra)")
    sp.add_argument("--keep", metavar="DIR", help="a new directory for the rehearsal's runs, kept (default: a temp dir, "
                    "removed if every rule passed)")
    sp.add_argument("--verbose", action="store_true", help="the controllers' own output too")

    sp = add("env", cmd_env, "the environment alone: `env run FILE.py` runs any train.py through the trusted harness "
             "and prints its summary (exit 1 unless it succeeds); `env seed` runs the seed train.py once; "
             "`env calibrate` measures the noise floor")
    sp.add_argument("action", choices=["run", "seed", "calibrate"])
    sp.add_argument("file", nargs="?", help="env run: the train.py to run (the harness evaluates it, not its own prints)")
    sp.add_argument("--k", type=int, help="calibration runs (default: env.calibration_k)")
    sp.add_argument("--experiment", help="experiment TOML (default: the embedded preset)")
    sp.add_argument("--hosts", help="hosts TOML (default: hosts.toml)")
    return p


def stop_on_sigterm() -> None:
    """SIGTERM (`timeout`, `kill`, a SLURM preemption) stops rfs as Ctrl-C does: the controller is
    cancelled, so every launcher kills its jobs on the way out. By default the process would just
    end, and its running jobs would go on, orphaned, competing with the resumed run's."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


def expected(exc: BaseException) -> RfsError | None:
    """The RfsError `exc` is, or stands for: a task group that failed only with RfsErrors (a wave
    whose every slot is gone) stands for its first one."""
    if isinstance(exc, RfsError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        found = [expected(e) for e in exc.exceptions]
        return found[0] if all(found) else None
    return None


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    stop_on_sigterm()
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("rfs: interrupted; `python rfs.py resume` continues where this stopped", file=sys.stderr)
        return 130
    except Exception as exc:
        if (error := expected(exc)) is None:
            raise  # a bug: its traceback is the report
        print(f"rfs: {error}", file=sys.stderr)
        return 2
