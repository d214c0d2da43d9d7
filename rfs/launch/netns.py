"""Cutting a local job off the network.

As root: one empty network namespace per controller process, made once and held open by a file
descriptor. On Linux a network namespace belongs to a thread, not to the whole process, and a
child starts in its parent thread's, so the worker thread that starts a job enters the namespace
just around the fork and the job pays nothing for its isolation, where an `unshare --net` in front
of each job would make and tear down a namespace per job (its cost: docs/LOG.md). Without
that privilege a job runs behind `unshare --net --map-root-user` where user namespaces are
allowed, and with the network where neither is.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

CLONE_NEWNET = 0x40000000
UNPRIVILEGED = ("unshare", "--net", "--map-root-user")


class Namespace:
    """An empty network namespace (only a loopback device, down). Making one needs CAP_SYS_ADMIN."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self._own = _open_thread_netns()
        try:
            self._call("unshare", CLONE_NEWNET)  # moves this thread only; refused: nothing changed
            try:
                self._isolated = _open_thread_netns()
            finally:
                self._enter(self._own)
        except BaseException:
            os.close(self._own)
            raise

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in the namespace for the block (a child it starts stays there)."""
        self._enter(self._isolated)
        try:
            yield
        finally:
            self._enter(self._own)

    def _enter(self, fd: int) -> None:
        try:
            self._call("setns", fd, CLONE_NEWNET)
        except OSError as exc:  # cannot happen to a thread that could make the namespace
            raise RuntimeError(f"could not move a thread between network namespaces: {exc}") from exc

    def _call(self, name: str, *args: int) -> None:
        if getattr(self._libc, name)(*args) != 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"{name}: {os.strerror(errno)}")


def _open_thread_netns() -> int:
    return os.open("/proc/thread-self/ns/net", os.O_RDONLY)


@dataclass(frozen=True)
class Isolation:
    """How this machine cuts a job off the network: a namespace its starting thread enters, an argv
    prefix, or neither."""

    namespace: Namespace | None = None
    prefix: tuple[str, ...] = ()

    def entered(self) -> contextlib.AbstractContextManager[None]:
        return self.namespace.entered() if self.namespace else contextlib.nullcontext()

    def __str__(self) -> str:
        if self.namespace:
            return "network namespace (entered by the starting thread)"
        return " ".join(self.prefix) or "none"


@functools.cache
def isolation() -> Isolation:
    """The cheapest isolation this machine allows, found once per process."""
    try:
        return Isolation(namespace=Namespace())
    except (OSError, AttributeError):  # no privilege, no /proc/thread-self, no unshare in libc
        pass
    if shutil.which("unshare") is not None:
        try:
            if subprocess.run([*UNPRIVILEGED, "true"], check=False, capture_output=True, timeout=10).returncode == 0:
                return Isolation(prefix=UNPRIVILEGED)
        except (OSError, subprocess.TimeoutExpired):
            pass
    return Isolation()
