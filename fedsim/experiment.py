"""The experiment config as it travels inside Flower, and the seeds derived from it.

Simulation and deployment read the experiment the same way: the whole resolved
config rides in ``run_config["fedsim-config"]`` as TOML. Flower run configs only
hold scalars, and one key keeps the ServerApp, every ClientApp and `flwr run`
in agreement on every field.
"""

from __future__ import annotations

import zlib

from flwr.app import Context

from fedsim.caches import cached
from fedsim.config import Config, dumps_toml, loads_toml
from fedsim.errors import ConfigError
from fedsim.records import CLIENT_STATE, CONFIG_PATH_KEY, RUN_CONFIG_KEY


@cached(maxsize=16)  # every client-round reads the experiment from the same TOML text
def _parse(text: str) -> Config:
    return loads_toml(text)


def config_from_context(context: Context, fallback: str | None = None) -> Config:
    """The experiment of this run, from the first place that has it:

    1. ``run_config["fedsim-config"]``: the TOML itself (in-process runtime);
    2. `fallback`: Flower's `run_simulation` delivers no run config (its Context is read-only);
    3. ``run_config["config-path"]``: a TOML file (`flwr run ... -c "config-path='x.toml'"`), read
       by the ServerApp of a deployment;
    4. the node's state, where the ClientApp keeps the TOML the server sent at discovery, so
       a SuperNode needs nothing but its node config.
    """
    text = context.run_config.get(RUN_CONFIG_KEY) or fallback
    if not text and context.run_config.get(CONFIG_PATH_KEY):
        from pathlib import Path

        path = Path(str(context.run_config[CONFIG_PATH_KEY]))
        if not path.is_file():
            raise ConfigError(f"run config: config-path {path} is not a file")
        text = path.read_text()
    if not text:
        stored = context.state.config_records.get(CLIENT_STATE)
        text = stored.get(RUN_CONFIG_KEY) if stored is not None else None
    if not isinstance(text, str):
        raise ConfigError(f"run config: key {RUN_CONFIG_KEY!r} with the experiment TOML is missing")
    return _parse(text)


def run_config_for(cfg: Config) -> dict[str, str]:
    return {RUN_CONFIG_KEY: dumps_toml(cfg)}


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from (experiment seed, round, partition, purpose...).

    Python's hash() is salted per process, so it would break Ray/deployment
    determinism; crc32 of the joined parts is stable everywhere.
    """
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
