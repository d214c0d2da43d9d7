"""Real infrastructure for the remote launcher tests: an sshd on loopback and a two-node SLURM
cluster with fake GPUs.

Import the fixtures into a test module (`from tests.infra import sshd, slurm`). Both are session
scoped and start real daemons from Debian's packages (.ci/install-infra.sh installs them); a daemon
that cannot start fails the test with its reason and log tail, it never skips.
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rfs import ROOT
from rfs.hosts import HostCfg, SlurmCfg


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 20) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.exists() else "(no log)"


def _binary(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
    if not found:
        pytest.fail(f"{name} not installed: run .ci/install-infra.sh")
    return found


def _start(argv: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    # Own session, so teardown can signal the daemon's whole group.
    return subprocess.Popen(argv, stdout=log.open("ab"), stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _wait_until(ready, proc: subprocess.Popen, what: str, log: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}")
        if ready():
            return
        time.sleep(0.1)
    pytest.fail(f"{what} not ready after {timeout:.0f} s:\n{_tail(log)}")


# ---------------------------------------------------------------- sshd


@dataclass(frozen=True)
class Sshd:
    host: HostCfg
    pid: int  # the listening sshd; each connection is a child process of it

    def sessions(self) -> list[int]:
        """PIDs of the per-connection sshd processes (killing one drops that connection)."""
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True).stdout
        return [int(p) for p in out.split()]


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def sshd(tmp_path_factory: pytest.TempPathFactory):
    exe = _binary("sshd")
    d = tmp_path_factory.mktemp("sshd")
    for key in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / key)], check=True)
    user = getpass.getuser()
    (d / "authorized").mkdir()
    (d / "authorized" / user).write_text((d / "client_key.pub").read_text())
    port = free_port()
    conf = d / "sshd_config"
    conf.write_text(
        f"Port {port}\nListenAddress 127.0.0.1\nListenAddress 127.0.0.2\nHostKey {d / 'host_key'}\nPidFile {d / 'sshd.pid'}\n"
        f"AuthorizedKeysFile {d / 'authorized'}/%u\nPermitRootLogin prohibit-password\n"
        "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"  # MaxSessions stays 10
    )
    os.makedirs("/run/sshd", exist_ok=True)  # privilege separation directory
    log = d / "sshd.log"
    proc = _start([exe, "-D", "-e", "-f", str(conf.resolve())], log)
    _wait_until(lambda: _accepts(port), proc, "sshd", log)
    host = HostCfg(address="127.0.0.1", port=port, user=user, key=str(d / "client_key"), python=sys.executable, root=str(ROOT))
    yield Sshd(host, proc.pid)
    _stop(proc)


# ---------------------------------------------------------------- SLURM


@dataclass(frozen=True)
class Slurm:
    cfg: SlurmCfg
    env: dict[str, str]  # SLURM_CONF: every client call needs it
    cpus: int  # CPUs each node advertises
    nodes: tuple[str, ...]  # the nodes' SLURM names (what a step sees as SLURMD_NODENAME)
    gpus: int  # fake GPUs (gres) each node advertises


# Two slurmds on this machine, each its own node (`slurmd -N <name>`, its own port): Debian's
# build honours per-node Port= and %n in paths, so no network namespace is needed.
SLURM_NODES = ("rfs-n0", "rfs-n1")
SLURM_CPUS = 8  # per node, more than this machine has, so several steps can run side by side in one allocation
SLURM_GPUS = 2  # per node: dummy character devices that SLURM hands out as gres and names in CUDA_VISIBLE_DEVICES


def _sinfo_idle(env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=env, capture_output=True, text=True, timeout=5).stdout
    except subprocess.TimeoutExpired:
        return False
    return out.split() == ["idle"] * len(SLURM_NODES)


def _fake_gpus(d: Path) -> dict[str, list[Path]]:
    """Each node's fake GPUs: character devices with /dev/null's numbers, which slurmd only stats."""
    out = {}
    for n, node in enumerate(SLURM_NODES):
        out[node] = [d / "dev" / f"gpu{n * SLURM_GPUS + i}" for i in range(SLURM_GPUS)]
        for path in out[node]:
            path.parent.mkdir(exist_ok=True)
            os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return out


def _gres_conf(gpus: dict[str, list[Path]]) -> str:
    return "".join(f"NodeName={node} Name=gpu File={path}\n" for node, paths in gpus.items() for path in paths)


def _slurm_conf(d: Path, host: str) -> str:
    nodes = "".join(f"NodeName={node} NodeHostname={host} NodeAddr=127.0.0.1 Port={free_port()} CPUs={SLURM_CPUS} "
                    f"Gres=gpu:{SLURM_GPUS} State=UNKNOWN\n" for node in SLURM_NODES)
    return f"""ClusterName=rfs-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge' / 'sock'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}/%n
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd-%n.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd-%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
KillWait=2
InactiveLimit=10
GresTypes=gpu
{nodes}PartitionName=debug Nodes={','.join(SLURM_NODES)} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="session")
def slurm():
    munged, slurmctld, slurmd = _binary("munged"), _binary("slurmctld"), _binary("slurmd")
    # Not under pytest's tmp dirs: they are mode 700 and munged wants its socket's path open to all.
    d = Path(tempfile.mkdtemp(prefix="rfs-slurm-"))
    for sub, mode in (("munge", 0o755), ("keys", 0o700), ("state", 0o755), ("spool", 0o755)):
        (d / sub).mkdir(mode=mode)
        os.chmod(d / sub, mode)  # mkdir's mode is masked by umask; munged checks these exactly
    os.chmod(d, 0o755)
    key = d / "keys" / "munge.key"
    key.write_bytes(os.urandom(1024))
    os.chmod(key, 0o600)
    host = socket.gethostname().split(".")[0]
    conf = d / "slurm.conf"
    conf.write_text(_slurm_conf(d, host))
    (d / "gres.conf").write_text(_gres_conf(_fake_gpus(d)))  # slurmd reads it beside slurm.conf
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        sock = d / "munge" / "sock"
        procs.append(_start([munged, "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
                             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munge.seed'}"], d / "munged.out"))
        _wait_until(sock.exists, procs[-1], "munged", d / "munged.out")
        daemons = [(_start([slurmctld, "-D", "-i", "-f", str(conf)], d / "slurmctld.out", env), d / "slurmctld.log")]
        daemons += [(_start([slurmd, "-D", "-N", node, "-f", str(conf)], d / f"slurmd-{node}.out", env), d / f"slurmd-{node}.log")
                    for node in SLURM_NODES]
        procs += [p for p, _ in daemons]
        for p, log in daemons:
            _wait_until(lambda: _sinfo_idle(env), p, f"{log.stem} (sinfo never idle on every node)", log)
        yield Slurm(SlurmCfg(partition="debug", time_limit="00:30:00", python=sys.executable, root=str(ROOT)),
                    {"SLURM_CONF": str(conf)}, SLURM_CPUS, SLURM_NODES, SLURM_GPUS)
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(d, ignore_errors=True)
