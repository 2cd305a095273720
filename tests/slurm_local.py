"""A real SLURM cluster on this machine for tests: munged, slurmctld and N slurmd "nodes" on loopback.

Everything lives in a fresh scratch directory (plus a small 0755 directory under /tmp for munged's key and
socket) with free TCP ports and a random first job id, so it never collides with a system SLURM or another
test session (SLURM_LOCAL.md Part 1). The daemons run in the foreground (``-D``/``-F``)
as children of this process, so their PIDs are known exactly; ``stop()`` cancels every job, then TERMs
(and, after a bounded wait, KILLs) each daemon it started by PID, and finally any leftover job process
of this cluster (found by a per-cluster tag in its environment), also by PID. Nothing is killed by name.

    with SlurmLocal() as cluster:                       # or the ``slurm_cluster`` pytest fixture
        jid = cluster.sbatch(["job.sbatch"], env=...)
        info = cluster.wait_job(jid, timeout=300)       # {"JobState": "COMPLETED", ...}

Nothing outside the scratch directory is changed (no /etc/hosts or /etc/slurm edits). The emulated nodes
share this machine's hostname, so jobs must use SLURMD_NODENAME/SLURM_NODEID, and a node name such as
``node1`` does not resolve: ``scontrol show node node1`` gives its NodeAddr (127.0.0.1).
"""

from __future__ import annotations

import atexit
import getpass
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "squeue", "scancel", "sinfo")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")


def which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path=os.pathsep.join(SBIN))


def missing_binaries() -> list[str]:
    """SLURM/munge programs that are not installed (``.ci/install_slurm.sh`` installs them)."""
    return [b for b in DAEMONS + CLIENTS + ("munge",) if which(b) is None]


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports (checked on all interfaces, as the daemons will bind them), outside the ephemeral
    range (``training.ports.free_port``)."""
    from megatron_genlip.training.ports import free_port

    ports: list[int] = []
    while len(ports) < n:
        ports.append(free_port("", exclude=ports))
    return ports


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat (start time in clock ticks): tells a live process from a recycled PID."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive(pid: int, start: str | None) -> bool:
    st = _start_time(pid)
    if st is None or (start is not None and st != start):
        return False
    try:  # a zombie is not alive
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _mem_mb() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


class SlurmError(RuntimeError):
    pass


class SlurmLocal:
    """A SLURM cluster of ``nodes`` emulated nodes (``node1``..``nodeN``) in ``root`` (a fresh temp dir)."""

    def __init__(self, root: str | Path | None = None, nodes: int = 2, cpus: int | None = None,
                 mem_mb: int | None = None, kill_wait: int = 30, cred_expire: int = 5, timeout: float = 60):
        if root is None:
            root = tempfile.mkdtemp(prefix="slurm-local-")
        self.root = Path(root).resolve()
        self.nodes = [f"node{i}" for i in range(1, nodes + 1)]
        self.cpus = cpus or os.cpu_count() or 1
        self.mem_mb = mem_mb or _mem_mb()
        self.kill_wait = kill_wait
        self.cred_expire = cred_expire  # also the delay before a requeued job may start again
        self.timeout = timeout
        self.tag = uuid.uuid4().hex
        self.conf = self.root / "etc" / "slurm.conf"
        self.procs: dict[str, tuple[subprocess.Popen, str | None]] = {}
        self._log_files = []
        self.short_dir: Path | None = None
        self.started = False

    # -------------------------------------------------------------------------------------------
    # environment for clients and jobs

    def env(self, base: dict | None = None, **extra) -> dict:
        """Environment for SLURM clients (sbatch, scontrol, ...): SLURM_CONF plus the cluster's tag, which
        jobs inherit (sbatch exports the submitting environment), so leftovers can be found by PID."""
        e = dict(os.environ if base is None else base)
        e["SLURM_CONF"] = str(self.conf)
        e["SLURM_LOCAL_TAG"] = self.tag
        e["PATH"] = e.get("PATH", "") + os.pathsep + os.pathsep.join(SBIN)
        for k in list(e):  # a surrounding allocation's variables would confuse sbatch/srun
            if k.startswith(("SLURM_JOB", "SLURM_STEP", "SLURM_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
                             "SBATCH_", "SRUN_", "SALLOC_")):
                del e[k]
        e.update({k: str(v) for k, v in extra.items()})
        return e

    def run(self, args: list[str], timeout: float = 30, check: bool = True, **kw) -> subprocess.CompletedProcess:
        proc = subprocess.run(args, env=kw.pop("env", None) or self.env(), capture_output=True, text=True,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
        return proc

    # -------------------------------------------------------------------------------------------
    # start

    def _write_config(self) -> None:
        r = self.root
        ctld_port, *node_ports = free_ports(1 + len(self.nodes))
        host = socket.gethostname().split(".")[0]
        user = getpass.getuser()
        lines = [
            "# written by tests/slurm_local.py; SLURM config files do not expand variables",
            "ClusterName=localci",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            f"SlurmUser={user}",
            f"SlurmdUser={user}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.short_dir}/munge.socket,cred_expire={self.cred_expire}",
            f"StateSaveLocation={r}/state",
            f"SlurmdSpoolDir={self.short_dir}/spool/slurmd.%n",  # holds slurmstepd's sockets: a short path too
            f"SlurmctldPidFile={r}/run/slurmctld.pid",
            f"SlurmdPidFile={r}/run/slurmd.%n.pid",
            f"SlurmctldLogFile={r}/log/slurmctld.log",
            f"SlurmdLogFile={r}/log/slurmd.%n.log",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2,bf_interval=2",  # requeued jobs start again within seconds
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/filetxt",
            f"JobCompLoc={r}/log/jobcomp.txt",
            "MpiDefault=none",
            "MailProg=/bin/true",
            "ReturnToService=2",
            "SlurmdParameters=config_overrides",
            "SlurmctldTimeout=30",
            "SlurmdTimeout=30",
            "InactiveLimit=0",
            f"KillWait={self.kill_wait}",
            "MinJobAge=3600",
            "JobRequeue=1",
            # job ids restart at FirstJobId with every fresh controller; a random start keeps job-id-derived
            # values (log names, the job script's rendezvous port 20000 + id % 12000) apart between clusters
            f"FirstJobId={random.randint(1000, 19000)}",
        ]
        for name, port in zip(self.nodes, node_ports):
            lines.append(f"NodeName={name} NodeHostname={host} NodeAddr=127.0.0.1 Port={port} CPUs={self.cpus} "
                         f"RealMemory={self.mem_mb} State=UNKNOWN")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO")
        self.conf.write_text("\n".join(lines) + "\n")
        self.ctld_port = ctld_port

    def _spawn(self, key: str, args: list[str]) -> None:
        log = open(self.root / "log" / f"{key}.console", "ab")
        self._log_files.append(log)
        env = self.env()
        proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.root)
        self.procs[key] = (proc, _start_time(proc.pid))

    def start(self) -> "SlurmLocal":
        if missing := missing_binaries():
            raise SlurmError(f"SLURM/munge programs not found: {', '.join(missing)} (run .ci/install_slurm.sh)")
        r = self.root
        for d in ("etc", "state", "run", "log"):
            (r / d).mkdir(parents=True, exist_ok=True)
        # munged wants its socket directory and every directory above it executable for all (pytest's
        # tmp dirs are 0700), and a short path: the socket and key get their own directory under /tmp. So do the
        # slurmd spool directories, where slurmstepd creates sockets named like node1_JOBID.4294967291: a Unix
        # socket path has at most 107 bytes, which a root under pytest-xdist's tmp dirs exceeded (the job's step
        # daemon died at start and the job stayed pending, "launch failed requeued held")
        self.short_dir = Path(tempfile.mkdtemp(prefix="slurm-", dir="/tmp" if os.path.isdir("/tmp") else None))
        os.chmod(self.short_dir, 0o755)
        for n in self.nodes:
            (self.short_dir / "spool" / f"slurmd.{n}").mkdir(parents=True)
        key = self.short_dir / "munge.key"
        key.write_bytes(os.urandom(1024))
        os.chmod(key, 0o400)
        self._write_config()
        atexit.register(self.stop)
        self.started = True
        try:
            sock = self.short_dir / "munge.socket"
            self._spawn("munged", [which("munged"), "-F", f"--socket={sock}", f"--key-file={key}",
                                   f"--pid-file={self.short_dir}/munged.pid", f"--log-file={r}/log/munged.log",
                                   f"--seed-file={self.short_dir}/munged.seed"])
            self._wait(lambda: self._munge_ok(sock), "munged to answer")
            self._spawn("slurmctld", [which("slurmctld"), "-D", "-c", "-f", str(self.conf)])
            self._wait(lambda: "UP" in self.run(["scontrol", "ping"], check=False, timeout=10).stdout,
                       "slurmctld to answer")
            for n in self.nodes:
                self._spawn(f"slurmd.{n}", [which("slurmd"), "-D", "-N", n, "-f", str(self.conf)])
            self._wait(self._nodes_idle, "every node to be idle")
        except BaseException:
            self.stop()
            raise
        return self

    def _munge_ok(self, sock: Path) -> bool:
        if not sock.exists():
            return False
        enc = subprocess.run([which("munge"), "-S", str(sock), "-n"], capture_output=True, timeout=10)
        if enc.returncode != 0:
            return False
        dec = subprocess.run([which("unmunge") or "unmunge", "-S", str(sock)], input=enc.stdout,
                             capture_output=True, timeout=10)
        return dec.returncode == 0

    def _nodes_idle(self) -> bool:
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10).stdout.split()
        states = dict(zip(out[::2], out[1::2]))
        return all(states.get(n) == "idle" for n in self.nodes)

    def _wait(self, ready, what: str) -> None:
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            for key, (proc, _) in self.procs.items():
                if proc.poll() is not None:
                    raise SlurmError(f"{key} exited ({proc.returncode}) while waiting for {what}:\n{self.logs()}")
            if ready():
                return
            time.sleep(0.2)
        raise SlurmError(f"timed out after {self.timeout} s waiting for {what}:\n{self.logs()}")

    # -------------------------------------------------------------------------------------------
    # jobs

    def sbatch(self, args: list[str], env: dict | None = None, cwd: str | Path | None = None) -> int:
        """Submit; returns the job id."""
        proc = self.run(["sbatch", "--parsable", *args], env=env or self.env(), cwd=cwd)
        return int(proc.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        """``scontrol show job -o`` as a dict (JobState, Restarts, ExitCode, NodeList, ...)."""
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], timeout=15).stdout
        return dict(re.findall(r"(\w[\w:/.-]*)=(\S*)", out))

    def wait_job(self, job_id: int, timeout: float, until=None) -> dict:
        """Poll until ``until(info)`` (default: a final state); on timeout cancel the job and raise."""
        until = until or (lambda info: info.get("JobState") in FINAL_STATES)
        deadline = time.time() + timeout
        info = {}
        while time.time() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(0.5)
        self.run(["scancel", str(job_id)], check=False)
        raise SlurmError(f"job {job_id} still {info.get('JobState')} (reason {info.get('Reason')}) after {timeout} s; "
                         f"cancelled\n{self.logs()}")

    # -------------------------------------------------------------------------------------------
    # stop

    def _terminate(self, keys: list[str], wait: float) -> None:
        for k in keys:
            proc, start = self.procs[k]
            if proc.poll() is None and _alive(proc.pid, start):
                proc.send_signal(signal.SIGTERM)
        deadline = time.time() + wait
        for k in keys:
            proc, start = self.procs[k]
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                if _alive(proc.pid, start):
                    proc.kill()
                proc.wait(timeout=10)

    def _job_processes(self) -> list[tuple[int, str | None]]:
        """PIDs (with start times) of processes that carry this cluster's tag: slurmstepd and job tasks."""
        me = {os.getpid(), os.getppid()}
        needle = f"SLURM_LOCAL_TAG={self.tag}".encode()
        found = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) in me:
                continue
            try:
                if needle in (p / "environ").read_bytes().split(b"\0"):
                    found.append((int(p.name), _start_time(int(p.name))))
            except OSError:
                continue
        return found

    def stop(self) -> None:
        """Cancel every job, stop slurmd/slurmctld then munged by PID; idempotent."""
        if not self.started:
            return
        self.started = False
        ctld = self.procs.get("slurmctld")
        if ctld and ctld[0].poll() is None:
            try:
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False, timeout=10).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False, timeout=10)
                    deadline = time.time() + 20
                    while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False,
                                                              timeout=10).stdout.strip():
                        time.sleep(0.5)
            except (subprocess.SubprocessError, OSError):
                pass
        self._terminate([k for k in self.procs if k != "munged"], 15)
        leftovers = self._job_processes()
        for pid, start in leftovers:  # job tasks or slurmstepd that outlived their daemons
            if _alive(pid, start):
                os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while time.time() < deadline and any(_alive(p, s) for p, s in leftovers):
            time.sleep(0.2)
        for pid, start in leftovers:
            if _alive(pid, start):
                os.kill(pid, signal.SIGKILL)
        if "munged" in self.procs:
            self._terminate(["munged"], 15)
        for f in self._log_files:
            f.close()
        self._log_files.clear()
        if self.short_dir is not None:
            shutil.rmtree(self.short_dir, ignore_errors=True)

    def alive_daemons(self) -> list[str]:
        return [k for k, (proc, start) in self.procs.items() if proc.poll() is None and _alive(proc.pid, start)]

    def logs(self, tail: int = 40) -> str:
        parts = []
        for f in sorted((self.root / "log").glob("*")):
            if f.is_file():
                lines = f.read_text(errors="replace").splitlines()[-tail:]
                parts.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> "SlurmLocal":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def cluster_fixture(nodes: int = 2, **kw):
    """A generator for a pytest fixture (any scope): skips when SLURM is not installed, always stops."""
    import pytest

    if missing := missing_binaries():
        pytest.skip(f"SLURM is not installed (missing {', '.join(missing)}); run .ci/install_slurm.sh")
    cluster = SlurmLocal(nodes=nodes, **kw)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(cluster.root, ignore_errors=True)


try:
    import pytest as _pytest

    @_pytest.fixture(scope="module")
    def slurm_cluster():
        """A 2-node SLURM cluster for the tests of one module (import this name into the test module)."""
        yield from cluster_fixture(nodes=2)
except ImportError:  # usable without pytest, e.g. ``python -c 'from slurm_local import SlurmLocal'``
    pass
