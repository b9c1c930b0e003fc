"""What this process has sent over TCP, per socket, read from the kernel: the payload bytes
(no TCP/IP headers, retransmissions left out) of each of its connected sockets, as `ss -tie`
reports them (tcp_info's bytes_sent and bytes_retrans). tests/comm_cases.py and
benchmarks/gloo_wire.py measure what gloo really sends with it, against comm's counters."""

from __future__ import annotations

import os
import re
import subprocess

# Each socket: "ESTAB ... <local> <peer> ino:<inode> ..." and its tcp_info on the next line.
_SOCKET = re.compile(r"^\S+\s+\d+\s+\d+\s+(\S+)\s+(\S+)\s.*?\bino:(\d+)\b(.*?)(?=^\S|\Z)",
                     re.MULTILINE | re.DOTALL)


def _own_inodes() -> set[int]:
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue  # closed since listed
        if target.startswith("socket:["):
            inodes.add(int(target[8:-1]))
    return inodes


def sent_by_socket() -> dict[tuple[str, str], int]:
    """(local address, peer address) -> bytes sent once, for this process's TCP sockets."""
    mine = _own_inodes()
    out = subprocess.run(["ss", "-tieH"], capture_output=True, text=True, check=True,
                         timeout=30).stdout
    sockets = {}
    for local, peer, inode, info in _SOCKET.findall(out):
        if int(inode) in mine:
            sent = re.search(r"\bbytes_sent:(\d+)", info)
            again = re.search(r"\bbytes_retrans:(\d+)", info)
            sockets[(local, peer)] = (int(sent.group(1)) if sent else 0) - (
                int(again.group(1)) if again else 0)
    return sockets


def sent_since(before: dict[tuple[str, str], int]) -> dict[tuple[str, str], int]:
    """What each socket sent since `before` (sent_by_socket's); a socket of `before` that ss
    did not list this time (it walks the table while it changes) is read again."""
    for _ in range(10):
        after = sent_by_socket()
        if set(before) <= set(after):
            break
    else:
        raise RuntimeError(f"tcp_bytes: sockets {sorted(set(before) - set(after))} vanished")
    return {key: nbytes - before.get(key, 0) for key, nbytes in after.items()}


def local_addresses() -> list[str]:
    """This process's connected TCP sockets' own addresses: published to the other ranks, they
    tell which rank is at the far end of each socket (by_rank)."""
    return [local for local, _ in sent_by_socket()]


def by_rank(sent: dict[tuple[str, str], int], addresses_of_ranks: list[list[str]]
            ) -> dict[int, int]:
    """`sent` (sent_by_socket's) summed by the rank at the far end (-1: no rank's socket)."""
    owner = {address: r for r, addresses in enumerate(addresses_of_ranks)
             for address in addresses}
    out: dict[int, int] = {}
    for (_, peer), nbytes in sent.items():
        out[owner.get(peer, -1)] = out.get(owner.get(peer, -1), 0) + nbytes
    return out
