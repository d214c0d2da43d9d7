"""The rehearsal's rules, each checked from a run directory (or what the rehearsal watched) and
said as one `ok` / `FAIL` line: placement, server starts and releases, rounds finished, trace rows,
ssh hosts used, SLURM's nodes and GPUs, one pool allocation, preemption (rfs.rehearse runs them)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pyarrow.parquet as pq

from rfs import hosts
from rfs.events import read_events
from rfs.hosts import HostsFile
from rfs.placement import LOCAL, V0
from rfs.rundir import RunDir


@dataclass(frozen=True)
class Rule:
    ok: bool
    name: str
    detail: str = ""

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name}" + (f": {self.detail}" if self.detail else "")




def _events(run: RunDir) -> list[dict]:
    return read_events(run.events)[0] if run.events.exists() else []


def _since_last_start(events: list[dict]) -> list[dict]:
    """The events of the run's last controller (a resumed run's directory holds its predecessor's too)."""
    starts = [i for i, e in enumerate(events) if e["kind"] == "experiment_started"]
    return events[starts[-1]:] if starts else events


def _rows(run: RunDir) -> list[dict]:
    return [r for p in run.trace_files() for r in pq.read_table(p).to_pylist()]


def check_placement(run: RunDir) -> Rule:
    """No GPU of this host given to two users (servers, the LoRA fit, local slots)."""
    plan = json.loads(run.placement.read_text())
    users: dict[int, list[str]] = {}
    for s in plan["servers"]:
        for g in s["gpus"]:
            users.setdefault(g, []).append(f"server {s['key']}")
    for g in plan["fit_gpus"]:
        users.setdefault(g, []).append("fit")
    for s in plan["slots"]:
        if s["host"] == LOCAL and s["gpu"] >= 0:
            users.setdefault(s["gpu"], []).append(f"slot {s['name']}")
    shared = {g: who for g, who in users.items() if len(who) > 1}
    servers = ", ".join(f"{s['key']} gpus {s['gpus'] or 'cpu'} port {s['port']}" for s in plan["servers"])
    return Rule(not shared, "placement: every GPU has one user",
                f"GPU shared: {shared}" if shared else f"{servers}; fit gpus {plan['fit_gpus'] or 'cpu'}")


def check_servers_started(run: RunDir, standin: Path) -> Rule:
    """Each stand-in vLLM start got its planned server's GPUs (CUDA_VISIBLE_DEVICES) and port."""
    plan = {s["key"]: s for s in json.loads(run.placement.read_text())["servers"]}
    starts = [json.loads(p.read_text()) for p in sorted(standin.glob("*.json"))]
    wrong = []
    for s in starts:
        key = s["flags"]["--served-model-name"].split("/")[0]
        want = plan.get(key)
        gpus = ",".join(map(str, want["gpus"])) if want else None
        if not want or (s["cuda_visible_devices"] or "") != gpus or s["flags"]["--port"] != str(want["port"]):
            wrong.append(f"{key} on gpus {s['cuda_visible_devices']!r} port {s['flags']['--port']}")
    ok = bool(starts) and not wrong
    return Rule(ok, "servers: each vLLM started on its planned GPUs and port",
                "; ".join(wrong) if wrong else f"{len(starts)} starts" if starts else "no server started")


def check_released(run: RunDir) -> Rule:
    """Each gold loop's own server stopped when that loop finished; V0's once no loop needed it any
    more: after the baselines finished and each gold loop's round 1, and before the last gold loop
    finished when that one outlived those needs (rfs.loop.serving.v0_needed)."""
    events = _since_last_start(_events(run))
    kinds = [(e["kind"], str(e.get("version", ""))) for e in events]
    states = run.read_state().get("loops", {})

    def first(pred) -> int | None:
        return next((i for i, e in enumerate(events) if pred(e, kinds[i])), None)

    def done(loop: str) -> int | None:
        return first(lambda e, k: e["kind"] == "phase" and e.get("phase") == "done" and e.get("loop") == loop)

    v0 = first(lambda e, k: k[0] == "server_stopped" and k[1].startswith(f"{V0}/"))
    gold = sorted({k[1].split("/")[0] for k in kinds if k[0] == "server_started" and not k[1].startswith(f"{V0}/")})
    bad = []
    for loop in gold:
        end, stop = done(loop), first(lambda e, k: k[0] == "server_stopped" and k[1].startswith(f"{loop}/"))
        if None in (end, stop) or not end < stop:
            bad.append(f"{loop}: done #{end}, its server stopped #{stop}")
    needs = [done(name) for name, st in states.items() if st.get("kind") != "gold"]
    needs += [first(lambda e, k, n=name: e["kind"] == "consolidated" and e.get("loop") == n and e.get("round") == 1)
              for name, st in states.items() if st.get("kind") == "gold"]
    last_gold = max((done(loop) or 0 for loop in gold), default=0)
    if v0 is None or None in needs or v0 < max(needs, default=0):
        bad.append(f"V0's server stopped #{v0}, while a loop still needed it (#{needs})")
    elif max(needs, default=0) < last_gold < v0:
        bad.append(f"V0's server stopped #{v0}, after the last gold loop finished (#{last_gold}): "
                   f"kept up though nothing needed it after #{max(needs, default=0)}")
    return Rule(bool(gold) and not bad, "servers: a gold loop's server stopped with its loop, V0's once nothing needed it",
                "; ".join(bad) if bad else ", ".join(gold) if gold else "no gold loop server started")


def check_finished(run: RunDir, rounds: int) -> Rule:
    loops = run.read_state().get("loops", {})
    short = {k: (v.get("round"), v.get("status")) for k, v in loops.items() if v.get("round") != rounds or v.get("status") != "done"}
    return Rule(bool(loops) and not short, f"every loop finished its {rounds} rounds",
                f"not finished: {short}" if short else ", ".join(loops) or "no loop in state.json")


def check_rows(run: RunDir, rollouts: int) -> Rule:
    """Every round of every loop has its file, with `rollouts` researcher rows, none twice, all successes
    (the shared round 1 is in each of its lines' files: a rollout twice within one file is the fault)."""
    bad, n = [], 0
    for loop, st in run.read_state().get("loops", {}).items():
        bad += [f"{loop}/round-{r}: no file" for r in range(1, st.get("round", 0) + 1) if not run.traces(loop, r).exists()]
    for path in run.trace_files():
        rows = pq.read_table(path).to_pylist()
        n += len(rows)
        ids = [r["rollout_id"] for r in rows]
        where = f"{path.parent.name}/{path.stem}"
        if (mine := sum(not r["seed_control"] for r in rows)) != rollouts:
            bad.append(f"{where}: {mine} researcher rows, not {rollouts}")
        if twice := sorted({i for i in ids if ids.count(i) > 1}):
            bad.append(f"{where}: duplicated {twice}")
        bad += [f"{r['rollout_id']}: {r['status']} ({r['detail']})" for r in rows if r["status"] != "success"]
    return Rule(n > 0 and not bad, "traces: no row lost or duplicated, every row a success",
                "; ".join(bad[:5]) if bad else f"{n} rows in {len(run.trace_files())} round files")


def check_ssh_hosts(run: RunDir, hf: HostsFile) -> Rule:
    want = {s.host for s in hosts.slots(hf) if s.launcher == "ssh"}
    ran = {e["host"] for e in _events(run) if e["kind"] == "run_started"}
    return Rule(want <= ran, "ssh: every ssh host ran jobs", f"never ran: {sorted(want - ran)}" if want - ran else ", ".join(sorted(want)))


def check_slurm_gpus(run: RunDir) -> Rule:
    """Every SLURM step ran on a node SLURM chose (the row's host) with the GPU SLURM gave it: its
    CUDA_VISIBLE_DEVICES is the step's own SLURM_STEP_GPUS (the stand-in job prints both)."""
    rows = [r for r in _rows(run) if r["slot"].startswith("slurm")]
    nodes = sorted({r["host"] for r in rows})
    bad = []
    for r in rows:
        said = [line.split(": ", 1)[1].split() for line in r["stdout_tail"].splitlines() if line.startswith("| gpus: ")]
        cvd, step = said[-1] if said else ("unset", "unset")
        if not r["host"] or cvd == "unset" or cvd != step:
            bad.append(f"{r['rollout_id']} on {r['host'] or '?'}: CUDA_VISIBLE_DEVICES {cvd}, SLURM's {step}")
    return Rule(bool(rows) and not bad, "SLURM: each step on the node and GPU SLURM gave it",
                "; ".join(bad[:3]) if bad else f"{len(rows)} steps on {', '.join(nodes)}")


def check_one_allocation(most: int) -> Rule:
    return Rule(most == 1, "SLURM: one pool allocation at a time for every loop's waves", f"at most {most} running at once")


def check_preemption(run: RunDir, preempted: list[str], left: list[str]) -> Rule:
    """The scancelled allocation's runs were infra_error on SLURM slots only, ran again in a new
    allocation, and no allocation is left when the run ends."""
    events = _since_last_start(_events(run))
    lost = [e for e in events if e["kind"] == "run_finished" and e["status"] == "infra_error"]
    rows = _rows(run)
    again = [r for r in rows if r["infra_attempts"]]
    allocations = {int(r["job_id"].split(".")[0]) for r in rows if r["slot"].startswith("slurm") and r["job_id"]}
    problems = [what for what, bad in (
        ("never preempted mid-wave", not preempted),
        ("no run was lost to it (infra_error)", not lost),
        ("an infra_error on a slot that is not SLURM's", any(not e["slot"].startswith("slurm") for e in lost)),
        ("the lost runs never ran again", not again),
        ("no new allocation after it", not allocations or not preempted or max(allocations) <= max(map(int, preempted))),
        (f"allocations left at the end: {left}", bool(left)),
    ) if bad]
    return Rule(not problems, "SLURM: a preempted allocation's runs were infra_error, re-ran in a new one",
                "; ".join(problems) if problems else f"scancelled {preempted}; {len(lost)} runs lost, re-run")


def checked(*calls: tuple) -> list[Rule]:
    """Each (check, *args) called; a check whose files are missing or unreadable (a controller that
    died early) is that rule's FAIL, not the end of the rehearsal."""
    rules = []
    for check, *args in calls:
        try:
            rules.append(check(*args))
        except (OSError, ValueError, KeyError) as exc:
            rules.append(Rule(False, check.__name__.removeprefix("check_"), f"could not check: {type(exc).__name__}: {exc}"))
    return rules
