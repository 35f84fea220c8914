"""Where ranks go: hosts and slots from flags, a hostfile, a Slurm allocation or a cluster file.

Precedence (first that applies): ``--hosts``/``--hostfile`` on the command line, the Slurm
allocation when ``SLURM_JOB_NODELIST`` is set, the cluster file's ``hosts``/``hostfile``, and
otherwise this node alone. Nothing here starts a process except ``check_hosts_answer``.
"""
from __future__ import annotations

import re
import socket
import subprocess
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence


class LaunchError(RuntimeError):
    """A problem the user can fix; printed as one sentence, without a traceback."""


@dataclass(frozen=True)
class Host:
    name: str
    slots: int

    def spec(self) -> str:
        return f"{self.name}:{self.slots}"


@dataclass(frozen=True)
class Allocation:
    """Hosts with slots, where they came from, and what the allocator fixed (Slurm)."""
    hosts: tuple[Host, ...]
    source: str  # "hosts", "hostfile", "slurm", "cluster", "local"
    hostfile: str = ""  # passed through to mpirun/horovodrun when the user gave one
    ntasks: int = 0  # Slurm: total ranks of the allocation
    cpus_per_task: int = 0  # Slurm: CPUs per rank (hardware threads unless cpus_are_cores)
    cpus_are_cores: bool = False  # Slurm: --hint=nomultithread / --threads-per-core=1 (a CPU is a core)
    slots_given: bool = True  # False when slots were not stated (local node)
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def total_slots(self) -> int:
        return sum(h.slots for h in self.hosts)

    @property
    def is_local(self) -> bool:
        return all(is_local_host(h.name) for h in self.hosts)


# --------------------------------------------------------------------------- parsing

# A host name or IPv4 address: letters, digits, '.', '-', '_', not starting with '-' or '.' (so never an
# option of ssh or mpirun), no shell characters (horovodrun pastes host names into shell strings).
_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,252}$")
# An interface name (Linux: at most 15 bytes) or an IPv4 subnet, as Open MPI's *_if_include take; a list by ','.
_IFACE_RE = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.:@\-]{0,14}|\d{1,3}(?:\.\d{1,3}){3}/\d{1,2})$")


def check_host_name(name: str, where: str = "host") -> str:
    """``name`` when it is a plain host name or address; LaunchError otherwise (said before anything runs)."""
    if not isinstance(name, str) or not _HOST_RE.match(name):
        raise LaunchError(f"{where} {name!r} is not a host name (letters, digits, '.', '-', '_', not starting "
                          f"with '-' or '.'); refused")
    return name


def check_interface(value: str, where: str = "network_interface") -> str:
    """``value`` when it is an interface name or IPv4 subnet (or a comma-separated list of them)."""
    if value and not all(_IFACE_RE.match(item) for item in value.split(",")):
        raise LaunchError(f"{where} {value!r} is not an interface name (e.g. eth0, ib0) or an IPv4 subnet "
                          f"(e.g. 10.0.0.0/24); refused")
    return value


def parse_hosts(spec: str | Sequence[str], default_slots: int = 1) -> tuple[Host, ...]:
    """``"h1:2,h2:2"`` (or a list of such items) -> hosts; a missing ``:N`` means ``default_slots``."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    hosts: list[Host] = []
    for raw in items:
        item = str(raw).strip()
        if not item:
            continue
        name, _, slots = item.partition(":")
        name = name.strip()
        if not name or not _HOST_RE.match(name):
            raise LaunchError(f"'{item}' is not a host; write hosts as name:slots, e.g. node01:2,node02:2 "
                              f"(names: letters, digits, '.', '-', '_', not starting with '-' or '.')")
        if slots:
            try:
                n = int(slots)
            except ValueError:
                raise LaunchError(f"'{item}': slots must be a whole number, e.g. {name}:2") from None
        else:
            n = default_slots
        if n < 1:
            raise LaunchError(f"'{item}': a host needs at least 1 slot")
        hosts.append(Host(name, n))
    if not hosts:
        raise LaunchError("no hosts given; write hosts as name:slots, e.g. node01:2,node02:2")
    return _merge(hosts)


def _merge(hosts: Sequence[Host]) -> tuple[Host, ...]:
    """A host named twice gets the sum of its slots (as Open MPI counts it), order kept."""
    order: dict[str, int] = {}
    for h in hosts:
        order[h.name] = order.get(h.name, 0) + h.slots
    return tuple(Host(n, s) for n, s in order.items())


def parse_hostfile(path: str | Path) -> tuple[Host, ...]:
    """Open MPI / Horovod hostfile: ``host slots=N`` (or ``host:N``, or a bare host = 1 slot)."""
    p = Path(path)
    if not p.is_file():
        raise LaunchError(f"hostfile not found: {p}")
    hosts: list[Host] = []
    for lineno, line in enumerate(p.read_text().splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        name, slots = parts[0], None
        if ":" in name:
            name, _, s = name.partition(":")
            slots = s
        for opt in parts[1:]:
            key, _, val = opt.partition("=")
            if key == "slots":
                slots = val
            elif key != "max_slots":
                raise LaunchError(f"{p}:{lineno}: expected 'host slots=N', got {line!r}")
        try:
            n = int(slots) if slots is not None else 1
        except ValueError:
            raise LaunchError(f"{p}:{lineno}: slots must be a whole number: {line!r}") from None
        if n < 1 or not _HOST_RE.match(name):
            raise LaunchError(f"{p}:{lineno}: expected 'host slots=N', got {line!r}")
        hosts.append(Host(name, n))
    if not hosts:
        raise LaunchError(f"hostfile {p} lists no hosts")
    return _merge(hosts)


# --------------------------------------------------------------------------- Slurm

def expand_nodelist(nodelist: str) -> list[str]:
    """Slurm's compressed host list: ``node[01-03,07],gpu1,rack[1-2]-n[1-2]`` -> names, in order."""
    out: list[str] = []
    for item in _split_top(nodelist.strip()):
        out.extend(_expand_one(item))
    return out


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if cur:
        parts.append("".join(cur))
    return [p.strip() for p in parts if p.strip()]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[: m.start()], item[m.end():]
    names = []
    for rng in m.group(1).split(","):
        rng = rng.strip()
        if "-" in rng:
            lo, hi = rng.split("-", 1)
            width = len(lo)
            try:
                a, b = int(lo), int(hi)
            except ValueError:
                raise LaunchError(f"cannot read the Slurm node list {item!r}") from None
            names.extend(f"{i:0{width}d}" for i in range(a, b + 1))
        else:
            names.append(rng)
    return [n for name in names for n in _expand_one(head + name + tail)]


def expand_tasks_per_node(spec: str, nnodes: int) -> list[int]:
    """``SLURM_TASKS_PER_NODE`` form ``2(x3),1`` -> ``[2, 2, 2, 1]``; a bare ``2`` means every node."""
    counts: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part)
        if not m:
            raise LaunchError(f"cannot read Slurm tasks per node {spec!r}")
        counts.extend([int(m.group(1))] * int(m.group(2) or 1))
    if len(counts) == 1 and nnodes > 1:
        counts = counts * nnodes
    return counts


def slurm_allocation(env: Mapping[str, str]) -> Allocation | None:
    """Hosts and ranks of the Slurm job this runs in, or None outside Slurm."""
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        return None
    nodes = [check_host_name(n, "the Slurm node list names") for n in expand_nodelist(nodelist)]
    if not nodes:
        raise LaunchError(f"the Slurm node list {nodelist!r} names no node")
    ntasks = _int(env.get("SLURM_NTASKS") or env.get("SLURM_NPROCS"), 0)
    per_node: list[int] | None = None
    tpn = env.get("SLURM_TASKS_PER_NODE") or env.get("SLURM_STEP_TASKS_PER_NODE")
    if tpn:
        per_node = expand_tasks_per_node(tpn, len(nodes))
    elif env.get("SLURM_NTASKS_PER_NODE"):
        per_node = [_int(env["SLURM_NTASKS_PER_NODE"], 1)] * len(nodes)
    elif ntasks:
        base, extra = divmod(ntasks, len(nodes))
        per_node = [base + (1 if i < extra else 0) for i in range(len(nodes))]
    else:
        per_node = [1] * len(nodes)
    if len(per_node) != len(nodes):
        raise LaunchError(f"Slurm lists {len(nodes)} nodes but tasks for {len(per_node)} ({tpn!r})")
    hosts = tuple(Host(n, s) for n, s in zip(nodes, per_node) if s > 0)
    if not ntasks:
        ntasks = sum(h.slots for h in hosts)
    cpus = _int((env.get("SLURM_CPUS_PER_TASK") or "").split("(")[0], 0)
    # Slurm counts CPUs as hardware threads unless the job asked for one thread per core
    cores = "nomultithread" in env.get("SLURM_HINT", "") or env.get("SLURM_THREADS_PER_CORE") == "1"
    return Allocation(hosts=hosts, source="slurm", ntasks=ntasks, cpus_per_task=cpus, cpus_are_cores=cores)


def _int(v, default: int) -> int:
    try:
        return int(str(v).split("(")[0])
    except (TypeError, ValueError):
        return default


# --------------------------------------------------------------------------- checks

def is_local_host(name: str) -> bool:
    if name in ("localhost", "127.0.0.1", "::1") or name.startswith("127."):
        return True
    me = {socket.gethostname(), socket.gethostname().split(".")[0]}
    try:
        me.add(socket.getfqdn())
    except OSError:
        pass
    return name in me


def check_hosts_answer(hosts: Sequence[Host], ssh_port: int = 0, timeout: float = 5.0, ssh_config: str = "") -> None:
    """Raise LaunchError naming the first remote host that does not answer over ssh within ``timeout``."""
    remote = [h.name for h in hosts if not is_local_host(h.name)]
    if not remote:
        return

    def probe(name: str):
        cmd = ["ssh"] + (["-F", ssh_config] if ssh_config else [])
        cmd += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(max(1, timeout))}",
                "-o", "StrictHostKeyChecking=accept-new"]
        if ssh_port:
            cmd += ["-p", str(ssh_port)]
        cmd += ["--", name, "true"]  # "--": a name is never read as an ssh option
        try:
            r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout + 5)
        except FileNotFoundError:
            return name, "ssh is not installed on this node"
        except subprocess.TimeoutExpired:
            return name, f"no answer within {timeout:g} s"
        if r.returncode != 0:
            why = (r.stderr.strip().splitlines() or [f"ssh exit code {r.returncode}"])[-1]
            return name, why
        return name, None

    with ThreadPoolExecutor(max_workers=min(16, len(remote))) as ex:
        for name, why in ex.map(probe, remote):
            if why:
                raise LaunchError(f"host {name} does not answer over ssh ({why}); check the name and "
                                  f"password-less ssh, or leave it out of the host list")
