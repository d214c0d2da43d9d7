"""Bootstrap that runs train.py under an audit hook: `python guard.py train.py` (started by harness.py).

The hook is installed before train.py's first line runs and cannot be removed. It denies reading
the data cache (the training split comes through the harness's pipe), writing outside the working directory and the temp
dir, starting other programs (a new interpreter would not carry the hook) and network sockets.
Each denial is written to a pipe the harness holds (fd RFS_GUARD_FD) before the PermissionError
is raised, so catching the error in train.py does not hide it; if the pipe is gone, the process
exits at once.
"""

import os
import runpy
import sys
import tempfile

GUARD_FD = int(os.environ["RFS_GUARD_FD"])
CACHE = os.path.realpath(os.environ["RFS_GUARD_CACHE"])
WRITABLE = tuple(os.path.realpath(p) for p in (os.getcwd(), tempfile.gettempdir(), "/dev/shm")) + ("/dev/null",)
EXEC_EVENTS = {"subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "pty.spawn"}
NET_EVENTS = {"socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg"}
PATH_WRITE_EVENTS = {"os.remove", "os.rename", "os.mkdir", "os.rmdir", "os.chmod", "os.symlink", "os.link", "os.truncate"}
_write = os.write  # bound before train.py could replace os.write


def _inside(path: str, roots) -> bool:
    return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)


def _deny(what: str) -> None:
    try:
        _write(GUARD_FD, (what.replace("\n", " ")[:300] + "\n").encode())
    except OSError:
        os._exit(97)  # the channel was tampered with: stop rather than run unrecorded
    raise PermissionError(f"harness guard: {what}")


def _path(arg) -> str | None:
    if isinstance(arg, int):
        return None  # an already-open fd
    try:
        return os.path.realpath(os.fsdecode(arg))
    except (TypeError, ValueError):
        return None


def _hook(event: str, args: tuple) -> None:
    if event == "open":
        path, mode, flags = _path(args[0]), args[1], args[2]
        if path is None:
            return
        if _inside(path, (CACHE,)):
            _deny(f"read of {path}")
        writing = (mode and any(c in mode for c in "wax+")) or (flags or 0) & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing and not _inside(path, WRITABLE):
            _deny(f"write to {path}")
    elif event in PATH_WRITE_EVENTS:
        for arg in args[:2]:
            path = _path(arg)
            if path is not None and not _inside(path, WRITABLE):
                _deny(f"{event} on {path}")
    elif event in EXEC_EVENTS:
        _deny(f"{event}: starting other programs is not allowed")
    elif event in NET_EVENTS:
        _deny(f"{event}: network access is not allowed")


if __name__ == "__main__":
    sys.addaudithook(_hook)
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.getcwd())
    runpy.run_path(sys.argv[0], run_name="__main__")
