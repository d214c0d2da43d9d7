"""The watch app: thin widgets over `RunView`, fed by polling events.jsonl.

It reads the run directory and nothing else (no socket to the controller), so it works the same
in tmux, over ssh, or attached to a run started on another machine with a shared filesystem.
Quitting the watcher never touches the run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from rich.markup import escape
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from rfs.events import read_events
from rfs.rundir import RunDir
from rfs.tui import transcript
from rfs.tui.model import RunView

POLL_S = 0.5
SPARK_WIDTH = 44  # rounds shown, one character each
_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """One bar per round, height scaled between the lowest and highest value shown."""
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BARS[round((v - lo) / span * (len(_BARS) - 1))] for v in values)


class TranscriptScreen(Screen):
    """One rollout's messages and diff, read from its trace row."""

    BINDINGS = [Binding("escape,backspace", "app.pop_screen", "back")]

    def __init__(self, run: RunDir, arm: str, round_: int, rollout_id: str):
        super().__init__()
        self.run, self.arm, self.round, self.rollout_id = run, arm, round_, rollout_id

    def compose(self) -> ComposeResult:
        row = transcript.load_trace(self.run, self.arm, self.round, self.rollout_id)
        text = (
            transcript.render(row)
            if row is not None
            else f"{self.arm} round {self.round} {self.rollout_id}: no trace row yet (still in flight)"
        )
        with VerticalScroll():
            yield Static(Text(text), id="transcript")
        yield Footer()


class WatchApp(App):
    TITLE = "rfs watch"
    CSS = """
    #title { background: $primary; color: $text; padding: 0 1; }
    #arms { padding: 0 1; }
    #arm { padding: 0 1; color: $text; }
    #side { width: 48; border-left: solid $primary; padding: 0 1; }
    #spark { color: $accent; }
    .label { color: $text-muted; margin-top: 1; }
    #alarms { color: $error; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit (run keeps going)"),
        Binding("tab", "next_arm(1)", "next arm", priority=True),
        Binding("shift+tab", "next_arm(-1)", "previous arm", priority=True),
        *[Binding(str(n), f"select_arm({n - 1})", show=False) for n in range(1, 10)],
    ]

    def __init__(self, run_dir: Path, poll_s: float = POLL_S):
        super().__init__()
        self.run = RunDir(Path(run_dir))
        self.view = RunView()
        self.offset = 0
        self.poll_s = poll_s
        self.selected = 0

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield Static(id="arms")
        with Horizontal():
            with Vertical():
                yield Static(id="arm")
                yield DataTable(id="rollouts", cursor_type="row", zebra_stripes=True)
            with Vertical(id="side"):
                yield Static("val_bpb, best per round (lower is better)", classes="label")
                yield Static(id="spark")
                yield Static(id="trajectory")
                yield Static("slots", classes="label")
                yield Static(id="slots")
                yield Static("alarms", classes="label")
                yield Static(id="alarms")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one(DataTable).add_columns("rollout", "thread", "turns", "state")
        self.poll()
        self.set_interval(self.poll_s, self.poll)

    def poll(self) -> None:
        events, self.offset = read_events(self.run.events, self.offset)
        if events or self.offset == 0:
            self.view.apply_all(events)
            self.refresh_view()

    def arm_names(self) -> list[str]:
        return list(self.view.arms)

    def action_next_arm(self, step: int) -> None:
        if self.view.arms:
            self.selected = (self.selected + step) % len(self.view.arms)
            self.refresh_view()

    def action_select_arm(self, index: int) -> None:
        if index < len(self.view.arms):
            self.selected = index
            self.refresh_view()

    def on_data_table_row_selected(self, message: DataTable.RowSelected) -> None:
        arm = self.view.arms[self.arm_names()[self.selected]]
        if arm.round is not None and message.row_key.value is not None:
            self.push_screen(TranscriptScreen(self.run, arm.name, arm.round, message.row_key.value))

    def refresh_view(self) -> None:
        v = self.view
        state = "finished" if v.finished else "running"
        last = time.strftime("%H:%M:%S", time.localtime(v.last_t)) if v.last_t else "-"
        title = f"rfs watch  {v.experiment or self.run.root.name}  {state}  last event {last}"
        self.query_one("#title", Static).update(Text(title + (f"  scheduler: {v.last_scheduler}" if v.last_scheduler else "")))
        names = self.arm_names()
        if not names:
            self.query_one("#arms", Static).update(Text(f"waiting for events in {self.run.events}"))
            return
        self.selected = min(self.selected, len(names) - 1)
        tabs = [
            f"[reverse] {i + 1} {escape(n)} [/]" if i == self.selected else f" {i + 1} {escape(n)} "
            for i, n in enumerate(names)
        ]
        self.query_one("#arms", Static).update(" ".join(tabs))
        arm = v.arms[names[self.selected]]
        self.query_one("#arm", Static).update(Text(_arm_line(arm)))
        self._fill_rollouts(arm)
        trajectory = v.trajectory(arm.name)
        self.query_one("#spark", Static).update(Text(sparkline(trajectory[-SPARK_WIDTH:])))
        self.query_one("#trajectory", Static).update(Text(" → ".join(f"{b:.3f}" for b in trajectory) or "no successful round yet"))
        self.query_one("#slots", Static).update(Text(_slots_text(v)))
        alarms = [" ".join(x for x in (a.kind, a.arm, a.message) if x) for a in v.alarms[-8:]]
        self.query_one("#alarms", Static).update(Text("\n".join(alarms) or "none"))

    def _fill_rollouts(self, arm) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in arm.round_rollouts():
            turns = f"{r.turns}" + (f" ({r.invalid_turns} invalid)" if r.invalid_turns else "")
            table.add_row(r.rollout_id, "" if r.thread is None else str(r.thread), turns, r.state, key=r.rollout_id)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))


def _arm_line(arm) -> str:
    parts = [f"arm {arm.name}", f"round {arm.round if arm.round is not None else '-'}", f"phase {arm.phase or '-'}"]
    parts.append(f"researcher {arm.version or '-'}")
    if arm.server:
        parts.append(f"server {arm.server}")
    if arm.round is not None:
        parts.append(arm.round_summary())
    if arm.last_loss is not None and math.isfinite(arm.last_loss):
        parts.append(f"loss {arm.last_loss:.3f} kl {arm.last_kl:.3f}")
    if arm.paused:
        parts.append(f"PAUSED: {arm.paused}")
    return "  ".join(parts)


def _slots_text(v: RunView) -> str:
    slots = sorted(set(v.slots) | set(v.quarantined))
    lines = []
    for s in slots:
        if s in v.quarantined:
            lines.append(f"{s}  QUARANTINED")
        else:
            lines.append(f"{s}  {v.slots[s] or 'idle'}")
    return "\n".join(lines) or "no runs yet"
