"""A virtual cluster on one machine: network-namespace nodes with their own hostname and sshd.

``python -m launch vcluster up --nodes 2 [--slots 1] [--id C] [--dir D]`` makes, for node k of
cluster C (0-3; the tests use 3, so they never touch a user's cluster 0):

* a network namespace ``cxrC-nodeK`` with an ``eth0`` (one end of a veth pair whose other end sits
  on the bridge ``cxrbrC`` in the root namespace), address ``198.18.0.(64C+10+K)/26``; the bridge
  has ``198.18.0.(64C+1)``. Addresses come only from 198.18.0.0/24 (RFC 2544, reserved for network
  benchmark tests), a /26 per cluster; nothing routes anywhere else (no default route in a node);
* a UTS namespace with hostname ``nodeK`` (cluster 0) or ``cCnodeK`` (ranks started over ssh report it);
* an sshd listening on the node's address with a host key and a client key made for this cluster;
* a line ``<address> <hostname>`` in /etc/hosts, marked with ``# cxr-vcluster-C``.

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
import contextlib
import fcntl
import ipaddress
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from launch.hosts import LaunchError

BLOCK = ipaddress.ip_network("198.18.0.0/24")  # the only addresses a virtual cluster ever uses
HOSTS_FILE = Path("/etc/hosts")
MAX_NODES = 8
MAX_ID = 3
SSHD = "/usr/sbin/sshd"


@dataclass(frozen=True)
class Names:
    """Every name and address of virtual cluster ``id`` (one /26 of 198.18.0.0/24 each)."""
    id: int = 0

    def __post_init__(self):
        if not 0 <= self.id <= MAX_ID:
            raise LaunchError(f"--id must be between 0 and {MAX_ID}, got {self.id}")

    @property
    def subnet(self) -> ipaddress.IPv4Network:
        return list(BLOCK.subnets(new_prefix=26))[self.id]

    @property
    def bridge(self) -> str:
        return f"cxrbr{self.id}"

    @property
    def bridge_addr(self) -> str:
        return str(self.subnet.network_address + 1)

    @property
    def mark(self) -> str:
        return f"# cxr-vcluster-{self.id}"

    @property
    def ns_prefix(self) -> str:
        return f"cxr{self.id}-node"

    @property
    def veth_prefix(self) -> str:
        return f"cxr{self.id}v"

    def hostname(self, k: int) -> str:
        return f"node{k}" if self.id == 0 else f"c{self.id}node{k}"

    def addr(self, k: int) -> str:
        a = self.subnet.network_address + 10 + k
        assert 1 <= k <= MAX_NODES and a in self.subnet and a in BLOCK
        return str(a)

    def node(self, k: int) -> "Node":
        return Node(name=self.hostname(k), netns=f"{self.ns_prefix}{k}", veth=f"{self.veth_prefix}{k}",
                    addr=self.addr(k))


def default_dir(cluster_id: int = 0) -> Path:
    """``/run/cxr-vcluster-ID``: under a root-owned base, not world-writable /tmp, where another user
    could pre-create or symlink the name and have root write keys and sshd configs there."""
    return Path(os.environ.get("CXR_VCLUSTER_DIR", f"/run/cxr-vcluster-{cluster_id}"))


def _abs(folder) -> Path:
    """An absolute path WITHOUT following a final symlink (``resolve()`` would: a dangling link's target
    would then be created)."""
    return Path(os.path.abspath(os.fspath(folder)))


# --------------------------------------------------------------------------- a root helper's own folder
# Shared by launch.vslurm. The folder is made fresh (mode 0700) by ``make_fresh_dir``; files in it are
# created with O_EXCL|O_NOFOLLOW; ``remove_listed`` deletes only the names a state file lists, through a
# descriptor of the folder opened with O_NOFOLLOW, so a folder swapped for a symlink after the check
# cannot redirect a deletion.

_STATE_MAX = 1 << 20  # a state file is a few KB


def open_own_dir(folder: Path) -> int | None:
    """A descriptor of ``folder`` (not following a symlink) when it is a directory of this user that
    no one else may write; None otherwise (missing, a symlink, another user's, group/world-writable)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        return None
    return fd


def read_own_state(dir_fd: int, name: str = "state.json") -> dict | None:
    """The JSON object in ``name`` inside the open folder: a regular file of this user that no one
    else may write, read without following a symlink; None otherwise."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022 \
                or st.st_size > _STATE_MAX:
            return None
        raw = os.read(fd, _STATE_MAX + 1)
    finally:
        os.close(fd)
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data if isinstance(data, dict) else None


def make_fresh_dir(folder: Path, what: str = "--dir") -> None:
    """``os.mkdir(folder, 0o700)``: a new folder or a LaunchError (an existing path, a symlink, no parent);
    checked afterwards through a descriptor (ours, mode 0700)."""
    try:
        os.mkdir(folder, 0o700)  # fresh, or fail: never an existing folder or a symlink planted in its place
    except FileExistsError:
        raise LaunchError(f"{what} {folder} already exists (or is a symlink); a new folder is made for every "
                          f"start (mode 0700): give a path that does not exist") from None
    except FileNotFoundError:
        raise LaunchError(f"{what} {folder}: its parent folder does not exist") from None
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        os.fchmod(fd, 0o700)  # whatever the umask
    finally:
        os.close(fd)


def create_file(path: Path, data: bytes = b"", mode: int = 0o600, append: bool = False):
    """A new file at ``path`` (O_CREAT|O_EXCL|O_NOFOLLOW: never an existing file or a planted symlink),
    ``data`` written; ``append``: returned open for appending (log files), else closed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    f = os.fdopen(fd, "ab" if append else "wb")
    if data:
        f.write(data)
        f.flush()
    if append:
        return f
    f.close()
    return None


def write_state(path: Path, data: dict) -> None:
    """Rewrite a state file in place (O_NOFOLLOW: never through a symlink), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(data, indent=1))


def remove_listed(folder: Path, dir_fd: int, names) -> tuple[int, bool]:
    """Delete the plain ``names`` (files; listed folders with what is in them) inside the folder open as
    ``dir_fd``, every step relative to that descriptor (``unlink(name, dir_fd=...)``, fd-based rmtree);
    then the folder itself when that left it empty and it is still the folder opened. Returns (entries
    deleted, folder removed)."""
    n = 0
    for name in names:
        if not _plain_name(name):
            continue
        try:
            st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)  # descriptor-based: refuses a symlink, follows none
        else:
            os.unlink(name, dir_fd=dir_fd)
        n += 1
    if os.listdir(dir_fd):
        return n, False
    try:
        same = os.path.samestat(os.stat(folder, follow_symlinks=False), os.fstat(dir_fd))
    except OSError:
        same = False
    if same:
        try:
            os.rmdir(folder)
        except OSError:
            return n, False
    return n, same


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
    id: int = 0
    nodes: list[Node] = field(default_factory=list)
    files: list[str] = field(default_factory=list)  # names in ``dir`` this cluster wrote: all down deletes
    hosts_newline: bool = False  # up added a final newline to an /etc/hosts that had none; down takes it away

    def track(self, *names: str) -> None:
        self.files += [n for n in names if n not in self.files]
        self.save()

    @property
    def names(self) -> Names:
        return Names(self.id)

    def save(self) -> None:
        write_state(Path(self.dir, "state.json"), asdict(self))

    @classmethod
    def load(cls, folder: Path, dir_fd: int | None = None) -> "State | None":
        """The state in ``folder`` (or the folder open as ``dir_fd``), when the folder and its state file
        are this user's and no one else's to write; None otherwise."""
        fd = open_own_dir(_abs(folder)) if dir_fd is None else dir_fd
        if fd is None:
            return None
        try:
            raw = read_own_state(fd)
        finally:
            if dir_fd is None:
                os.close(fd)
        return cls.from_json(raw) if raw is not None else None

    @classmethod
    def from_json(cls, raw: dict) -> "State | None":
        try:
            return cls(dir=str(raw["dir"]), slots=int(raw["slots"]), id=int(raw.get("id", 0)),
                       nodes=[Node(**n) for n in raw["nodes"]],
                       files=[str(f) for f in raw.get("files", []) if _plain_name(f)],
                       hosts_newline=bool(raw.get("hosts_newline", False)))
        except (KeyError, TypeError, ValueError):
            return None


def _plain_name(name) -> bool:
    """A file name directly in the cluster folder (no '/', not '..'): what a state file may list."""
    return isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\0" not in name


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
    probe = f"cxr-probe{os.getpid()}"
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

def up(nodes: int = 2, slots: int = 1, folder: Path | None = None, python: str = "", cluster_id: int = 0,
       log=print) -> State:
    """Make the cluster (after removing any earlier one of the same id); returns its state."""
    names = Names(cluster_id)
    if not 1 <= nodes <= MAX_NODES:
        raise LaunchError(f"--nodes must be between 1 and {MAX_NODES}, got {nodes}")
    if slots < 1:
        raise LaunchError(f"--slots must be at least 1, got {slots}")
    folder = _abs(folder or default_dir(cluster_id))
    check_new_dir(folder, State.load)
    why = unavailable_reason()
    if why:
        raise LaunchError(why)
    down(folder, cluster_id, quiet=True)  # recover from a crashed or forgotten earlier cluster (its own folder only)
    if folder.parent == Path("/run") and not folder.parent.is_dir():
        folder.parent.mkdir(mode=0o755)
    make_fresh_dir(folder)
    state = State(dir=str(folder), slots=slots, id=cluster_id)
    state.track("state.json")  # from here on, down() can undo whatever exists
    try:
        _keys(folder, state)
        _run(["ip", "link", "add", names.bridge, "type", "bridge"])
        _run(["ip", "addr", "add", f"{names.bridge_addr}/{names.subnet.prefixlen}", "dev", names.bridge])
        _run(["ip", "link", "set", names.bridge, "up"])
        for k in range(1, nodes + 1):
            node = names.node(k)
            state.nodes.append(node)
            state.save()
            _make_node(node, folder, names, state)
            state.save()
        state.hosts_newline = _hosts_add(state.nodes, names)
        state.save()
        for node in state.nodes:
            _wait_ssh(node, folder)
        _write_client_files(state, python or sys.executable)
    except BaseException:
        down(folder, cluster_id, quiet=True)
        raise
    log(f"virtual cluster up: {', '.join(f'{n.name} ({n.addr})' for n in state.nodes)}; "
        f"cluster file {folder / 'cluster.yaml'}; ssh -F {folder / 'ssh_config'} {state.nodes[0].name}")
    return state


def check_new_dir(folder: Path, load, what: str = "--dir") -> None:
    """Before ``up``: ``folder`` must not exist, or be this helper's own folder from an earlier start
    (a directory of this user, writable by no one else, with its state file, which ``load`` reads):
    that one is taken down first. A symlink or any other existing path is refused, untouched."""
    if folder.is_symlink():
        raise LaunchError(f"{what} {folder} is a symlink; up creates its own folder: give a path that does not exist")
    if os.path.lexists(folder) and load(folder) is None:
        raise LaunchError(f"{what} {folder} already exists and is not this helper's own folder; up creates a new "
                          f"folder (mode 0700) and never adopts one: give a path that does not exist")


def _keys(folder: Path, state: State) -> None:
    state.track("id_ed25519", "id_ed25519.pub", "host_ed25519", "host_ed25519.pub", "authorized_keys")
    for name in ("id_ed25519", "host_ed25519"):
        _run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"cxr-vcluster-{name}",
              "-f", str(folder / name)])
    create_file(folder / "authorized_keys", (folder / "id_ed25519.pub").read_bytes())


def _make_node(node: Node, folder: Path, names: Names, state: State) -> None:
    state.track(*(f"sshd_{node.name}.{ext}" for ext in ("conf", "pid", "log")))
    _run(["ip", "netns", "add", node.netns])
    _run(["ip", "link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns])
    _run(["ip", "link", "set", node.veth, "master", names.bridge, "up"])
    inside = ["ip", "netns", "exec", node.netns]
    _run(inside + ["ip", "addr", "add", f"{node.addr}/{names.subnet.prefixlen}", "dev", "eth0"])
    _run(inside + ["ip", "link", "set", "eth0", "up"])
    _run(inside + ["ip", "link", "set", "lo", "up"])
    cfg = folder / f"sshd_{node.name}.conf"
    create_file(cfg, "\n".join([
        f"ListenAddress {node.addr}", "Port 22", f"HostKey {folder / 'host_ed25519'}",
        f"PidFile {folder / f'sshd_{node.name}.pid'}", f"AuthorizedKeysFile {folder / 'authorized_keys'}",
        "PermitRootLogin prohibit-password", "PasswordAuthentication no", "KbdInteractiveAuthentication no",
        "UsePAM no", "StrictModes no", "PrintMotd no", "AcceptEnv *", "PermitUserEnvironment no",
        "MaxStartups 64", "LogLevel ERROR", ""]).encode())
    Path("/run/sshd").mkdir(exist_ok=True)  # sshd's privilege-separation directory
    # sshd -D stays in the foreground, so its pid is ours; its own UTS namespace carries the
    # node's hostname to every session (and rank) started through it.
    # The values are sh's positional arguments ($1..$3), never formatted into its script.
    proc = subprocess.Popen(inside + ["unshare", "--uts", "sh", "-c", 'hostname "$1" && exec "$2" -D -e -f "$3"',
                                      "sh", node.name, SSHD, str(cfg)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=create_file(folder / f"sshd_{node.name}.log", append=True),
                            start_new_session=True)
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


def _ours(line: bytes, names: Names) -> bool:
    return line.rstrip(b"\r\n").endswith(names.mark.encode())


def _hosts_add(nodes: list[Node], names: Names) -> bool:
    """Append this cluster's lines to /etc/hosts (earlier ones of the same id replaced), every other
    byte kept; True when the file had no final newline and one was added (down removes it again)."""
    with _hosts_locked():
        data = HOSTS_FILE.read_bytes()
        kept = b"".join(ln for ln in data.splitlines(keepends=True) if not _ours(ln, names))
        added = bool(kept) and not kept.endswith(b"\n")
        ours = "".join(f"{n.addr} {n.name} {names.mark}\n" for n in nodes).encode()
        _replace_hosts(kept + (b"\n" if added else b"") + ours)
    return added


def _hosts_remove(names: Names, added_newline: bool = False) -> bool:
    """Remove exactly this cluster's lines from /etc/hosts (and the newline ``up`` added); False if none."""
    with _hosts_locked():
        data = HOSTS_FILE.read_bytes()
        lines = data.splitlines(keepends=True)
        if not any(_ours(ln, names) for ln in lines):
            return False
        last_ours = max(i for i, ln in enumerate(lines) if _ours(ln, names))
        kept = b"".join(ln for ln in lines if not _ours(ln, names))
        if added_newline and last_ours == len(lines) - 1 and kept.endswith(b"\n"):
            kept = kept[:-1]  # our lines were last: the user's last line gets its missing newline back
        _replace_hosts(kept)
    return True


@contextlib.contextmanager
def _hosts_locked():
    """An flock beside /etc/hosts, so two clusters (or up and down) never edit it at once."""
    fd = os.open(f"{HOSTS_FILE}.cxr-lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _replace_hosts(data: bytes) -> None:
    """Write a temporary file beside /etc/hosts and rename it over: a crash never leaves it half
    written. When /etc/hosts is a bind mount (containers), rename cannot replace it: then it is
    rewritten in place, in one write, under the same lock."""
    st = HOSTS_FILE.stat()
    tmp = HOSTS_FILE.with_name(f".hosts.cxr-{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, st.st_mode & 0o777)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chown(tmp, st.st_uid, st.st_gid)
        try:
            os.replace(tmp, HOSTS_FILE)
            return
        except OSError:  # EBUSY/EXDEV: a bind-mounted file
            pass
        with open(HOSTS_FILE, "r+b") as f:
            f.write(data)
            f.truncate()
            f.flush()
            os.fsync(f.fileno())
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def _write_client_files(state: State, python: str) -> None:
    folder = Path(state.dir)
    state.track("known_hosts", "ssh_config", "cluster.yaml")
    host_pub = (folder / "host_ed25519.pub").read_text().split()
    create_file(folder / "known_hosts", "".join(
        f"{n.name},{n.addr} {host_pub[0]} {host_pub[1]}\n" for n in state.nodes).encode(), 0o644)
    blocks = []
    for n in state.nodes:
        blocks.append("\n".join([
            f"Host {n.name} {n.addr}", f"  HostName {n.addr}", "  User root",
            f"  IdentityFile {folder / 'id_ed25519'}", "  IdentitiesOnly yes",
            f"  UserKnownHostsFile {folder / 'known_hosts'}", "  StrictHostKeyChecking yes",
            "  BatchMode yes", "  ConnectTimeout 5", "  LogLevel ERROR", ""]))
    create_file(folder / "ssh_config", "\n".join(blocks).encode(), 0o644)
    cluster = {
        "hosts": [f"{n.name}:{state.slots}" for n in state.nodes],
        "network_interface": "eth0",
        "ssh_config": str(folder / "ssh_config"),
        "python": python,
        "check_hosts": True,
    }
    create_file(folder / "cluster.yaml", ("# Written by `python -m launch vcluster up`; removed by `down`.\n"
                                          + yaml.safe_dump(cluster, sort_keys=False)).encode(), 0o644)


# --------------------------------------------------------------------------- using it

def node_command(state: State, node: str, argv: list[str]) -> list[str]:
    """``argv`` to run inside ``node`` (its network and UTS namespaces) from the root namespace."""
    n = next((x for x in state.nodes if x.name == node), None)
    if n is None:
        raise LaunchError(f"no node {node} in the virtual cluster ({', '.join(x.name for x in state.nodes)})")
    return ["nsenter", "-t", str(n.sshd_pid), "--net", "--uts", "--"] + list(argv)


def node_processes(state: State, node: str) -> dict[int, str]:
    """pid -> command line of every process in ``node``'s network namespace but its sshd."""
    n = next(x for x in state.nodes if x.name == node)
    out = {}
    for pid in netns_pids(n.netns):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if pid != n.sshd_pid:
            out[pid] = cmd
    return out


def set_link(state: State, node: str, up: bool) -> None:
    """Cut ``node`` off the cluster network (its eth0 down), or connect it again."""
    _run(node_command(state, node, ["ip", "link", "set", "eth0", "up" if up else "down"]))


def ssh_command(state: State, node: str, command: str) -> list[str]:
    """ssh into ``node`` with the cluster's own client file."""
    return ["ssh", "-F", str(Path(state.dir) / "ssh_config"), "--", node, command]


# --------------------------------------------------------------------------- down

def down(folder: Path | None = None, cluster_id: int | None = None, quiet: bool = False, log=print) -> list[str]:
    """Remove everything of the cluster in ``folder`` and any leftover named as cluster ``cluster_id``
    (by default the id recorded in the folder's state, else 0)."""
    folder = _abs(folder or default_dir(cluster_id or 0))
    dir_fd = open_own_dir(folder)  # from here on every deletion goes through this descriptor
    try:
        return _down(folder, dir_fd, cluster_id, quiet, log)
    finally:
        if dir_fd is not None:
            os.close(dir_fd)


def _down(folder: Path, dir_fd: int | None, cluster_id: int | None, quiet: bool, log) -> list[str]:
    state = State.load(folder, dir_fd) if dir_fd is not None else None
    names = Names(cluster_id if cluster_id is not None else (state.id if state else 0))
    removed: list[str] = []
    pids = [n.sshd_pid for n in state.nodes if n.sshd_pid] if state else []
    for pid in pids:
        if _is_our_sshd(pid, folder):
            stop_process(pid)
            removed.append(f"sshd {pid}")
    for ns in _our_netns(names):
        for pid in netns_pids(ns):  # ranks, orted, ssh sessions left in the node
            stop_process(pid)
            removed.append(f"pid {pid} in {ns}")
        _run(["ip", "netns", "del", ns], check=False)
        removed.append(f"netns {ns}")
    for link in _our_links(names):
        _run(["ip", "link", "del", link], check=False)
        removed.append(f"link {link}")
    if HOSTS_FILE.is_file() and _hosts_remove(names, bool(state and state.hosts_newline)):
        removed.append("/etc/hosts entries")
    if state is not None:  # only the files its state lists, then the folder if that left it empty
        n, gone = remove_listed(folder, dir_fd, state.files)
        removed.append(str(folder) if gone else f"{n} files of {folder} (other files kept there)")
    if removed and not quiet:
        log("virtual cluster down: removed " + ", ".join(removed))
    return removed


def _is_our_sshd(pid: int, folder: Path) -> bool:
    try:
        cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return bool(cmd) and cmd[0].endswith(b"sshd") and any(str(folder).encode() in c for c in cmd)


def stop_process(pid: int, grace: float = 0.0) -> None:
    """End ``pid`` and wait until it is gone (reaped when it is our child, or a zombie): SIGTERM and
    ``grace`` seconds to exit first when ``grace`` > 0, then SIGKILL."""
    steps = ((signal.SIGTERM, grace),) if grace > 0 else ()
    for sig, wait in steps + ((signal.SIGKILL, 5.0),):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return
            except ChildProcessError:
                pass
            if not Path(f"/proc/{pid}").exists() or _zombie(pid):
                return
            time.sleep(0.05)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _our_netns(names: Names) -> list[str]:
    r = _run(["ip", "netns", "list"], check=False)
    return [ln.split()[0] for ln in r.stdout.splitlines() if ln.split() and ln.split()[0].startswith(names.ns_prefix)]


def netns_pids(ns: str) -> list[int]:
    r = _run(["ip", "netns", "pids", ns], check=False)
    return [int(p) for p in r.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _our_links(names: Names) -> list[str]:
    r = _run(["ip", "-o", "link", "show"], check=False)
    links = [ln.split(":")[1].strip().split("@")[0] for ln in r.stdout.splitlines() if ln.count(":") >= 2]
    vp = names.veth_prefix
    return [n for n in links if n == names.bridge or (n.startswith(vp) and n[len(vp):].isdigit())]


def leftovers(cluster_id: int = 0, folder: Path | None = None) -> list[str]:
    """What of virtual cluster ``cluster_id`` exists now (empty after a clean ``down``); sshd
    processes are found by the cluster folder in their command line."""
    names = Names(cluster_id)
    folder = _abs(folder or default_dir(cluster_id))
    out = [f"netns {n}" for n in _our_netns(names)] + [f"link {n}" for n in _our_links(names)]
    if HOSTS_FILE.is_file() and any(_ours(ln, names) for ln in HOSTS_FILE.read_bytes().splitlines()):
        out.append("/etc/hosts entries")
    if folder.exists():
        out.append(str(folder))
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                cmd = (p / "cmdline").read_bytes()
            except OSError:
                continue
            if b"sshd" in cmd and str(folder).encode() in cmd:
                out.append(f"sshd {p.name}")
    return out


# --------------------------------------------------------------------------- command line

def add_verbs(p) -> None:
    verbs = p.add_subparsers(dest="verb", required=True)
    u = verbs.add_parser("up", help="make N nodes with sshd and write a cluster file")
    u.add_argument("--nodes", type=int, default=2)
    u.add_argument("--slots", type=int, default=1, help="ranks each node may run")
    u.add_argument("--python", default="", help="interpreter for the ranks (default: this one)")
    d = verbs.add_parser("down", help="remove the cluster and everything it made")
    s = verbs.add_parser("status", help="list the nodes, or what a crashed cluster left")
    for v in (u, d, s):
        v.add_argument("--id", type=int, default=0, help=f"which cluster, 0-{MAX_ID} (its own /26 of 198.18.0.0/24)")
        v.add_argument("--dir", type=Path, default=None,
                       help="its folder, created by up (mode 0700; an existing path is refused; "
                            "default /run/cxr-vcluster-ID)")


def main(args) -> int:
    folder = _abs(args.dir or default_dir(args.id))
    if args.verb == "up":
        up(args.nodes, args.slots, folder, args.python, args.id)
    elif args.verb == "down":
        if not down(folder, args.id):
            print("virtual cluster down: nothing to remove")
    else:
        state = State.load(folder)
        for n in state.nodes if state else ():
            print(f"{n.name} {n.addr} netns {n.netns} sshd pid {n.sshd_pid}")
        if not state:
            rest = leftovers(args.id, folder)
            print(f"no virtual cluster {args.id} in {folder}; leftovers: " + (", ".join(rest) or "none"))
    return 0


def cli(argv: list[str] | None = None, prog: str = "python -m launch vcluster") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    add_verbs(parser)
    try:
        return main(parser.parse_args(argv))
    except LaunchError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli(prog="python -m launch.vcluster"))
