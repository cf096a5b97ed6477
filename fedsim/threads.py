"""How many threads torch uses in a run: ``runtime.torch_threads``, and its automatic rule.

torch starts with one intra-op thread per core. On small tensors (fedsim's MLPs, a DP-SGD
batch of 8 to 64 rows) the threads cost more to wake and join than they save, and on a
machine whose cores other processes also use they wait on each other: docs/engines.md
("Threads") has the measurements behind the rule here.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

from fedsim.algorithms import resolve_device

AUTO_MAX_THREADS = 1  # the rule's cap on a CPU: see docs/engines.md, "Threads"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask: a container's or taskset's
    limit), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_threads(cores: int | None = None, *, cuda: bool = False) -> int:
    """``runtime.torch_threads = 0`` (auto): one thread a process on a CPU, where more were
    slower on every fedsim workload measured (docs/engines.md); on a GPU the host threads only
    feed the device, and up to 4 of the process' cores are used for data and Opacus' hooks."""
    cores = available_cores() if cores is None else max(1, int(cores))
    return min(cores, 4) if cuda else min(cores, AUTO_MAX_THREADS)


def run_threads(runtime: Any) -> int:
    """torch threads for this process' training (``runtime`` is a config's ``[runtime]``):
    ``runtime.torch_threads``, else the auto rule over the cores this process may use, no
    more than the threads torch has now (a sweep gives each of its processes its share that
    way). The driver of a run and every process that trains its clients (a SuperNode's
    ClientApp, a Ray worker) apply the same rule, so a deployed run reduces its sums with the
    thread count its simulation used, and gives the same bits."""
    import torch

    if runtime.torch_threads:
        return runtime.torch_threads
    cores = min(available_cores(), torch.get_num_threads())
    return auto_threads(cores, cuda=resolve_device(runtime.device).startswith("cuda"))


def apply_run_threads(runtime: Any) -> int:
    """Set torch to `run_threads` for the rest of this process (a ClientApp process trains
    for one experiment); a no-op where the run's driver already set it. Called for every
    train message, so the rule's answer is kept per (setting, device, torch's count now):
    the rule itself costs a few microseconds (the affinity mask, the device)."""
    import torch

    current = torch.get_num_threads()
    threads = _rule(int(runtime.torch_threads), str(runtime.device), current)
    if current != threads:
        torch.set_num_threads(threads)
    return threads


@functools.lru_cache(maxsize=64)
def _rule(torch_threads: int, device: str, current: int) -> int:
    """`run_threads` of a runtime with these values while torch runs `current` threads."""
    return run_threads(SimpleNamespace(torch_threads=torch_threads, device=device))


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """Run the block with torch at `threads` intra-op threads, and put back the count it
    found: a sweep's worker or a notebook that runs several experiments is left as it was."""
    import torch

    previous = torch.get_num_threads()
    if threads != previous:
        torch.set_num_threads(threads)
    try:
        yield threads
    finally:
        if torch.get_num_threads() != previous:
            torch.set_num_threads(previous)
