"""Real infrastructure for the remote launcher tests: an sshd on loopback and a single-node SLURM.

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
    cpus: int  # CPUs the node advertises


SLURM_CPUS = 8  # more than this machine has, so several steps can run side by side in one allocation


def _sinfo_idle(env: dict[str, str]) -> bool:
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True, timeout=5).stdout
    except subprocess.TimeoutExpired:
        return False
    return out.strip() == "idle"


def _slurm_conf(d: Path, host: str) -> str:
    return f"""ClusterName=rfs-test
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={d / 'munge' / 'sock'}
StateSaveLocation={d / 'state'}
SlurmdSpoolDir={d / 'spool'}
SlurmctldPidFile={d / 'slurmctld.pid'}
SlurmdPidFile={d / 'slurmd.pid'}
SlurmctldLogFile={d / 'slurmctld.log'}
SlurmdLogFile={d / 'slurmd.log'}
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
NodeName={host} NodeAddr=127.0.0.1 CPUs={SLURM_CPUS} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
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
    env = {**os.environ, "SLURM_CONF": str(conf)}
    procs = []
    try:
        sock = d / "munge" / "sock"
        procs.append(_start([munged, "-F", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
                             f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munge.seed'}"], d / "munged.out"))
        _wait_until(sock.exists, procs[-1], "munged", d / "munged.out")
        procs.append(_start([slurmctld, "-D", "-i", "-f", str(conf)], d / "slurmctld.out", env))
        procs.append(_start([slurmd, "-D", "-f", str(conf)], d / "slurmd.out", env))
        for p, name in ((procs[1], "slurmctld"), (procs[2], "slurmd")):
            _wait_until(lambda: _sinfo_idle(env), p, f"{name} (sinfo never idle)", d / f"{name}.log")
        yield Slurm(SlurmCfg(partition="debug", time_limit="00:30:00", python=sys.executable, root=str(ROOT)),
                    {"SLURM_CONF": str(conf)}, SLURM_CPUS)
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(d, ignore_errors=True)
