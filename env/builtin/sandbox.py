"""Confines one training run by the operating system (started by harness.py, stdlib only):

    unshare --mount --pid --fork --mount-proc ... python sandbox.py --workdir W --hide D ... -- ARGV

Inside fresh mount and PID namespaces it hides each D under an empty read-only tmpfs (the data
cache: the validation split cannot be opened at all, by Python, C or anything else) and each
--hide-file F under an empty file no one may read, gives the
run a private /tmp and /dev/shm (nothing carried between runs), keeps W writable, remounts every
other filesystem read-only (the harness's own files and the controller's code cannot be edited),
then execs ARGV with an empty capability bounding set and no_new_privs, so the run cannot undo any
of it (umount, remount, open_by_handle_at, ptrace of processes it cannot see anyway). ARGV is the
PID namespace's init: when it exits, the kernel kills everything it left behind.
"""

import argparse
import ctypes
import os
import sys
import tempfile

MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 32, 4096, 1024, 2048, 1 << 21
FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
         "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
KEEP_RW = ("/proc", "/dev")  # the fresh /proc of this PID namespace; device nodes (a GPU's)
LIBC = ctypes.CDLL(None, use_errno=True)
CHECKOUT = os.path.realpath(os.path.join(os.path.dirname(__file__), "..", ".."))  # rfs's, with env/


def mount(source, target: str, fstype, flags: int, data=None) -> None:
    enc = lambda s: s.encode() if isinstance(s, str) else s  # noqa: E731
    if LIBC.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {target}: {os.strerror(err)}")


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _mounts() -> list[tuple[str, int]]:
    """(mount point, per-mount flags to keep) for every mount this namespace sees."""
    out = []
    for line in open("/proc/self/mountinfo"):
        fields = line.split()
        point = fields[4].replace("\\040", " ")
        flags = sum(FLAGS.get(opt, 0) for opt in fields[5].split(","))
        out.append((point, flags))
    return out


def confine(workdir: str, hide: list[str], hide_files: list[str]) -> None:
    held = os.open(workdir, os.O_PATH | os.O_DIRECTORY)
    for d in hide:
        mount("rfs-hidden", d, "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=000")
    if hide_files:  # an empty file nobody may read, bound over each (without capabilities, root is nobody here)
        fd, blank = tempfile.mkstemp(dir="/dev/shm", prefix=".rfs-hidden-")
        os.close(fd)
        os.chmod(blank, 0)
        for f in hide_files:
            mount(blank, f, None, MS_BIND)
            mount(None, f, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
        os.unlink(blank)  # the mounts keep it
    private = ("/tmp", "/dev/shm")
    # What the run needs to start may live under a private directory (a checkout or a venv in /tmp):
    # held now, bound back read-only after the private ones replace them.
    needed = {p for p in (sys.prefix, sys.base_prefix, CHECKOUT) if any(_inside(p, d) for d in private)}
    kept = {p: os.open(p, os.O_PATH | os.O_DIRECTORY) for p in needed}
    for d in private:
        mount("rfs-private", d, "tmpfs", MS_NOSUID | MS_NODEV, "mode=1777")
    for p, fd in kept.items():
        os.makedirs(p, exist_ok=True)
        mount(f"/proc/self/fd/{fd}", p, None, MS_BIND)
        os.close(fd)
    # The working directory may live under the /tmp just replaced: bind it back from the held fd.
    os.makedirs(workdir, exist_ok=True)
    mount(f"/proc/self/fd/{held}", workdir, None, MS_BIND)
    os.close(held)
    writable = (*private, *hide, *hide_files, *KEEP_RW)
    for point, flags in _mounts():
        bound_back = any(_inside(point, k) for k in needed)  # under a private /tmp, yet never writable
        if _inside(point, workdir) or (not bound_back and any(_inside(point, w) for w in writable)):
            continue
        try:
            mount(None, point, None, MS_REMOUNT | MS_BIND | MS_RDONLY | flags)
        except OSError as exc:
            # A mount this namespace may not change (a locked one in a user namespace) stays as it is.
            print(f"sandbox: {exc}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--workdir", required=True)
    p.add_argument("--hide", action="append", default=[], help="a directory to hide")
    p.add_argument("--hide-file", action="append", default=[], help="a file to hide (it must exist)")
    p.add_argument("argv", nargs=argparse.REMAINDER)
    args = p.parse_args()
    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    confine(os.path.realpath(args.workdir), [os.path.realpath(d) for d in args.hide],
            [os.path.realpath(f) for f in args.hide_file])
    os.chdir(args.workdir)
    os.execvp("setpriv", ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--no-new-privs", "--", *argv])


if __name__ == "__main__":
    main()
