"""The Flower runtime (``runtime.name = "flower"``): Flower's own simulation engine (`flwr.simulation.run_simulation`).

Use it to compare against fedsim's in-process runtime, to give clients their own CPU/GPU
share (``runtime.num_cpus`` / ``runtime.num_gpus``), or to outgrow one machine: with
``RAY_ADDRESS`` set, `ray.init` joins that existing cluster.

`run_simulation` passes no run config to the apps (and its Context is read-only), so the
experiment TOML reaches them through the app closures here. It also swallows ServerApp exceptions, so the
first one is kept and re-raised once the simulation has shut down.
"""

from __future__ import annotations

import logging
import os

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.clients.app import make_client_app
from fedsim.config import Config
from fedsim.experiment import run_config_for
from fedsim.records import RUN_CONFIG_KEY
from fedsim.server import server_main

log = logging.getLogger("fedsim")


def run_flower(cfg: Config, *, progress: bool = True) -> None:
    from flwr.simulation import run_simulation  # imports Ray: only when this runtime is chosen

    config_text = run_config_for(cfg)[RUN_CONFIG_KEY]
    failure: list[BaseException] = []
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        try:
            server_main(grid, context, progress=progress, config_text=config_text)
        except BaseException as exc:  # noqa: BLE001 - re-raised after Ray shuts down
            failure.append(exc)

    backend_config = {"client_resources": {"num_cpus": cfg.runtime.num_cpus, "num_gpus": cfg.runtime.num_gpus},
                      "init_args": {"logging_level": logging.ERROR, "log_to_driver": False}}
    if os.environ.get("RAY_ADDRESS"):
        log.info("joining the Ray cluster at RAY_ADDRESS=%s", os.environ["RAY_ADDRESS"])
        backend_config["init_args"]["address"] = os.environ["RAY_ADDRESS"]
    else:  # a fresh local instance, never the cluster `ray start` last left on this machine
        backend_config["init_args"]["address"] = "local"
    # Flower's Ray backend hands the driver's sys.path to Ray's workers by writing it into this
    # process' PYTHONPATH, where every later subprocess of the caller (a notebook's, a sweep's)
    # would inherit it: the workers got it through Ray's runtime_env; here it is put back
    pythonpath = os.environ.get("PYTHONPATH")
    try:
        run_simulation(server_app=server, client_app=make_client_app(config_text),
                       num_supernodes=cfg.federation.num_clients, backend_config=backend_config,
                       verbose_logging=log.isEnabledFor(logging.DEBUG))
    finally:
        if pythonpath is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = pythonpath
    if failure:
        raise failure[0]
