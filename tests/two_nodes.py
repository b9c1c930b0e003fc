"""Two "nodes" on one machine, for multi-node tests and benchmarks (issue 14).

Each node is a network namespace (the two joined by a veth pair, 10.77.0.1 and 10.77.0.2), and
each command runs there in its own UTS namespace (hostname node0 / node1) and mount namespace
(an /etc/hosts naming both nodes bind-mounted over the real one). So torchrun's c10d
rendezvous, gloo (which finds its address from the hostname) and zero_ext's shared-memory
transport (which compares socket.gethostname() across ranks) all see two hosts. The link can
be capped with tc's tbf (this kernel has tbf and htb, not netem). Needs root, `ip` and
`unshare`; `available()` says why not, and tests skip with that reason.

    from two_nodes import TwoNodes
    with TwoNodes(rate="200mbit") as nodes:
        results = nodes.run(["torchrun --nnodes=2 ... --node_rank=0 ...", "..."], timeout=60)

    python tests/two_nodes.py --timeout 60 -- 'hostname; ping -c1 10.77.0.1'   # both nodes

Every command gets NODE_RANK, NODE0_ADDR and NODE_ADDR in its environment. Namespaces, the veth
pair and every process in the namespaces are removed on exit, also on errors, timeouts and
KeyboardInterrupt.
"""

import argparse
import contextlib
import dataclasses
import functools
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Self

SUBNET = "10.77.0"
# Runs inside `unshare --uts --mount` in a node's netns: the node's name, its /etc/hosts,
# then the command (exec, so a kill of the shell's process group reaches it).
_NODE_SHELL = ('hostname "$ZX_HOSTNAME" && mount --bind "$ZX_HOSTS" /etc/hosts && '
               'exec sh -c "$ZX_COMMAND"')


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when two nodes can be made here, else (False, why not)."""
    if os.geteuid() != 0:
        return False, "two nodes need network namespaces, which need root"
    for tool in ("ip", "unshare", "mount", "hostname"):
        if shutil.which(tool) is None:
            return False, f"two nodes need `{tool}`, which is not on PATH"
    name = f"zx2n-probe-{secrets.token_hex(3)}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return False, f"cannot create a network namespace: {made.stderr.strip()}"
        probe = subprocess.run(["ip", "netns", "exec", name, "unshare", "--uts", "--mount",
                                "hostname", "zx2n-probe"], capture_output=True, text=True,
                               timeout=30, check=False)
        if probe.returncode != 0:
            return False, f"cannot create UTS/mount namespaces: {probe.stderr.strip()}"
    except (OSError, subprocess.SubprocessError) as error:
        return False, f"cannot create namespaces: {error}"
    finally:
        _ip("netns", "del", name, check=False)
    return True, ""


# tc's rate units (bits per second); "bps" would be bytes, which nothing here uses.
_RATE_UNITS = {"bit": 1, "kbit": 10**3, "mbit": 10**6, "gbit": 10**9}
_HZ = 250  # this kernel's CONFIG_HZ, for tc-tbf(8)'s rule below


def tbf_burst(rate: str) -> str:
    """The tbf bucket for `rate`: the larger of tc-tbf(8)'s minimum, rate / HZ bytes (the
    tokens of one timer tick), and 128 KiB. The floor keeps a whole 64 KiB TCP segmentation
    packet (plus headers) within the bucket: tbf segments a larger one in software, on the
    cores the ranks compute on. With the former fixed 64 KiB bucket at 1 Gbit/s (below both),
    that segmentation and the per-packet work after it cost each rank 0.2-0.4 CPU s per step of
    bench_compression's GPT (the veth's counters saw 4.5% more bytes: a header per 1500-byte
    packet instead of per 64 KiB one), and a stage-3 bf16 step took 0.88 s against 0.70 s
    (benchmarks/RESULTS.md, "the link's emulation"): the emulator, not the link, held the step
    back."""
    number = rate.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = rate[len(number):]
    if unit not in _RATE_UNITS or not number:
        raise ValueError(f"two_nodes: rate {rate!r} is not a number with one of the units "
                         f"{', '.join(_RATE_UNITS)} (tc's syntax, e.g. 300mbit)")
    tick = float(number) * _RATE_UNITS[unit] / 8 / _HZ
    return f"{max(128 << 10, math.ceil(tick))}b"


@dataclasses.dataclass
class NodeResult:
    node: int          # node rank, 0 or 1
    returncode: int    # the command's exit status; negative: killed by that signal
    stdout: str
    stderr: str
    timed_out: bool    # killed because the run's timeout passed
    seconds: float | None = None  # when it ended, from the start; None: killed at the end


class TwoNodes:
    """A context manager: two namespaced nodes while inside, nothing left after."""

    def __init__(self, rate: str | None = None, burst: str | None = None,
                 latency: str = "100ms"):
        """rate (tc syntax, e.g. "200mbit"): cap each direction of the link with tbf; burst
        (tc syntax) None: tbf_burst(rate)."""
        self.suffix = secrets.token_hex(3)
        self.namespaces = [f"zx2n-{self.suffix}-{k}" for k in range(2)]
        self.veths = [f"zx{self.suffix}n{k}" for k in range(2)]  # at most 15 characters
        self.addresses = [f"{SUBNET}.{k + 1}" for k in range(2)]
        self.hostnames = [f"node{k}" for k in range(2)]
        self.rate, self.latency = rate, latency
        self.burst = burst or (tbf_burst(rate) if rate else None)
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.hosts_file = ""

    def __enter__(self) -> Self:
        ok, why = available()
        if not ok:
            raise RuntimeError(f"two_nodes: {why}")
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _create(self) -> None:
        self._tmp = tempfile.TemporaryDirectory(prefix="zx2n-")
        self.hosts_file = os.path.join(self._tmp.name, "hosts")
        with open(self.hosts_file, "w", encoding="utf-8") as f:
            f.write("127.0.0.1 localhost\n::1 localhost\n")
            f.writelines(f"{address} {hostname}\n"
                         for address, hostname in zip(self.addresses, self.hostnames))
        for ns in self.namespaces:
            _ip("netns", "add", ns)
        _ip("link", "add", self.veths[0], "netns", self.namespaces[0], "type", "veth",
            "peer", "name", self.veths[1], "netns", self.namespaces[1])
        for ns, veth, address in zip(self.namespaces, self.veths, self.addresses):
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", veth)
            _ip("-n", ns, "link", "set", veth, "up")
            if self.rate:
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", veth,
                                "root", "tbf", "rate", self.rate, "burst", self.burst,
                                "latency", self.latency],
                               capture_output=True, text=True, check=True, timeout=30)

    def start(self, commands: list[str], env: dict[str, str] | None = None,
              cwd: str | None = None) -> "Running":
        """Starts commands[k] (a shell command line) on node k, all at once, and returns at
        once: the handle waits, kills or freezes a node, and collects the output."""
        assert len(commands) == 2, "one command per node"
        return Running(self, commands, env, cwd)

    def run(self, commands: list[str], timeout: float, env: dict[str, str] | None = None,
            cwd: str | None = None) -> list[NodeResult]:
        """Runs commands[k] on node k, all at once; waits for all, up to timeout seconds in
        total, then kills what is left. Returns one result per node."""
        with self.start(commands, env, cwd) as running:
            return running.wait(timeout)

    def _tc_root(self, *qdisc: str) -> None:
        for ns, veth in zip(self.namespaces, self.veths):
            subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "replace", "dev", veth,
                            "root", *qdisc], capture_output=True, text=True, check=True,
                           timeout=30)

    def partition(self) -> None:
        """Cuts the link both ways without a reset: every packet is dropped (a tbf of 8 bit/s
        whose 1-byte bucket no packet fits), so sockets stay open and nothing reaches the other
        node, as when a switch port or cable dies."""
        self._tc_root("tbf", "rate", "8bit", "burst", "1", "limit", "1")

    def heal(self) -> None:
        """Undoes partition(): the link as it was made (capped or not)."""
        if self.rate:
            self._tc_root("tbf", "rate", self.rate, "burst", self.burst, "latency", self.latency)
        else:
            for ns, veth in zip(self.namespaces, self.veths):
                subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "del", "dev", veth,
                                "root"], capture_output=True, text=True, check=False, timeout=30)

    def signal_node(self, node: int, sig: int, where=None) -> int:
        """Sends sig to every process on node `node` (all of its namespace), or to those whose
        argument list `where(argv)` accepts; returns how many. SIGKILL: the node dies (its
        kernel closes the sockets); SIGSTOP/SIGCONT: it freezes and thaws (sockets open,
        nothing answers)."""
        count = 0
        for pid in _ip("netns", "pids", self.namespaces[node], check=False).stdout.split():
            try:
                if where is not None:
                    with open(f"/proc/{int(pid)}/cmdline", "rb") as f:
                        if not where(f.read().decode(errors="replace").split("\0")):
                            continue
                os.kill(int(pid), sig)
                count += 1
            except (ProcessLookupError, FileNotFoundError, ValueError):
                pass
        return count

    def _kill_all(self, procs: list[subprocess.Popen]) -> None:
        # The process groups first, then anything still inside a namespace (a worker that
        # started its own session escapes the group but not the netns).
        for proc in procs:
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for ns in self.namespaces:
            self._kill_namespace(ns)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass

    @staticmethod
    def _kill_namespace(ns: str) -> None:
        pids = _ip("netns", "pids", ns, check=False).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def close(self) -> None:
        """Kills every process in the namespaces and removes them, the veth pair and the temp
        files. Safe to call twice, and after a partial setup."""
        for ns in self.namespaces:
            self._kill_namespace(ns)
        deadline = time.monotonic() + 10
        for ns in self.namespaces:
            while (_ip("netns", "pids", ns, check=False).stdout.strip()
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
        for veth in self.veths:  # only left in the root namespace by a failed setup
            _ip("link", "del", veth, check=False)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


class Running:
    """Commands started on both nodes (TwoNodes.start). A context manager: on exit, whatever
    still runs is killed."""

    def __init__(self, nodes: TwoNodes, commands: list[str], env: dict[str, str] | None,
                 cwd: str | None):
        self.nodes = nodes
        self._logs = contextlib.ExitStack()
        self._outputs = [(self._log_file(), self._log_file()) for _ in commands]
        self.procs: list[subprocess.Popen] = []
        self.started = time.monotonic()
        try:
            for k, (command, (out, err)) in enumerate(zip(commands, self._outputs)):
                node_env = dict(os.environ if env is None else env)
                node_env.update(ZX_HOSTNAME=nodes.hostnames[k], ZX_HOSTS=nodes.hosts_file,
                                ZX_COMMAND=command, NODE_RANK=str(k),
                                NODE0_ADDR=nodes.addresses[0], NODE_ADDR=nodes.addresses[k])
                self.procs.append(subprocess.Popen(
                    ["ip", "netns", "exec", nodes.namespaces[k], "unshare", "--uts",
                     "--mount", "sh", "-c", _NODE_SHELL], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, env=node_env, cwd=cwd, start_new_session=True))
        except BaseException:
            self.close()
            raise
        self.ended: list[float | None] = [None] * len(self.procs)

    def _log_file(self):
        return self._logs.enter_context(tempfile.TemporaryFile("w+", dir=self.nodes._tmp.name))

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _poll(self) -> None:
        for k, proc in enumerate(self.procs):
            if self.ended[k] is None and proc.poll() is not None:
                self.ended[k] = time.monotonic() - self.started

    def output(self, node: int) -> str:
        """What node `node` printed so far (stdout then stderr). Read with pread: the files'
        offset is shared with the writing processes and must not move."""
        def read(f) -> str:
            size = os.fstat(f.fileno()).st_size
            return os.pread(f.fileno(), size, 0).decode(errors="replace")
        return "".join(read(f) for f in self._outputs[node])

    def wait_for(self, pattern: str, node: int, timeout: float) -> bool:
        """Waits until node `node`'s output contains `pattern` (a substring); False on timeout
        or when the node's command ended without printing it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pattern in self.output(node):
                return True
            self._poll()
            if self.ended[node] is not None:
                return pattern in self.output(node)
            time.sleep(0.1)
        return False

    def wait(self, timeout: float) -> list[NodeResult]:
        """Waits for both commands, up to timeout seconds from now, kills what is left, and
        returns one result per node (`seconds`: when it ended, counted from the start)."""
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in self.procs) and time.monotonic() < deadline:
            self._poll()
            time.sleep(0.1)
        self._poll()
        timed_out = [p.poll() is None for p in self.procs]
        self.nodes._kill_all(self.procs)
        results = []
        for k, (proc, (out, err)) in enumerate(zip(self.procs, self._outputs)):
            out.seek(0)
            err.seek(0)
            results.append(NodeResult(k, proc.returncode, out.read(), err.read(), timed_out[k],
                                      self.ended[k]))
        self._logs.close()
        return results

    def close(self) -> None:
        self.nodes._kill_all(self.procs)
        self._logs.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", help="cap the link with tbf at this rate, e.g. 200mbit")
    parser.add_argument("--burst", help="tbf burst (with --rate; default: tbf_burst(rate))")
    parser.add_argument("--latency", default="100ms", help="tbf latency (with --rate)")
    parser.add_argument("--timeout", type=float, default=60, help="seconds for both commands")
    parser.add_argument("--node1", help="node 1's command (default: the same as node 0's)")
    parser.add_argument("command", nargs=argparse.REMAINDER,
                        help="shell command for node 0 (and node 1), after --")
    args = parser.parse_args()
    command = " ".join(args.command[1:] if args.command[:1] == ["--"] else args.command)
    if not command:
        parser.error("no command given")
    ok, why = available()
    if not ok:
        print(f"two_nodes: {why}", file=sys.stderr)
        return 2
    with TwoNodes(rate=args.rate, burst=args.burst, latency=args.latency) as nodes:
        results = nodes.run([command, args.node1 or command], timeout=args.timeout)
    for r in results:
        state = "timed out" if r.timed_out else f"exit {r.returncode}"
        print(f"--- node{r.node} ({state}) ---\n{r.stdout}{r.stderr}", end="")
    return max(abs(r.returncode or 0) for r in results) or (1 if any(r.timed_out for r in
                                                                     results) else 0)


if __name__ == "__main__":
    sys.exit(main())
