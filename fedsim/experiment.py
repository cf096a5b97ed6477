"""The experiment config as it travels inside Flower, and the seeds derived from it.

Simulation and deployment read the experiment the same way: the whole resolved
config rides in ``run_config["fedsim-config"]`` as TOML. Flower run configs only
hold scalars, and one key keeps the ServerApp, every ClientApp and `flwr run`
in agreement on every field.
"""

from __future__ import annotations

import functools
import zlib

from flwr.app import Context

from fedsim.config import Config, dumps_toml, loads_toml
from fedsim.errors import ConfigError
from fedsim.records import RUN_CONFIG_KEY


@functools.lru_cache(maxsize=16)
def _parse(text: str) -> Config:
    return loads_toml(text)


def config_from_context(context: Context, fallback: str | None = None) -> Config:
    """The experiment of this run: from the run config, else `fallback` (Flower's
    `run_simulation` delivers no run config, and its Context is read-only)."""
    text = context.run_config.get(RUN_CONFIG_KEY) or fallback
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
