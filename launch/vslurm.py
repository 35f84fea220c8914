"""A real Slurm on a virtual cluster, for tests and for rehearsing ``sbatch launch/cxr.sbatch``.

``python -m launch.vslurm up --id C`` (after ``python -m launch.vcluster up --id C``) starts, each
as a foreground process whose pid it records, with its own pid, spool, state and log files under
``D`` (default ``/run/cxr-vslurm-C``; made fresh with mode 0700 as ``launch.vcluster`` makes its
folder: an existing path or a symlink is refused, unless it is this helper's own folder of an earlier
start, which is taken down first):

* ``munged`` in the root namespace with a key made for this cluster and its socket in ``D`` (a
  socket on a path is reachable from every network namespace);
* ``slurmctld`` inside the first node (its network and UTS namespaces), ``SlurmctldHost`` = that
  node's hostname and address, so the controller's traffic stays on the cluster's bridge;
* one ``slurmd -N <hostname>`` inside every node, ``CPUs=1`` each (the nodes share this machine's
  cores), ``proctrack/linuxproc``, ``task/none``, ``jobacct_gather/none`` and a ``cgroup.conf``
  with ``CgroupPlugin=cgroup/v1`` (without it slurmd stops with ``No filesystem mounted on
  /sys/fs/cgroup``); nothing under /sys/fs/cgroup is mounted or changed.

Client commands find it through ``SLURM_CONF=D/slurm.conf`` (``python -m launch.vslurm env``
prints the line). ``down`` cancels the jobs, stops the daemons by pid, kills any ``slurmstepd``
left in the nodes and deletes what its state file lists in ``D`` (through a descriptor of ``D``), then
``D`` when that emptied it. Needs root, a virtual cluster and Debian's ``slurmctld
slurmd slurm-client munge`` (``make slurm-deps``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from launch import vcluster
from launch.hosts import LaunchError

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "sinfo", "squeue")
# Job credentials' lifetime (Slurm's default 120 s): a requeued job cannot start again before its old
# credential has expired on the nodes (slurmd refuses it as revoked), so Slurm holds it that long.
CRED_EXPIRE_S = 20
CTLD_PORT = 6817  # inside node 1's namespace: no clash with anything of the root namespace
SLURMD_PORT = 6818


def default_dir(cluster_id: int = 0) -> Path:
    """``/run/cxr-vslurm-ID``: under a root-owned base, not world-writable /tmp, where another user could
    pre-create or symlink the name and have root write (and later delete) there."""
    return Path(os.environ.get("CXR_VSLURM_DIR", f"/run/cxr-vslurm-{cluster_id}"))


# What up makes in its folder and what the daemons make there: all that down deletes (folders whole).
OWN_FILES = ("state.json", "munge.key", "slurm.conf", "cgroup.conf", "mpi.conf", "ctld", "log", "spool", "pmix",
             "pmix-nodes", "munge.sock", "munge.sock.lock", "munged.pid", "munged.seed", "slurmctld.pid")


@dataclass
class SlurmState:
    dir: str
    cluster_id: int
    nodes: list[str]                # hostnames = Slurm NodeNames
    netns: list[str]                # their network namespaces (for leftovers)
    pids: dict[str, int] = field(default_factory=dict)  # daemon -> pid
    files: list[str] = field(default_factory=list)  # names in ``dir`` of this Slurm: all down deletes

    @property
    def conf(self) -> Path:
        return Path(self.dir) / "slurm.conf"

    def env(self, base=None) -> dict[str, str]:
        """``base`` (default os.environ) plus what Slurm's client commands need to find this cluster."""
        return {**(os.environ if base is None else base), "SLURM_CONF": str(self.conf)}

    def save(self) -> None:
        vcluster.write_state(Path(self.dir, "state.json"), asdict(self))

    @classmethod
    def load(cls, folder: Path, dir_fd: int | None = None) -> "SlurmState | None":
        """The state in ``folder`` (or the folder open as ``dir_fd``) when folder and state file are this
        user's and no one else's to write; None otherwise."""
        fd = vcluster.open_own_dir(vcluster._abs(folder)) if dir_fd is None else dir_fd
        if fd is None:
            return None
        try:
            raw = vcluster.read_own_state(fd)
        finally:
            if dir_fd is None:
                os.close(fd)
        if raw is None:
            return None
        try:
            return cls(dir=str(raw["dir"]), cluster_id=int(raw["cluster_id"]), nodes=[str(n) for n in raw["nodes"]],
                       netns=[str(n) for n in raw["netns"]],
                       pids={str(k): int(v) for k, v in dict(raw.get("pids", {})).items()},
                       files=[str(f) for f in raw.get("files", []) if vcluster._plain_name(f)])
        except (KeyError, TypeError, ValueError):
            return None


def unavailable_reason() -> str | None:
    """One sentence saying why a test Slurm cannot run here, or None."""
    why = vcluster.unavailable_reason()
    if why:
        return why
    for tool in DAEMONS:
        if not shutil.which(tool):
            return (f"a test Slurm needs '{tool}' (Debian packages slurmctld slurmd slurm-client munge; "
                    f"`make slurm-deps`)")
    return None


def slurm_conf(cluster: vcluster.State, folder: Path, name: str = "") -> str:
    """slurm.conf for ``cluster``: controller on its first node, one CPU per node, no cgroup plugins."""
    first = cluster.nodes[0]
    lines = [
        f"ClusterName={name or f'cxr{cluster.id}'}",
        f"SlurmctldHost={first.name}({first.addr})",
        f"SlurmctldPort={CTLD_PORT}", f"SlurmdPort={SLURMD_PORT}",
        "AuthType=auth/munge", "CredType=cred/munge",
        f"AuthInfo=socket={folder / 'munge.sock'},cred_expire={CRED_EXPIRE_S}",
        "SlurmUser=root", "SlurmdUser=root",
        f"StateSaveLocation={folder / 'ctld'}", f"SlurmdSpoolDir={folder / 'spool'}/%n",
        f"SlurmctldPidFile={folder / 'slurmctld.pid'}", f"SlurmdPidFile={folder / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={folder / 'log' / 'slurmctld.log'}", f"SlurmdLogFile={folder / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info", "SlurmdDebug=info", "MailProg=/bin/true",
        # No cgroups: processes are tracked by their parent pids, tasks are not confined.
        "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none", "JobCompType=jobcomp/none", "SwitchType=switch/none",
        "MpiDefault=none", "SchedulerType=sched/backfill", "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core", "ReturnToService=2", "SlurmdTimeout=30", "InactiveLimit=0",
        "KillWait=5", "MinJobAge=300",
    ]
    lines += [f"NodeName={n.name} NodeAddr={n.addr} CPUs=1 State=UNKNOWN" for n in cluster.nodes]
    lines.append(f"PartitionName=cxr Nodes={','.join(n.name for n in cluster.nodes)} Default=YES "
                 f"MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def up(cluster_id: int = 0, folder: Path | None = None, vdir: Path | None = None, timeout: float = 60.0,
       log=print) -> SlurmState:
    """Start munged, slurmctld and the slurmds on virtual cluster ``cluster_id`` (which must be up)."""
    why = unavailable_reason()
    if why:
        raise LaunchError(why)
    cluster = vcluster.State.load(vcluster._abs(vdir or vcluster.default_dir(cluster_id)))
    if cluster is None or not cluster.nodes:
        raise LaunchError(f"virtual cluster {cluster_id} is not up; run `python -m launch vcluster up --id "
                          f"{cluster_id}` first")
    folder = vcluster._abs(folder or default_dir(cluster_id))  # never resolve(): it would follow a planted link
    vcluster.check_new_dir(folder, SlurmState.load)
    down(folder, quiet=True)  # this helper's own folder of an earlier start (check_new_dir refused any other)
    if folder.parent == Path("/run") and not folder.parent.is_dir():
        folder.parent.mkdir(mode=0o755)
    vcluster.make_fresh_dir(folder)
    state = SlurmState(dir=str(folder), cluster_id=cluster.id, nodes=[n.name for n in cluster.nodes],
                       netns=[n.netns for n in cluster.nodes],
                       files=list(OWN_FILES) + [f"slurmd-{n.name}.pid" for n in cluster.nodes])
    state.save()  # from here on, down() can undo whatever exists
    try:
        for sub in ("ctld", "log", "spool", "pmix", "pmix-nodes"):
            os.mkdir(folder / sub, 0o700)
        vcluster.create_file(folder / "munge.key", os.urandom(1024), 0o600)
        vcluster.create_file(folder / "slurm.conf", slurm_conf(cluster, folder).encode(), 0o644)
        vcluster.create_file(folder / "cgroup.conf", b"CgroupPlugin=cgroup/v1\n", 0o644)
        vcluster.create_file(folder / "mpi.conf", f"PMIxCliTmpDirBase={folder / 'pmix'}\n".encode(), 0o644)
        for n in cluster.nodes:
            os.mkdir(folder / "spool" / n.name, 0o700)
        _start(state, "munged", ["munged", "--force", "--foreground", f"--key-file={folder / 'munge.key'}",
                                 f"--socket={folder / 'munge.sock'}", f"--pid-file={folder / 'munged.pid'}",
                                 f"--log-file={folder / 'log' / 'munged.log'}",
                                 f"--seed-file={folder / 'munged.seed'}"])
        _wait(lambda: (folder / "munge.sock").exists(), 10, "munged did not create its socket", folder / "log")
        conf = str(folder / "slurm.conf")
        first = cluster.nodes[0].name
        _start(state, "slurmctld", vcluster.node_command(cluster, first, ["slurmctld", "-D", "-f", conf]))
        for n in cluster.nodes:
            # Slurm's PMIx plugin makes each step's client folder under PMIxCliTmpDirBase by job and step
            # alone: on nodes sharing one file system the second node's folder "exists" and its task
            # fails. Each slurmd (and every step it starts) sees its own node's folder there.
            own = folder / "pmix-nodes" / n.name
            os.mkdir(own, 0o700)
            _start(state, f"slurmd-{n.name}", vcluster.node_command(cluster, n.name, [
                "unshare", "--mount", "--propagation", "private", "sh", "-c",
                'mount --bind "$1" "$2" && exec slurmd -D -N "$3" -f "$4"', "sh",
                str(own), str(folder / "pmix"), n.name, conf]))
        _wait(lambda: _idle_nodes(state) == len(cluster.nodes), timeout,
              f"Slurm nodes not idle within {timeout:.0f} s", folder / "log")
    except BaseException:
        down(folder, quiet=True)
        raise
    log(f"Slurm up on {', '.join(state.nodes)} (controller on {state.nodes[0]}); "
        f"export SLURM_CONF={folder / 'slurm.conf'}")
    return state


def _start(state: SlurmState, name: str, argv: list[str]) -> None:
    folder = Path(state.dir)
    with vcluster.create_file(folder / "log" / f"{name}.out", append=True) as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                start_new_session=True, env={**os.environ, "SLURM_CONF": str(state.conf)})
    state.pids[name] = proc.pid  # nsenter (no --pid) execs the daemon: the same pid
    state.save()


def _wait(ready, timeout: float, what: str, logs: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    tails = []
    for f in sorted(logs.glob("*")):
        lines = [ln for ln in f.read_text(errors="replace").splitlines() if "error" in ln.lower()]
        if lines:
            tails.append(f"{f.name}: {lines[-1]}")
    raise LaunchError(what + (": " + "; ".join(tails) if tails else ""))


def _idle_nodes(state: SlurmState) -> int:
    r = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], capture_output=True, text=True, timeout=15,
                       env=state.env())
    return sum(1 for ln in r.stdout.splitlines() if ln.split()[1:2] == ["idle"])


def down(folder: Path | None = None, cluster_id: int = 0, quiet: bool = False, log=print) -> list[str]:
    """Cancel the jobs, stop the daemons (by recorded pid), kill slurmstepd left in the nodes, remove ``folder``."""
    folder = vcluster._abs(folder or default_dir(cluster_id))
    dir_fd = vcluster.open_own_dir(folder)  # from here on every deletion goes through this descriptor
    try:
        return _down(folder, dir_fd, quiet, log)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _down(folder: Path, dir_fd: int | None, quiet: bool, log) -> list[str]:
    state = SlurmState.load(folder, dir_fd) if dir_fd is not None else None
    removed: list[str] = []
    if state is not None:
        if state.pids.get("slurmctld") and _ours(state.pids["slurmctld"], folder):
            subprocess.run(["scancel", "--full", "--partition", "cxr"], capture_output=True, timeout=15,
                           env=state.env())
            _wait_quiet(state, 10)
        for name, pid in sorted(state.pids.items(), key=lambda kv: kv[0] == "munged"):  # munged last
            if _ours(pid, folder):
                vcluster.stop_process(pid, grace=5.0)
                removed.append(f"{name} {pid}")
        for ns in state.netns:
            for pid in vcluster.netns_pids(ns):
                if _comm(pid).startswith("slurmstepd"):
                    vcluster.stop_process(pid, grace=5.0)
                    removed.append(f"slurmstepd {pid}")
        n, gone = vcluster.remove_listed(folder, dir_fd, state.files)
        removed.append(str(folder) if gone else f"{n} entries of {folder} (other files kept there)")
    if removed and not quiet:
        log("Slurm down: removed " + ", ".join(removed))
    return removed


def _wait_quiet(state: SlurmState, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, timeout=15, env=state.env())
        if r.returncode != 0 or not r.stdout.strip():
            return
        time.sleep(0.5)


def _ours(pid: int, folder: Path) -> bool:
    """``pid`` is a daemon of this Slurm: its command line names ``folder``."""
    try:
        return str(folder).encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def leftovers(cluster_id: int = 0, folder: Path | None = None) -> list[str]:
    """Daemons of this Slurm still running, and its folder (empty after a clean ``down``)."""
    folder = vcluster._abs(folder or default_dir(cluster_id))
    out = [str(folder)] if os.path.lexists(folder) else []
    for p in Path("/proc").iterdir():
        if p.name.isdigit() and _ours(int(p.name), folder) and int(p.name) != os.getpid():
            out.append(f"{_comm(int(p.name))} {p.name}")
    return out


# --------------------------------------------------------------------------- command line

def add_verbs(p) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    for name, text in (("up", "start munged, slurmctld and a slurmd per node of the virtual cluster"),
                       ("down", "cancel the jobs, stop the daemons, remove everything"),
                       ("env", "print the SLURM_CONF line for the shell")):
        v = verbs.add_parser(name, help=text)
        v.add_argument("--id", type=int, default=0, help="the virtual cluster's id")
        v.add_argument("--dir", type=Path, default=None, help="Slurm's folder, created by up (mode 0700; an existing "
                       "path is refused; default /run/cxr-vslurm-ID)")


def main(args) -> int:
    folder = vcluster._abs(args.dir or default_dir(args.id))
    if args.verb == "up":
        up(args.id, folder)
    elif args.verb == "down":
        if not down(folder, args.id):
            print("Slurm down: nothing to remove")
    else:
        print(f"export SLURM_CONF={folder / 'slurm.conf'}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m launch.vslurm", description=__doc__.split("\n\n")[0])
    add_verbs(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except LaunchError as e:
        print(f"vslurm: {e}", file=sys.stderr)
        sys.exit(2)
