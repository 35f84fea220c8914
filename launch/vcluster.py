"""A virtual cluster on one machine: network-namespace nodes with their own hostname and sshd.

``python -m launch vcluster up --nodes 2 [--slots 1] [--dir D]`` makes, for node k:

* a network namespace ``cxr-nodeK`` with an ``eth0`` (one end of a veth pair whose other end sits
  on the bridge ``cxrbr0`` in the root namespace), address ``198.18.0.(10+K)/24``. The bridge has
  ``198.18.0.1/24``. Addresses come only from 198.18.0.0/24 (RFC 2544, reserved for network
  benchmark tests); nothing routes anywhere else (no default route in a node);
* a UTS namespace with hostname ``nodeK`` (ranks started over ssh report it);
* an sshd listening on the node's address with a host key and a client key made for this cluster;
* a line ``198.18.0.(10+K) nodeK`` in /etc/hosts, marked with ``# cxr-vcluster``.

It writes ``D/cluster.yaml`` (the ``configs/cluster.yaml`` format: hosts, slots, ``eth0``, and
``ssh_config``, an ssh client file holding the identity and the nodes' pinned host keys) and
``D/state.json`` (what to remove). ``down`` removes everything of it: sshd processes (by pid) and
any process left in a node, namespaces, veths, bridge, /etc/hosts lines, keys and ``D``. ``up``
first removes what a crashed earlier cluster left behind.

Needs root, ``ip`` (iproute2), ``unshare``/``nsenter`` (util-linux) and ``sshd`` (Debian's
``openssh-server``, which ``make vcluster-deps`` installs).
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from launch.hosts import LaunchError

SUBNET = ipaddress.ip_network("198.18.0.0/24")
BRIDGE = "cxrbr0"
BRIDGE_ADDR = "198.18.0.1"
NS_PREFIX = "cxr-node"
VETH_PREFIX = "cxrv"
HOSTS_FILE = Path("/etc/hosts")
HOSTS_MARK = "# cxr-vcluster"
DEFAULT_DIR = Path(os.environ.get("CXR_VCLUSTER_DIR", "/tmp/cxr-vcluster"))
MAX_NODES = 8
SSHD = "/usr/sbin/sshd"


@dataclass
class Node:
    name: str       # hostname, e.g. node1
    netns: str      # cxr-node1
    veth: str       # cxrv1 (root side)
    addr: str       # 198.18.0.11
    sshd_pid: int = 0


@dataclass
class State:
    dir: str
    slots: int
    nodes: list[Node] = field(default_factory=list)
    bridge: str = BRIDGE

    def save(self) -> None:
        Path(self.dir, "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, folder: Path) -> "State | None":
        p = folder / "state.json"
        if not p.is_file():
            return None
        raw = json.loads(p.read_text())
        return cls(dir=raw["dir"], slots=raw["slots"], nodes=[Node(**n) for n in raw["nodes"]],
                   bridge=raw.get("bridge", BRIDGE))


# --------------------------------------------------------------------------- checks

def unavailable_reason() -> str | None:
    """One sentence saying why a virtual cluster cannot be made here, or None."""
    if os.geteuid() != 0:
        return "the virtual cluster needs root (network namespaces, a bridge, sshd)"
    for tool, pkg in (("ip", "iproute2"), ("unshare", "util-linux"), ("nsenter", "util-linux"),
                      ("ssh", "openssh-client"), ("ssh-keygen", "openssh-client")):
        if not shutil.which(tool):
            return f"the virtual cluster needs '{tool}' (Debian package {pkg})"
    if not os.access(SSHD, os.X_OK):
        return f"the virtual cluster needs {SSHD} (Debian package openssh-server; `make vcluster-deps`)"
    probe = f"{NS_PREFIX}-probe{os.getpid()}"
    r = _run(["ip", "netns", "add", probe], check=False)
    if r.returncode != 0:
        return f"network namespaces are not available here (ip netns add: {r.stderr.strip() or r.returncode})"
    _run(["ip", "netns", "del", probe], check=False)
    return None


def _run(argv, check=True, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=30, **kw)
    if check and r.returncode != 0:
        raise LaunchError(f"{' '.join(argv)} failed: {r.stderr.strip() or r.stdout.strip() or r.returncode}")
    return r


# --------------------------------------------------------------------------- up

def node_addr(k: int) -> str:
    addr = SUBNET.network_address + 10 + k
    assert addr in SUBNET and k >= 1
    return str(addr)


def up(nodes: int = 2, slots: int = 1, folder: Path = DEFAULT_DIR, python: str = "",
       log=print) -> State:
    """Make the cluster (after removing any earlier one in ``folder``); returns its state."""
    if not 1 <= nodes <= MAX_NODES:
        raise LaunchError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    why = unavailable_reason()
    if why:
        raise LaunchError(why)
    folder = Path(folder).resolve()
    down(folder, quiet=True)  # recover from a crashed or forgotten earlier cluster
    folder.mkdir(parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    state = State(dir=str(folder), slots=slots)
    state.save()  # from here on, down() can undo whatever exists
    try:
        _keys(folder)
        _run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        _run(["ip", "addr", "add", f"{BRIDGE_ADDR}/{SUBNET.prefixlen}", "dev", BRIDGE])
        _run(["ip", "link", "set", BRIDGE, "up"])
        for k in range(1, nodes + 1):
            node = Node(name=f"node{k}", netns=f"{NS_PREFIX}{k}", veth=f"{VETH_PREFIX}{k}", addr=node_addr(k))
            state.nodes.append(node)
            state.save()
            _make_node(node, folder)
            state.save()
        _hosts_add(state.nodes)
        for node in state.nodes:
            _wait_ssh(node, folder)
        _write_client_files(state, python or sys.executable)
    except BaseException:
        down(folder, quiet=True)
        raise
    log(f"virtual cluster up: {', '.join(f'{n.name} ({n.addr})' for n in state.nodes)}; "
        f"cluster file {folder / 'cluster.yaml'}; ssh -F {folder / 'ssh_config'} node1")
    return state


def _keys(folder: Path) -> None:
    for name in ("id_ed25519", "host_ed25519"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cxr-vcluster-{name}",
              "-f", str(folder / name)])
    shutil.copy(folder / "id_ed25519.pub", folder / "authorized_keys")
    os.chmod(folder / "authorized_keys", 0o600)


def _make_node(node: Node, folder: Path) -> None:
    _run(["ip", "netns", "add", node.netns])
    _run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns])
    _run(["ip", "link", "set", node.veth, "master", BRIDGE, "up"])
    inside = ["ip", "netns", "exec", node.netns]
    _run(inside + ["ip", "addr", "add", f"{node.addr}/{SUBNET.prefixlen}", "dev", "eth0"])
    _run(inside + ["ip", "link", "set", "eth0", "up"])
    _run(inside + ["ip", "link", "set", "lo", "up"])
    cfg = folder / f"sshd_{node.name}.conf"
    cfg.write_text("\n".join([
        f"ListenAddress {node.addr}", "Port 22", f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / f'sshd_{node.name}.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "PrintMotd no", "AcceptEnv *", "PermitUserEnvironment no",
        "MaxStartups 64", "LogLevel ERROR", ""]))
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    # sshd -D stays in the foreground, so its pid is ours; its own UTS namespace carries the
    # node's hostname to every session (and rank) started through it.
    proc = subprocess.Popen(inside + ["unshare", "--uts", "sh", "-c",
                                      f"hostname {node.name} && exec {SSHD} -D -e -f {cfg}"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=open(folder / f"sshd_{node.name}.log", "ab"), start_new_session=True)
    node.sshd_pid = proc.pid  # ip netns exec and unshare exec into sshd: the same pid


def _wait_ssh(node: Node, folder: Path, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((node.addr, 22), timeout=1.0):
                return
        except OSError:
            time.sleep(0.2)
    log = (folder / f"sshd_{node.name}.log")
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    raise LaunchError(f"sshd on {node.name} ({node.addr}) did not start within {timeout:.0f} s"
                      + (f": {tail[0]}" if tail else ""))


def _hosts_add(nodes: list[Node]) -> None:
    text = HOSTS_FILE.read_text()
    lines = [ln for ln in text.splitlines() if HOSTS_MARK not in ln]
    lines += [f"{n.addr} {n.name} {HOSTS_MARK}" for n in nodes]
    _rewrite_hosts("\n".join(lines) + "\n")


def _rewrite_hosts(text: str) -> None:
    # In place (not rename): /etc/hosts may be a bind mount, as in containers.
    with open(HOSTS_FILE, "w") as f:
        f.write(text)


def _write_client_files(state: State, python: str) -> None:
    folder = Path(state.dir)
    host_pub = (folder / "host_ed25519.pub").read_text().split()
    (folder / "known_hosts").write_text("".join(
        f"{n.name},{n.addr} {host_pub[0]} {host_pub[1]}\n" for n in state.nodes))
    blocks = []
    for n in state.nodes:
        blocks.append("\n".join([
            f"Host {n.name} {n.addr}", f"  HostName {n.addr}", "  User root",
            f"  IdentityFile {folder / 'id_ed25519'}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {folder / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  BatchMode yes", "  ConnectTimeout 5", "  LogLevel ERROR", ""]))
    (folder / "ssh_config").write_text("\n".join(blocks))
    cluster = {
        "hosts": [f"{n.name}:{state.slots}" for n in state.nodes],
        "network_interface": "eth0",
        "ssh_config": str(folder / "ssh_config"),
        "python": python,
        "check_hosts": True,
    }
    (folder / "cluster.yaml").write_text(
        "# Written by `python -m launch vcluster up`; removed by `down`.\n" + yaml.safe_dump(cluster, sort_keys=False))


# --------------------------------------------------------------------------- using it

def node_command(state: State, node: str, argv: list[str]) -> list[str]:
    """``argv`` to run inside ``node`` (its network and UTS namespaces) from the root namespace."""
    n = next((x for x in state.nodes if x.name == node), None)
    if n is None:
        raise LaunchError(f"no node {node} in the virtual cluster ({', '.join(x.name for x in state.nodes)})")
    return ["nsenter", "-t", str(n.sshd_pid), "--net", "--uts", "--"] + list(argv)


def ssh_command(state: State, node: str, command: str) -> list[str]:
    """ssh into ``node`` with the cluster's own client file."""
    return ["ssh", "-F", str(Path(state.dir) / "ssh_config"), node, command]


# --------------------------------------------------------------------------- down

def down(folder: Path = DEFAULT_DIR, quiet: bool = False, log=print) -> list[str]:
    """Remove everything of the cluster in ``folder`` and any leftover of the naming scheme."""
    folder = Path(folder).resolve()
    state = State.load(folder)
    removed: list[str] = []
    pids = [n.sshd_pid for n in state.nodes if n.sshd_pid] if state else []
    for pid in pids:
        if _is_our_sshd(pid, folder):
            _kill(pid)
            removed.append(f"sshd {pid}")
    for ns in _our_netns():
        for pid in _netns_pids(ns):  # ranks, orted, ssh sessions left in the node
            _kill(pid)
            removed.append(f"pid {pid} in {ns}")
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    for link in _our_links():
        _run(["ip", "link", "del", link], check=False)
        removed.append(f"link {link}")
    if HOSTS_FILE.is_file() and HOSTS_MARK in HOSTS_FILE.read_text():
        lines = [ln for ln in HOSTS_FILE.read_text().splitlines() if HOSTS_MARK not in ln]
        _rewrite_hosts("\n".join(lines) + "\n")
        removed.append("/etc/hosts entries")
    if folder.is_dir() and ((folder / "state.json").is_file() or not any(folder.iterdir())):
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(str(folder))
    if removed and not quiet:
        log("virtual cluster down: removed " + ", ".join(removed))
    return removed


def _is_our_sshd(pid: int, folder: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"sshd") and any(str(folder).encode() in c for c in cmd)


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
        try:
            os.waitpid(pid, os.WNOHANG)  # reap it when it is our child
        except ChildProcessError:
            pass
        if _zombie(pid):
            return
        time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _our_netns() -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.split() and ln.split()[0].startswith(NS_PREFIX)]


def _netns_pids(ns: str) -> list[int]:
    r = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _our_links() -> list[str]:
    r = _run(["ip", "-o", "link", "show"], check=False)
    names = [ln.split(":")[1].strip().split("@")[0] for ln in r.stdout.splitlines() if ln.count(":") >= 2]
    return [n for n in names if n == BRIDGE or (n.startswith(VETH_PREFIX) and n[len(VETH_PREFIX):].isdigit())]


def leftovers() -> list[str]:
    """What of any virtual cluster exists now (empty after a clean ``down``)."""
    out = [f"netns {n}" for n in _our_netns()] + [f"link {n}" for n in _our_links()]
    if HOSTS_FILE.is_file() and HOSTS_MARK in HOSTS_FILE.read_text():
        out.append("/etc/hosts entries")
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"sshd" in cmd and b"cxr-vcluster" in cmd.replace(b"\0", b" "):
                out.append(f"sshd {p.name}")
    return out


# --------------------------------------------------------------------------- command line

def register(sub) -> None:
    add_verbs(sub.add_parser("vcluster", help="a virtual cluster of network-namespace nodes on this machine",
                             description=__doc__.split("\n\n")[0]))


def add_verbs(p) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    u = verbs.add_parser("up", help="make N nodes with sshd and write a cluster file")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--slots", type=int, default=1, help="ranks each node may run")
    u.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    u.add_argument("--python", default="", help="interpreter for the ranks (default: this one)")
    d = verbs.add_parser("down", help="remove the cluster and everything it made")
    d.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    s = verbs.add_parser("status", help="list the nodes, or what a crashed cluster left")
    s.add_argument("--dir", type=Path, default=DEFAULT_DIR)


def main(args) -> int:
    if args.verb == "up":
        up(args.nodes, args.slots, args.dir, args.python)
    elif args.verb == "down":
        if not down(args.dir):
            print("virtual cluster down: nothing to remove")
    else:
        state = State.load(Path(args.dir).resolve())
        for n in state.nodes if state else ():
            print(f"{n.name} {n.addr} netns {n.netns} sshd pid {n.sshd_pid}")
        if not state:
            rest = leftovers()
            print("no virtual cluster in " + str(args.dir) + "; leftovers: " + (", ".join(rest) or "none"))
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m launch.vcluster", description=__doc__.split("\n\n")[0])
    add_verbs(parser)
    try:
        sys.exit(main(parser.parse_args()))
    except LaunchError as e:
        print(f"vcluster: {e}", file=sys.stderr)
        sys.exit(2)
