"""The watch app: thin widgets over `RunView`, fed by polling events.jsonl.

It reads the run directory and nothing else (no socket to the controller), so it works the same
in tmux, over ssh, or attached to a run started on another machine with a shared filesystem.
Quitting the watcher never touches the run.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyarrow as pa
from rich.markup import escape
from rich.text import Text
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Static

from rfs.rundir import RunDir
from rfs.tui import transcript
from rfs.tui.model import Loop, Rollout, RunView
from rfs.tui.tail import LogTail

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

    def __init__(self, run: RunDir, loop: str, round_: int, rollout_id: str):
        super().__init__()
        self.rundir, self.loop, self.round, self.rollout_id = run, loop, round_, rollout_id

    def compose(self) -> ComposeResult:
        name = f"{self.loop} round {self.round} {self.rollout_id}"
        try:
            row = transcript.load_trace(self.rundir, self.loop, self.round, self.rollout_id)
            text = transcript.render(row) if row is not None else f"{name}: no trace row yet (still in flight)"
        except (OSError, ValueError, pa.ArrowException) as e:  # unreadable: say so on screen; the watcher goes on
            text = f"{name}: cannot read its trace: {e}"
        with VerticalScroll():
            yield Static(_styled(text), id="transcript")
        yield Footer()


def _styled(text: str) -> Text:
    """Section rules in bold, and the diff's added and removed lines in green and red."""
    out, in_diff = Text(), False
    for line in text.splitlines():
        in_diff = in_diff or line.startswith("── diff")
        style = "bold" if line.startswith("── ") else ""
        if in_diff and not style and line[:1] in "+-" and line[:3] not in ("+++", "---"):
            style = "green" if line.startswith("+") else "red"
        out.append(line + "\n", style=style)
    return out


class RolloutTable(DataTable):
    """The rollouts of the shown round; enter opens one (DataTable's own enter is unlabelled)."""

    BINDINGS = [Binding("enter", "select_cursor", "transcript")]


_MAIN_ONLY = {"next_loop", "select_loop", "browse_round", "follow"}


class WatchApp(App):
    TITLE = "rfs watch"
    CSS = """
    #title { background: $primary; color: $text; padding: 0 1; }
    #now { padding: 0 1; color: $warning; }
    #loops { padding: 0 1; }
    #loop { padding: 0 1; color: $text; }
    #side { width: 48; border-left: solid $primary; padding: 0 1; }
    #spark { color: $accent; }
    .label { color: $text-muted; margin-top: 1; }
    #alarms { color: $error; }
    """
    BINDINGS = [
        Binding("q", "quit", "quit (the run goes on)"),
        Binding("tab", "next_loop(1)", "next loop", priority=True),
        Binding("shift+tab", "next_loop(-1)", "prev loop", priority=True),
        Binding("[", "browse_round(-1)", "earlier round"),
        Binding("]", "browse_round(1)", "later"),
        Binding("f", "follow", "follow the live loop"),
        *[Binding(str(n), f"select_loop({n - 1})", show=False) for n in range(1, 10)],
    ]

    def __init__(self, run_dir: Path, poll_s: float = POLL_S, at_last_event: bool = False):
        super().__init__()
        self.at_last_event = at_last_event  # times as of the last event, not now (screenshots of recorded runs)
        self.rundir = RunDir(Path(run_dir))
        self.view = RunView()
        self.tail = LogTail(self.rundir.events)
        self.poll_s = poll_s
        self.selected = 0
        self.shown_round: int | None = None  # None: follow the loop's live round
        self.following = True  # show whichever loop is working; a loop key stops it, f resumes

    def compose(self) -> ComposeResult:
        yield Static(id="title")
        yield Static(id="now")
        yield Static(id="loops")
        with Horizontal():
            with Vertical():
                yield Static(id="loop")
                yield RolloutTable(id="rollouts", cursor_type="row", zebra_stripes=True)
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
        events, restarted = self.tail.read()
        if restarted:
            self.view = RunView()
        if events or restarted or self.tail.offset == 0:
            self.view.apply_all(events)
            self.refresh_view()

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # the loop and round keys steer the main screen only, not the one behind a transcript
        return not (action in _MAIN_ONLY and isinstance(self.screen, TranscriptScreen))

    def loop_names(self) -> list[str]:
        return list(self.view.loops)

    def current_loop(self) -> Loop | None:
        names = self.loop_names()
        return self.view.loops[names[min(self.selected, len(names) - 1)]] if names else None

    def current_round(self, loop: Loop) -> int | None:
        return loop.round if self.shown_round is None else self.shown_round

    def action_next_loop(self, step: int) -> None:
        if self.view.loops:
            self.selected, self.shown_round = (self.selected + step) % len(self.view.loops), None
            self.following = False
            self.refresh_view()

    def action_select_loop(self, index: int) -> None:
        if index < len(self.view.loops):
            self.selected, self.shown_round = index, None
            self.following = False
            self.refresh_view()

    def action_follow(self) -> None:
        self.following, self.shown_round = True, None
        self.refresh_view()

    def _follow(self) -> None:
        """Select the live loop: the shown one while it works, else the one that worked last."""
        names = self.loop_names()
        current = names[self.selected] if self.selected < len(names) else None
        live = self.view.live_loop(current)
        if live is not None and live != current:
            self.selected, self.shown_round = names.index(live), None

    def action_browse_round(self, step: int) -> None:
        loop = self.current_loop()
        rounds = loop.rounds() if loop else []
        if loop is None or not rounds or self.current_round(loop) not in rounds:
            return
        target = rounds[max(0, min(len(rounds) - 1, rounds.index(self.current_round(loop)) + step))]
        self.shown_round = None if target == loop.round else target
        self.refresh_view()

    def on_data_table_row_selected(self, message: DataTable.RowSelected) -> None:
        self.open_rollout(message.row_key.value)

    def open_rollout(self, rollout_id: str | None) -> None:
        loop = self.current_loop()
        if loop is not None and rollout_id is not None and self.current_round(loop) is not None:
            self.push_screen(TranscriptScreen(self.rundir, loop.name, self.current_round(loop), rollout_id))

    def refresh_view(self) -> None:
        v = self.view
        if self.following:
            self._follow()
        state = "finished" if v.finished else "running"
        last = time.strftime("%H:%M:%S", time.localtime(v.last_t)) if v.last_t else "-"
        title = f"rfs watch  {v.experiment or self.rundir.root.name}  {state}  last event {last}"
        if v.phase:
            title += f"  {v.phase}"
        if v.server:
            title += f"  server {v.server}"
        if v.last_scheduler:
            title += f"  scheduler: {v.last_scheduler}"
        self.query_one("#title", Static).update(Text(title))
        now = ["finished: q quits and prints the answer (the decomposition table, where the report is)"] if v.finished \
            else v.activities(v.last_t if self.at_last_event and v.last_t else time.time())
        self.query_one("#now", Static).update(Text("\n".join(now)))
        self.query_one("#slots", Static).update(Text(_slots_text(v)))
        alarms = [" ".join(x for x in (a.kind, a.loop, a.message) if x) for a in v.alarms[-8:]]
        self.query_one("#alarms", Static).update(Text("\n".join(alarms) or "none"))
        self._show_loop(self.current_loop())

    def _show_loop(self, loop: Loop | None) -> None:
        names = self.loop_names()
        self.selected = min(self.selected, max(len(names) - 1, 0))
        tabs = [
            f"[reverse] {i + 1} {escape(n)} [/]" if i == self.selected else f" {i + 1} {escape(n)} "
            for i, n in enumerate(names)
        ]
        if tabs:
            tabs.append("(following the live loop)" if self.following else "(f: follow the live loop)")
        empty = (f"no loop has started yet: the run is in its {self.view.phase} phase" if self.view.phase
                 else f"waiting for events in {self.rundir.events}")
        self.query_one("#loops", Static).update(" ".join(tabs) or escape(empty))
        round_ = self.current_round(loop) if loop else None
        idle = self.view.idle_reason(loop.name) if loop else ""
        self.query_one("#loop", Static).update(Text(_loop_lines(loop, round_, idle) if loop else ""))
        self._fill_rollouts(loop.round_rollouts(round_) if loop else [])
        trajectory = self.view.trajectory(loop.name) if loop else []
        self.query_one("#spark", Static).update(Text(sparkline(trajectory[-SPARK_WIDTH:])))
        self.query_one("#trajectory", Static).update(Text(" → ".join(f"{b:.3f}" for b in trajectory) or "no successful round yet"))

    def _fill_rollouts(self, rollouts: list[Rollout]) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in rollouts:
            turns = f"{r.turns}" + (f" ({r.invalid_turns} invalid)" if r.invalid_turns else "")
            table.add_row(r.rollout_id, "" if r.thread is None else str(r.thread), turns, r.state, key=r.rollout_id)
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))


def _loop_lines(loop: Loop, round_: int | None, idle: str = "") -> str:
    """Who and where on the first line; how the shown round is going on the second."""
    if round_ is None or round_ == loop.round:
        where = f"round {loop.round if loop.round is not None else '-'} (live)"
    else:
        where = f"round {round_} of {loop.round} (] for live)"
    first = [f"loop {loop.name}", where, f"phase {loop.phase or '-'}", f"researcher {loop.version or '-'}"]
    if loop.server:
        first.append(f"server {loop.server}")
    if loop.paused:
        first.append(f"PAUSED: {loop.paused}")
    elif idle:
        first.append(f"idle: {idle}")
    second = []
    if round_ is not None:  # a loop that starts from the shared round has no rollouts of its own in it
        second.append(loop.round_summary(round_) if loop.round_rollouts(round_) else f"no rollouts of its own in round {round_}")
    if loop.last_loss is not None and math.isfinite(loop.last_loss):
        second.append(f"last LoRA loss {loop.last_loss:.3f} kl {loop.last_kl:.3f}")
    return "  ".join(first) + "\n" + "  ".join(second)


def _slots_text(v: RunView) -> str:
    slots = sorted(set(v.slots) | set(v.quarantined))
    lines = []
    for s in slots:
        if s in v.quarantined:
            lines.append(f"{s}  QUARANTINED")
        else:
            lines.append(f"{s}  {v.slots[s] or 'idle'}")
    return "\n".join(lines) or "no runs yet"
