"""Running one stage: its own process group, ssh through the cluster's client file, and a bounded
end when a node or a rank fails, with one sentence naming them.

A multi-host stage is watched two ways while it runs:

* its output: the first line in which mpirun or horovodrun reports a rank that died (``mpirun
  noticed that process rank R ... on node N exited on signal S``, ``Process R exit with status
  code C``) starts a clock; if the stage has not ended ``FAULT_GRACE_S`` later, the whole process
  group is stopped;
* the nodes: every ``PROBE_INTERVAL_S`` a TCP connection to each remote node's ssh port (from the
  cluster's ssh client file when it names one); a node that answered once and then misses
  ``PROBE_MISSES`` probes in a row is cut off, and the stage is stopped at once (a rank waiting for
  a lost peer in an allreduce never returns: mpirun alone would wait for hours).

Stopping is SIGTERM to the group, then SIGKILL ``STOP_GRACE_S`` later: mpirun, horovodrun and the
ssh sessions all go; nothing is left to run on as an orphan on this machine.

A stop signal to the launcher (SIGTERM, SIGINT, SIGUSR1: Slurm's warning before a time limit or
a preemption) is forwarded, not turned into a kill: to this machine's ranks (the stage's processes
with a rank in their environment), whose training stops at the next step every rank agrees on
(the stop flag is allreduced each step, so one signalled rank stops them all) after rank 0 wrote
a step checkpoint; without a local rank, as SIGUSR1 to mpirun (Open MPI forwards SIGUSR1 to every
rank; on SIGTERM it would kill them). mpirun and horovodrun themselves are not signalled: both
would kill their ranks (horovodrun after 5 s). The stage then has ``SIGNAL_WAIT_S`` to end by
itself before it is stopped as above.
"""
from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import re
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

from launch.commands import Layout, StageCommand, horovodrun_hosts
from launch.hosts import Host, LaunchError, is_local_host

PROBE_INTERVAL_S = 2.0   # seconds between two probes of every remote node
PROBE_TIMEOUT_S = 2.0    # a probe that takes longer is a miss
PROBE_MISSES = 3         # misses in a row that make a node lost
FAULT_GRACE_S = 20.0     # after the first rank failure, time for the launcher to end by itself
STOP_GRACE_S = 5.0       # SIGTERM to SIGKILL when stopping a failed stage
SIGNAL_WAIT_S = 90.0     # after a forwarded stop signal: time for the ranks to checkpoint and exit
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)  # forwarded to the ranks (module docstring)
RANK_VARS = ("HOROVOD_RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")


class Interrupted(Exception):
    def __init__(self, signum):
        self.signum = signum


@dataclass
class Failure:
    node: str
    ranks: str   # "rank 1", "ranks 2-3"
    why: str
    at: float    # time.monotonic() of the fault's detection

    def sentence(self, stage: str, ended_after: float) -> str:
        return (f"{stage} failed on {self.node} ({self.ranks}: {self.why}), stopped {ended_after:.0f} s after "
                f"the fault; run the same command again to continue from the last checkpoint")


# --------------------------------------------------------------------------- where the ranks are

def placement(cmd: StageCommand) -> list[tuple[str, list[int]]]:
    """Each host with the ranks it runs, in rank order (horovodrun and mpirun --map-by fill the
    hosts in the order given)."""
    lay: Layout | None = cmd.layout
    if lay is None or not lay.hosts:
        return []
    if cmd.kind == "horovodrun":
        hosts = horovodrun_hosts(lay)
    else:
        left, hosts = lay.np, []
        for h in lay.hosts:
            n = min(h.slots, max(1, lay.ranks_per_node), left)
            if n > 0:
                hosts.append(Host(h.name, n))
                left -= n
    out, r = [], 0
    for h in hosts:
        out.append((h.name, list(range(r, r + h.slots))))
        r += h.slots
    return out


def _ranks_text(ranks: Sequence[int]) -> str:
    if len(ranks) == 1:
        return f"rank {ranks[0]}"
    return f"ranks {ranks[0]}-{ranks[-1]}"


# --------------------------------------------------------------------------- ssh

def ssh_target(host: str, ssh_config: str = "", port: int = 0) -> tuple[str, int]:
    """(address, port) ssh reaches ``host`` at: ``ssh -G`` applies the client file's HostName/Port."""
    if ssh_config and shutil.which("ssh"):
        r = subprocess.run(["ssh", "-G", "-F", ssh_config, "--", host], capture_output=True, text=True, timeout=10)
        opts = dict(ln.split(" ", 1) for ln in r.stdout.splitlines() if " " in ln)
        return opts.get("hostname", host), port or int(opts.get("port", 22))
    return host, port or 22


@contextlib.contextmanager
def ssh_wrapper(ssh_config: str) -> Iterator[str]:
    """A folder holding an ``ssh`` that runs ``ssh -F ssh_config``: first on horovodrun's PATH it
    makes horovodrun's own ssh calls (host checks, Gloo's rank start, interface discovery) and
    its mpirun's use the cluster's client file; horovodrun has no option for one."""
    real = shutil.which("ssh") or "/usr/bin/ssh"
    folder = tempfile.mkdtemp(prefix="cxr-ssh-")
    try:
        script = Path(folder) / "ssh"
        script.write_text(f"#!/bin/sh\nexec {shlex.quote(real)} -F {shlex.quote(ssh_config)} \"$@\"\n")
        script.chmod(0o755)
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- where the launcher runs

def _iface_ipv4(name: str) -> ipaddress.IPv4Interface | None:
    """The IPv4 address and netmask of interface ``name`` on this machine, or None."""
    if name not in {n for _, n in socket.if_nameindex()}:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        req = struct.pack("256s", name.encode()[:15])
        try:
            addr = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24])  # SIOCGIFADDR
            mask = socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x891B, req)[20:24])  # SIOCGIFNETMASK
        except OSError:
            return None
    return ipaddress.IPv4Interface(f"{addr}/{mask}")


def check_launch_site(hosts: Sequence[Host], interface: str, ssh_config: str = "", command: str = "") -> None:
    """When this machine is none of ``hosts`` and the cluster names ``interface``, the ranks reach
    the launcher (mpirun's daemons, Gloo's rendezvous) on this machine's ``interface``: it must
    exist and be on the hosts' network. Otherwise one sentence saying to launch from a node."""
    if not interface or not hosts or any(is_local_host(h.name) for h in hosts):
        return
    mine = _iface_ipv4(interface)
    first = hosts[0].name
    for h in hosts:
        addr, _ = ssh_target(h.name, ssh_config)
        try:
            ip = ipaddress.ip_address(socket.gethostbyname(addr))
        except (OSError, ValueError):
            return  # unresolvable here: check_hosts_answer names it
        if mine is None or ip not in mine.network:
            break
    else:
        return
    have = f"its {interface} is {mine}" if mine else f"it has no {interface} with an IPv4 address"
    ssh = f"ssh -F {ssh_config}" if ssh_config else "ssh"
    raise LaunchError(f"this machine is not one of the hosts and {have}, not on the network of {first} ({ip}), "
                      f"so the ranks could not reach the launcher; launch from one of the nodes, e.g. "
                      f"`{ssh} {first} 'cd {os.getcwd()} && {command or 'python -m launch ...'}'`")


# --------------------------------------------------------------------------- the watch

_MPI_DIED = re.compile(r"process rank (\d+) with PID \d+ on node (\S+?) exited on signal (\d+)")
_MPI_EXIT = re.compile(r"process rank (\d+) with PID \d+ on node (\S+?) exited with status (\d+)")
_GLOO_EXIT = re.compile(r"^Process (\d+) exit with status code (-?\d+)\.")
# Which fault names the cause best: a lost node, then a rank killed by a signal, then an exit code
# (after a peer is gone, the survivors fail too, often before the launcher reports the killed one).
_LOST, _KILLED, _EXITED = 3, 2, 1


class Watch:
    """Watches one running stage (see the module's docstring); ``failure`` is the first fault seen."""

    def __init__(self, where: list[tuple[str, list[int]]], ssh_config: str = "", ssh_port: int = 0,
                 probe: bool = True):
        self.where = where
        self.failure: Failure | None = None
        self._kind = 0  # _LOST, _KILLED or _EXITED: how the failure was seen
        self._lock = threading.Lock()
        self._stop = threading.Event()
        remote = [h for h, _ in where if probe and not is_local_host(h)]
        self._targets = {h: ssh_target(h, ssh_config, ssh_port) for h in remote}
        self._thread = threading.Thread(target=self._probe_loop, daemon=True) if self._targets else None

    def start(self) -> None:
        if self._thread:
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(timeout=PROBE_TIMEOUT_S + 1)

    def _ranks_on(self, node: str) -> list[int]:
        return next((r for h, r in self.where if h == node), [])

    def _node_of(self, rank: int) -> str:
        return next((h for h, r in self.where if rank in r), "?")

    def _record(self, kind: int, node: str, ranks: str, why: str) -> None:
        with self._lock:
            if self.failure is None or kind > self._kind:
                at = self.failure.at if self.failure else time.monotonic()
                self.failure, self._kind = Failure(node, ranks, why, at), kind

    @property
    def lost(self) -> bool:
        return self._kind == _LOST

    def feed(self, line: str) -> None:
        """One line of the stage's output."""
        if m := _MPI_DIED.search(line):
            self._record(_KILLED, m.group(2), f"rank {m.group(1)}", f"killed by {_signame(int(m.group(3)))}")
        elif m := _MPI_EXIT.search(line):
            self._record(_EXITED, m.group(2), f"rank {m.group(1)}", f"exit code {m.group(3)}")
        elif m := _GLOO_EXIT.search(line):
            rank, code = int(m.group(1)), int(m.group(2))
            killed = code > 128 or code < 0  # a shell's 128+N, or Python's -N
            sig = code - 128 if code > 128 else -code
            self._record(_KILLED if killed else _EXITED, self._node_of(rank), f"rank {rank}",
                         f"killed by {_signame(sig)}" if killed else f"exit code {code}")

    def _probe_loop(self) -> None:
        misses = {h: 0 for h in self._targets}
        answered: set[str] = set()  # a node that never answered (no sshd, a firewall) is not lost
        while not self._stop.wait(PROBE_INTERVAL_S):
            for host, (addr, port) in self._targets.items():
                try:
                    with socket.create_connection((addr, port), timeout=PROBE_TIMEOUT_S):
                        misses[host] = 0
                        answered.add(host)
                except OSError:
                    misses[host] += 1
                    if host in answered and misses[host] >= PROBE_MISSES:
                        seconds = PROBE_MISSES * PROBE_INTERVAL_S
                        self._record(_LOST, host, _ranks_text(self._ranks_on(host)),
                                     f"the node stopped answering on its ssh port for {seconds:.0f} s")
                        return

    def should_stop(self) -> bool:
        with self._lock:
            if self.failure is None:
                return False
            return self._kind == _LOST or time.monotonic() - self.failure.at > FAULT_GRACE_S


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


# --------------------------------------------------------------------------- running

def run(cmd: StageCommand, cluster_ssh_port: int = 0, probe_nodes: bool = True,
        watch_faults: bool = True) -> tuple[int, Failure | None]:
    """Run one command in its own process group; SIGINT/SIGTERM/SIGUSR1 to the launcher go to the
    ranks (:func:`forward`), and the group is stopped for good if it does not end by itself
    ``SIGNAL_WAIT_S`` later. A multi-host command is watched (module docstring; ``probe_nodes=False``: its output
    only, as under Slurm, whose nodes need not run sshd; ``watch_faults=False``: not at all, for
    elastic training, which lives through a lost rank or node); returns (exit code, first fault)."""
    where = placement(cmd)
    with contextlib.ExitStack() as stack:
        env = cmd.process_env(os.environ)
        if cmd.ssh_config and cmd.kind == "horovodrun":
            env["PATH"] = stack.enter_context(ssh_wrapper(cmd.ssh_config)) + os.pathsep + env.get("PATH", "")
        watch = Watch(where, cmd.ssh_config, cluster_ssh_port, probe_nodes) if where and watch_faults else None
        pipe = subprocess.PIPE if watch else None
        proc = subprocess.Popen(cmd.argv, env=env, stdin=subprocess.DEVNULL, stdout=pipe, stderr=pipe,
                                start_new_session=True, bufsize=0)
        pumps = []
        if watch:
            pumps = [threading.Thread(target=_pump, args=(src, dst, watch), daemon=True)
                     for src, dst in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr))]
            for t in pumps:
                t.start()
            watch.start()
        got: list[int] = []

        def handler(signum, frame):
            if not got:  # a second signal changes nothing: the first one's wait is under way
                forward(proc, cmd, signum)
            got.append(signum)

        old = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.5)
                    break
                except subprocess.TimeoutExpired:
                    if got:
                        rc = _stop(proc, ((None, SIGNAL_WAIT_S), (signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)))
                        break
                    if watch and watch.should_stop():
                        rc = _stop(proc, ((signal.SIGTERM, STOP_GRACE_S), (signal.SIGKILL, 10)))
                        break
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if watch:
                watch.close()
            for t in pumps:
                t.join(timeout=5)
    if got:
        raise Interrupted(got[0])
    return rc, (watch.failure if watch and rc != 0 else None)


def _pump(src, dst, watch: Watch) -> None:
    """Copy the stage's output through, line by line, showing each line to the watch."""
    for raw in iter(src.readline, b""):
        if hasattr(dst, "buffer"):
            dst.buffer.write(raw)
        else:  # a replaced sys.stdout (pytest's capture): text only
            dst.write(raw.decode(errors="replace"))
        dst.flush()
        watch.feed(raw.decode(errors="replace"))


def forward(proc: subprocess.Popen, cmd: StageCommand, signum: int) -> str:
    """Pass a stop signal on to the stage's ranks (module docstring); what was signalled."""
    ranks = local_ranks(proc.pid)
    if ranks:
        for pid in ranks:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signum)
        return f"{len(ranks)} local rank(s)"
    if cmd.kind == "srun":
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGUSR1)  # srun forwards SIGUSR1 to every task of the step
        return "srun (SIGUSR1)"
    if cmd.kind == "mpirun" or (cmd.kind == "horovodrun" and "--gloo" not in cmd.argv):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, signal.SIGUSR1)  # Open MPI forwards SIGUSR1 to every rank
        return "mpirun (SIGUSR1)"
    _signal_group(proc, signum)  # one process (kind python), or Gloo ranks all on other nodes
    return "the process group"


def local_ranks(root: int) -> list[int]:
    """pids of the descendants of ``root`` that are ranks (a rank variable in their environment)
    and not launchers (mpirun's own ``orted``/``prted`` carry none)."""
    out = []
    for pid in sorted(_descendants(root)):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        names = {kv.split(b"=", 1)[0].decode(errors="replace") for kv in env if b"=" in kv}
        if names & set(RANK_VARS):
            out.append(pid)
    # a rank's own children (tf.data, a shell between): only the outermost process with a rank
    return [p for p in out if _parent(p) not in out]


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return -1


def _signal_group(proc: subprocess.Popen, signum: int) -> None:
    try:
        os.killpg(proc.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(proc: subprocess.Popen, steps=((None, 20), (signal.SIGTERM, 20), (signal.SIGKILL, 10))) -> int:
    """Stop the group: by default (after an interrupt) 20 s to stop by itself, then SIGTERM,
    20 s more, then SIGKILL. At the end every process of the group and every descendant of the
    stage is killed, also those mpirun started in process groups of their own (its local ranks)
    and those orphaned when their parent died first."""
    tree = _descendants(proc.pid)
    rc = None
    for sig, grace in steps:
        if sig is not None:
            tree |= _descendants(proc.pid)
            _signal_group(proc, sig)
        try:
            rc = proc.wait(timeout=grace)
            break
        except subprocess.TimeoutExpired:
            continue
    _signal_group(proc, signal.SIGKILL)
    for pid in tree:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    return rc if rc is not None else proc.wait()


def _descendants(root: int) -> set[int]:
    """pids of every living descendant of ``root`` (from /proc; empty where there is none)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                ppid = int((p / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p.name))
    out, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in out:
                out.add(c)
                todo.append(c)
    return out
