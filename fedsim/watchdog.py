"""Stops a local deployment's processes when the `fedsim` process that started them dies.

`fedsim deploy local` starts the SuperLink and each SuperNode in a session of its own, and
Flower starts more processes below them: a SuperExec per SuperNode and for the SuperLink
(the SuperLink's in yet another session), and a ServerApp or ClientApp process per task.
The kernel sends each *direct* child SIGTERM when `fedsim` dies (``PR_SET_PDEATHSIG``, set
in `fedsim.deploy`), but a ``kill -9`` of `fedsim` runs none of its cleanup, and Flower's
deeper processes only notice a dead parent by polling, if at all.

This watchdog closes that gap. `fedsim.deploy.ProcessGroup` starts it (in a session of its
own, so a signal to `fedsim`'s process group does not reach it) and writes ``+PID`` on its
stdin for every process group it starts. While stdin is open the watchdog notes, about once
a second, every process group below those (Flower's SuperExec sessions included). When stdin
closes, which happens however `fedsim` ends, it sends SIGTERM to every noted group that still
exists, waits up to ``GRACE_SECONDS``, and then sends SIGKILL.

It runs as a script (``python path/to/watchdog.py``), not as ``-m fedsim.watchdog``: it must
start in milliseconds and import nothing from fedsim (``import fedsim`` pulls in torch).
"""

from __future__ import annotations

import os
import select
import signal
import sys
import time

GRACE_SECONDS = 5.0
SCAN_SECONDS = 1.0
PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def die_with(parent: int, libc=None) -> None:
    """Called in a child: have the kernel send it SIGTERM when its parent (pid `parent`) dies,
    even by ``kill -9`` (Linux only; elsewhere nothing happens). The signal follows the
    *thread* that started the child, so start long-lived children from a thread that outlives
    them (fedsim starts them from its main thread)."""
    if not sys.platform.startswith("linux"):
        return
    (libc or _libc()).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)


def die_with_parent():
    """A subprocess ``preexec_fn`` doing `die_with` for this process (None off Linux). libc is
    loaded here, before the fork: between fork and exec the child only makes the call."""
    if not sys.platform.startswith("linux"):
        return None
    libc, parent = _libc(), os.getpid()
    return lambda: die_with(parent, libc)


def process_table() -> dict[int, list[tuple[int, int]]]:
    """parent pid -> [(pid, process group id)] for every process, from /proc (Linux).

    Elsewhere, or when /proc is unreadable, it is empty: only the groups `fedsim` named are
    then stopped."""
    children: dict[int, list[tuple[int, int]]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return children
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as fh:
                stat = fh.read()
        except OSError:  # exited while we looked
            continue
        # "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses
        fields = stat[stat.rindex(b")") + 2:].split()
        children.setdefault(int(fields[1]), []).append((int(entry), int(fields[2])))
    return children


def groups_below(roots: set[int]) -> set[int]:
    """Process groups of `roots` and of all their descendants."""
    table = process_table()
    groups, stack, seen = set(roots), list(roots), set(roots)
    while stack:
        for pid, pgid in table.get(stack.pop(), []):
            if pid not in seen:
                seen.add(pid)
                groups.add(pgid)
                stack.append(pid)
    return groups


def alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # not ours (any more): leave it alone
        return False
    return True


def signal_groups(groups: set[int], sig: int) -> None:
    for group in groups:
        try:
            os.killpg(group, sig)
        except (ProcessLookupError, PermissionError):
            pass


def main() -> None:
    # Ctrl-C in the terminal reaches fedsim's process group; fedsim then stops its children
    # itself and closes our stdin. The watchdog must outlive it either way.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    roots: set[int] = set()
    groups: set[int] = set()
    stdin = sys.stdin.fileno()
    buffer = b""
    while True:
        ready, _, _ = select.select([stdin], [], [], SCAN_SECONDS)
        if ready:
            chunk = os.read(stdin, 4096)
            if not chunk:  # the parent closed the pipe or died
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                if line.startswith(b"+"):
                    roots.add(int(line[1:]))
        groups |= groups_below({r for r in roots if alive(r)})
    groups |= groups_below({r for r in roots if alive(r)})
    groups = {g for g in groups if g != os.getpgrp() and alive(g)}
    signal_groups(groups, signal.SIGTERM)
    deadline = time.monotonic() + GRACE_SECONDS
    while groups and time.monotonic() < deadline:
        time.sleep(0.1)
        groups = {g for g in groups if alive(g)}
    signal_groups(groups, signal.SIGKILL)


if __name__ == "__main__":
    main()
