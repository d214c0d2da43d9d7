"""A researcher server that is one local process tree: started, health-checked, watched, killed.

The process runs in its own session so stop() can kill everything it spawned. A watcher thread
waits on it and reports a death nobody asked for as `server_crashed`; health() then says False and
the collect stage marks the rollouts that were talking to it infra_error. A thread (not a task)
because the watcher must outlive whichever task group happened to start the server. The child
also asks the kernel for SIGKILL when rfs dies, so a kill -9 of the controller leaves no server.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import anyio
import httpx

from rfs.events import EventLog
from rfs.serve.base import ServerError, last_log_line

try:  # looked up here, in the parent: a dlopen between fork and exec can deadlock
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):
    _prctl = None
PR_SET_PDEATHSIG = 1


class ProcessServer:
    backend = ""
    health_path = "/v1/models"  # relative to the server root
    enforces_schema = True
    start_timeout_s = 120.0

    def __init__(self, model_dir: Path, model_id: str, port: int, log_path: Path,
                 events: EventLog | None = None, cpus: tuple[int, ...] = (), env: dict[str, str] | None = None):
        self.model_dir, self.model_id, self.port = Path(model_dir), model_id, port
        self.log_path, self.events, self.cpus = Path(log_path), events, cpus
        self.env = {**os.environ, **(env or {})}
        self.root = f"http://127.0.0.1:{port}"
        self.base_url = f"{self.root}/v1"
        self._proc: subprocess.Popen | None = None
        self._stopping = False
        self._up = False  # was healthy: only then is a death a crash (a failed start raises instead)

    # The two things a backend decides.
    def prepare(self, model_dir: Path) -> Path:
        """What the server loads for `model_dir` (blocking: runs in a worker thread)."""
        return model_dir

    def argv(self, served: Path, model_id: str) -> list[str]:
        raise NotImplementedError

    async def before_launch(self) -> None:
        """Waits for what the process needs free (vLLM: its GPUs' memory); nothing by default."""

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    async def start(self) -> None:
        await self._launch(await anyio.to_thread.run_sync(self.prepare, self.model_dir))
        self._emit("server_started")

    async def restart(self, model_dir: Path, model_id: str) -> None:
        # Convert first, so the old server keeps answering until the new weights are ready.
        served = await anyio.to_thread.run_sync(self.prepare, Path(model_dir))
        await self._kill()
        self.model_dir, self.model_id = Path(model_dir), model_id
        await self._launch(served)
        self._emit("server_restarted")

    async def stop(self) -> None:
        if self._proc is not None:
            with anyio.CancelScope(shield=True):  # stop() is what cleanup after a cancel calls
                await self._kill()
            self._emit("server_stopped")
            self._proc = None

    async def health(self) -> bool:
        if self._proc is None or self._proc.poll() is not None:
            return False
        try:
            async with httpx.AsyncClient(timeout=5.0) as client:
                return (await client.get(self.root + self.health_path)).status_code == 200
        except httpx.HTTPError:
            return False

    async def _launch(self, served: Path) -> None:
        await self.before_launch()
        argv = self.argv(served, self.model_id)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== rfs {time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(argv)}\n".encode())
            log.flush()
            self._stopping, self._up = False, False
            try:
                self._proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                    start_new_session=True, preexec_fn=self._in_child,
                )
            except OSError as exc:
                raise ServerError(f"cannot start the {self.backend} server ({exc}); install it here, "
                                  "or change researcher.backend") from None
        threading.Thread(target=self._watch, args=(self._proc,), daemon=True).start()
        try:
            await self._until_healthy(self._proc)
            self._up = True
        except BaseException:  # failed, timed out or cancelled: never leave a half-started server
            with anyio.CancelScope(shield=True):
                await self._kill()
            raise

    async def _until_healthy(self, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + self.start_timeout_s
        while not await self.health():
            if proc.poll() is not None:
                raise ServerError(f"{self.backend} server exited with {proc.returncode} while starting: "
                                  f"{last_log_line(self.log_path)}; its whole log is {self.log_path}")
            if time.monotonic() > deadline:
                raise ServerError(f"{self.backend} server not healthy after {self.start_timeout_s:.0f} s: "
                                  f"{last_log_line(self.log_path)}; its whole log is {self.log_path}")
            await anyio.sleep(0.25)

    def _in_child(self) -> None:
        """Runs in the child before exec: what is set here holds for every thread it starts."""
        if self.cpus:
            os.sched_setaffinity(0, self.cpus)
        if _prctl is not None:  # Linux: the server dies with the thread that started it
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)

    def _watch(self, proc: subprocess.Popen) -> None:
        code = proc.wait()
        if proc is self._proc and self._up and not self._stopping:
            self._emit("server_crashed", exit_code=code)

    async def _kill(self) -> None:
        """SIGTERM the whole session, SIGKILL what is left after a grace period."""
        proc = self._proc
        if proc is None:
            return
        self._stopping = True
        for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break  # the group is gone
            with anyio.move_on_after(grace):
                while proc.poll() is None:
                    await anyio.sleep(0.05)
            if proc.poll() is not None and not _group_alive(proc.pid):
                break

    def _emit(self, kind: str, **fields: object) -> None:
        if self.events is not None:
            self.events.emit(kind, version=self.model_id, base_url=self.base_url, backend=self.backend, **fields)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
