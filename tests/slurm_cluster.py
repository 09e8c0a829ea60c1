"""A throw-away one-node SLURM cluster (munged + slurmctld + slurmd) in a temporary directory, for tests.

Everything lives under one temp dir: the munge key and socket, slurm.conf/cgroup.conf, state, spool, logs and
pid files. Nothing touches a system SLURM or MUNGE: the daemons get explicit paths (``-f <conf>``, munged
``--socket/--key-file/...``), free TCP ports, and the clients (sbatch, squeue, ...) get ``SLURM_CONF``.
``stop()`` cancels the cluster's jobs and terminates exactly the daemons that ``start_cluster`` started.
"""
from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

PARTITION = "debug"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "sinfo", "scontrol", "scancel", "srun")


def missing_programs() -> list[str]:
    """The SLURM/MUNGE programs this cluster needs that are not on PATH (Debian: slurm-wlm, munge)."""
    return [name for name in (*DAEMONS, *CLIENTS) if shutil.which(name) is None]


@dataclass
class SlurmCluster:
    """A running one-node cluster; ``env`` is what a client (sbatch, snakemake --executor slurm) needs."""

    root: Path
    conf: Path
    node: str
    cpus: int
    memory_mb: int
    partition: str = PARTITION
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """SLURM_CONF for the clients, and the srun shim (see start_cluster) first on PATH."""
        return {**os.environ, "SLURM_CONF": str(self.conf), "PATH": f"{self.root / 'bin'}:{os.environ['PATH']}"}

    def client(self, *command: str, check: bool = True) -> str:
        """Run a SLURM client command against this cluster and return its stdout."""
        result = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=60)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed ({result.returncode}): {result.stderr}\n{self.logs()}")
        return result.stdout

    def logs(self) -> str:
        """The tail of every daemon log, for error messages."""
        parts = []
        for log in sorted(self.root.glob("log/*.log")):
            parts.append(f"--- {log.name} ---\n" + "\n".join(log.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel the cluster's jobs, terminate the daemons this object started, remove the temp dir."""
        if "slurmctld" in self.processes and self.processes["slurmctld"].poll() is None:
            self.client("scancel", "--partition", self.partition, check=False)
        for name in reversed(list(self.processes)):
            _terminate(self.processes[name])
        shutil.rmtree(self.root, ignore_errors=True)


def _terminate(process: subprocess.Popen, grace_s: float = 15) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=grace_s)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def host_memory_mb() -> int:
    """Total memory in MiB, as ``free -m`` reports it (MemTotal of /proc/meminfo)."""
    meminfo = Path("/proc/meminfo").read_text()
    return int(re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE).group(1)) // 1024


def slurm_conf(root: Path, node: str, cpus: int, memory_mb: int, munge_socket: Path, user: str) -> str:
    """slurm.conf for a single node ``node`` (reached on 127.0.0.1) in the default partition ``debug``."""
    return f"""\
ClusterName=ehrcxrtest
SlurmctldHost={node}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
SlurmUser={user}
SlurmdUser={user}
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket}
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=86400
ReturnToService=2
SlurmdTimeout=300
InactiveLimit=0
KillWait=10
NodeName={node} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory_mb} State=UNKNOWN
PartitionName={PARTITION} Nodes={node} Default=YES MaxTime=INFINITE State=UP
"""


def start_cluster(timeout_s: float = 90) -> SlurmCluster:
    """Start munged, slurmctld and slurmd for this host in a new temp dir; return once the node is idle."""
    root = Path(tempfile.mkdtemp(prefix="ehrcxr-slurm-"))
    root.chmod(0o755)  # munged wants its socket's directories searchable by all (and writable only by it)
    for sub in ("munge", "state", "spool", "run", "log", "bin"):
        (root / sub).mkdir(mode=0o755)
    node = socket.gethostname().split(".")[0]
    cpus = len(os.sched_getaffinity(0))
    cluster = SlurmCluster(root=root, conf=root / "slurm.conf", node=node, cpus=cpus, memory_mb=host_memory_mb())
    try:
        key = root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        munge_socket = root / "munge" / "munge.socket"
        cluster.conf.write_text(slurm_conf(root, node, cpus, cluster.memory_mb, munge_socket, getpass.getuser()))
        # read by slurmd only if a cgroup plugin is configured; proctrack/linuxproc + task/none use none
        (root / "cgroup.conf").write_text("CgroupPlugin=autodetect\nIgnoreSystemd=yes\n")
        # Inside a job, snakemake-executor-plugin-slurm-jobstep starts the rule with `srun` in an environment
        # stripped of every SLURM_* variable, SLURM_CONF included; a real cluster's srun then finds
        # /etc/slurm/slurm.conf, ours must be told where this cluster's conf is.
        srun = root / "bin" / "srun"
        srun.write_text(f'#!/bin/sh\nSLURM_CONF={cluster.conf} exec {shutil.which("srun")} "$@"\n')
        srun.chmod(0o755)
        cluster.processes["munged"] = _spawn(
            root, "munged", ["munged", "--foreground", f"--socket={munge_socket}", f"--key-file={key}",
                             f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
                             f"--seed-file={root}/munge/munged.seed"])
        _wait_for(lambda: munge_socket.exists(), timeout_s, "munged socket", cluster)
        cluster.processes["slurmctld"] = _spawn(root, "slurmctld", ["slurmctld", "-D", "-i", "-f", str(cluster.conf)])
        _wait_for(lambda: subprocess.run(["scontrol", "ping"], env=cluster.env, capture_output=True, text=True)
                  .stdout.count("UP") > 0, timeout_s, "slurmctld to answer scontrol ping", cluster)
        cluster.processes["slurmd"] = _spawn(root, "slurmd", ["slurmd", "-D", "-f", str(cluster.conf), "-N", node])
        _wait_for(lambda: cluster.client("sinfo", "--noheader", "--Node", "--format=%T", check=False).strip()
                  == "idle", timeout_s, f"node {node} to be idle in sinfo", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _spawn(root: Path, name: str, command: list[str]) -> subprocess.Popen:
    """Start a daemon in the foreground (so its pid is ours to stop), output to log/<name>.stdio."""
    with open(root / "log" / f"{name}.stdio", "w") as stdio:
        return subprocess.Popen(command, stdout=stdio, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)


def _wait_for(ready, timeout_s: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, process in cluster.processes.items():
            if process.poll() is not None:
                stdio = (cluster.root / "log" / f"{name}.stdio").read_text(errors="replace")
                raise RuntimeError(f"{name} exited with {process.returncode} while waiting for {what}:\n"
                                   f"{stdio}\n{cluster.logs()}")
        if ready():
            return
        time.sleep(0.5)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}\n{cluster.logs()}")
