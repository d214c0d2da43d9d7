"""Launchers: start one training run on a slot, stream its output, enforce the hard timeout,
kill the whole process tree, and report what happened. One interface, three ways to reach a slot.
"""

from __future__ import annotations

from rfs.hosts import HostsFile, Slot
from rfs.launch.base import Job, JobOutcome, Launcher


def launcher_for(slot: Slot, hosts: HostsFile) -> Launcher:
    """Imported lazily so a local-only user never needs asyncssh or SLURM tools."""
    if slot.launcher == "local":
        from rfs.launch.local import LocalLauncher

        return LocalLauncher()
    if slot.launcher == "ssh":
        from rfs.launch.ssh import SshLauncher

        return SshLauncher(hosts.hosts[slot.host])
    from rfs.launch.slurm import SlurmLauncher

    return SlurmLauncher(hosts.slurm)


__all__ = ["Job", "JobOutcome", "Launcher", "launcher_for"]
