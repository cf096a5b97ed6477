"""The start-up probe: when a run's first local training begins, for start-up benchmarks.

``FEDSIM_STARTUP_PROBE=1 fedsim run ...`` prints one line to stderr,
``fedsim-startup-probe monotonic=<seconds> cpu=<seconds>``, the moment the first round's first engine call
(the vectorized engine's batch, or one client under Opacus) is about to train, and ends the
process at once (exit code 0). Everything a run does before its first gradient step is
counted: the imports, the config, the dataset and partition, calibration, the model, the
strategy, discovery, and each client's preparation of its first round. The value is
``time.monotonic()``, a system-wide clock on Linux, so a benchmark that reads the same clock
before it starts the process has the whole start-up, interpreter start included
(benchmarks/startup.py); ``cpu`` is the process' CPU time so far (`time.process_time`), which
waiting for a busy machine's cores does not inflate. The probe fires in the process that
trains, so it is meant for the in-process runtime (the default): under Ray or Flower's
engine it would end a worker.

The run is abandoned, not finished: its directory is left as a dead run (summary.json says
"running" for a process that is gone). The probe is for benchmarks, in a scratch directory.
"""

from __future__ import annotations

import os
import sys
import time

PROBE_ENV = "FEDSIM_STARTUP_PROBE"


def startup_probe() -> None:
    """Print the probe line and exit, if ``FEDSIM_STARTUP_PROBE`` is set (to anything but "" or "0")."""
    if os.environ.get(PROBE_ENV, "") in ("", "0"):
        return
    now, cpu = time.monotonic(), time.process_time()
    sys.stderr.write(f"\nfedsim-startup-probe monotonic={now:.6f} cpu={cpu:.6f}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(0)  # no finally blocks, atexit hooks or summaries: the run is abandoned here
