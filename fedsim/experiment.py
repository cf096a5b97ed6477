"""The experiment config as it travels inside Flower, and the seeds derived from it.

Inside a run, the whole resolved config rides as TOML: in ``run_config["fedsim-config"]``
for fedsim's own runtimes, and in the discovery message the ServerApp sends every node
(which keeps it in its state). Flower run configs only hold scalars, and one key keeps the
ServerApp and every ClientApp in agreement on every field.

`flwr run` users speak Flower's flat run config instead (``--run-config
"num-server-rounds=5 noise-multiplier=0.8"``, as in `flwr new` apps). `FLAT_KEYS` maps
each flat key onto one fedsim key; `experiment_from_run_config` applies them to the
experiment (``configs/quickstart.toml`` unless ``config-path`` or ``fedsim-config`` names
another) and takes the number of clients from the federation when nobody gave one.
"""

from __future__ import annotations

import tomllib
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Context

from fedsim.caches import cached
from fedsim.config import (Config, builtin_configs, config_from_dict, describe_fields, dumps_toml, loads_toml,
                           set_dotted)
from fedsim.errors import ConfigError
from fedsim.records import CLIENT_STATE, CONFIG_PATH_KEY, DISCOVERY_WINDOW_KEY, RUN_CONFIG_KEY, plain

DEFAULT_EXPERIMENT = "quickstart"

# Flat run-config key -> the fedsim config key it sets. The names follow Flower's `flwr new`
# templates where one exists (num-server-rounds, fraction-train, local-epochs, lr, batch-size).
# Every key is declared in [tool.flwr.app.config] with the value "" (= the experiment's value):
# Flower refuses an override of an undeclared key before the run starts.
FLAT_KEYS: dict[str, str] = {
    "num-server-rounds": "federation.rounds",
    "num-clients": "federation.num_clients",
    "clients-per-round": "federation.clients_per_round",
    "fraction-train": "federation.clients_per_round",
    "local-epochs": "client.local_epochs",
    "local-steps": "client.local_steps",
    "batch-size": "client.batch_size",
    "lr": "client.lr",
    "momentum": "client.momentum",
    "noise-multiplier": "privacy.noise_multiplier",
    "max-grad-norm": "privacy.max_grad_norm",
    "target-epsilon": "privacy.target_epsilon",
    "delta": "privacy.delta",
    "accountant": "privacy.accountant",
    "seed": "seed",
    "strategy": "strategy.name",
    "dataset": "data.dataset",
    "partitioner": "data.partitioner",
    "alpha": "data.alpha",
    "model": "model.name",
    "name": "name",
    "on-client-error": "runtime.on_client_error",
    "round-timeout": "runtime.round_timeout",
    "output-dir": "output.dir",
}
# What a flat key means where it is more than its fedsim key's own help text.
FLAT_NOTES: dict[str, str] = {
    "num-clients": "clients, one per SuperNode; default: the federation's SuperNode count",
    "fraction-train": "share of clients trained per round: clients per round = max(1, floor(fraction x clients))",
    "output-dir": "run directory, relative to the output root (no absolute path outside it, no '..'); "
                  "default: <name>-<timestamp>",
}
EXPERIMENT_KEYS = (CONFIG_PATH_KEY, RUN_CONFIG_KEY)  # the experiment itself: a file, or its TOML text
RUNTIME_KEYS = (DISCOVERY_WINDOW_KEY,)  # how the ServerApp runs it, not what it runs (fedsim.deploy sets it)


def default_experiment_text() -> str:
    """The experiment `flwr run` runs when the run config names none: the shipped
    ``quickstart`` (`fedsim.config.builtin_configs`)."""
    path = builtin_configs().get(DEFAULT_EXPERIMENT, Path(DEFAULT_EXPERIMENT))
    if not path.is_file():
        raise ConfigError(f"run config: the default experiment {path} is missing; "
                          f"give one with --run-config \"{CONFIG_PATH_KEY}='my.toml'\"")
    return path.read_text()


def run_config_keys() -> list[str]:
    """Every key `[tool.flwr.app.config]` declares: the experiment keys, the runtime keys, then
    the flat keys."""
    return [*EXPERIMENT_KEYS, *RUNTIME_KEYS, *FLAT_KEYS]


def _given(run_config: Mapping[str, Any]) -> dict[str, Any]:
    """The flat keys the run config sets ("" means not set); an unknown key is refused."""
    unknown = sorted(set(run_config) - set(run_config_keys()))
    if unknown:
        raise ConfigError(f"run config: unknown key {unknown[0]!r}; allowed: {', '.join(run_config_keys())}")
    given = {k: v for k, v in run_config.items() if k in FLAT_KEYS and v != ""}
    if "fraction-train" in given and "clients-per-round" in given:
        raise ConfigError("run config: give clients-per-round or fraction-train, not both")
    fraction = given.get("fraction-train")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not 0 < fraction <= 1):
        raise ConfigError(f"run config fraction-train: must be a number > 0 and <= 1 (got {fraction!r})")
    return given


def _experiment(run_config: Mapping[str, Any]) -> tuple[dict, bool]:
    """The experiment as nested TOML values, and whether the run config named it (rather
    than falling back to the default experiment)."""
    text, path = run_config.get(RUN_CONFIG_KEY, ""), run_config.get(CONFIG_PATH_KEY, "")
    if text and path:
        raise ConfigError(f"run config: give {CONFIG_PATH_KEY} or {RUN_CONFIG_KEY}, not both")
    where = f"run config {RUN_CONFIG_KEY}"
    if path:
        file = Path(str(path))
        if not file.is_file():
            raise ConfigError(f"run config: {CONFIG_PATH_KEY} {file} is not a file")
        text, where = file.read_text(), str(file)
    try:
        raw = tomllib.loads(str(text) if text else default_experiment_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config: {where} is not valid TOML: {exc}") from None
    raw.pop("sweep", None)  # read by `fedsim sweep`, not part of one run
    return raw, bool(text)


def requested_num_clients(run_config: Mapping[str, Any]) -> int | None:
    """The number of clients the submitter asked for: ``num-clients``, or
    ``federation.num_clients`` of an experiment they named. None: take the federation's."""
    given = _given(run_config)
    if "num-clients" in given:
        value = given["num-clients"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"run config num-clients: must be an integer >= 1 (got {value!r})")
        return value
    raw, named = _experiment(run_config)
    value = raw.get("federation", {}).get("num_clients") if named else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def experiment_from_run_config(run_config: Mapping[str, Any], num_nodes: int | None = None) -> Config:
    """The experiment of a `flwr run`: the named (or default) experiment with the flat keys
    applied, validated.

    `num_nodes` (the federation's SuperNode count) becomes ``federation.num_clients`` unless
    the submitter gave a number (the caller checks that the two agree). When the number of
    clients changes and neither ``clients-per-round`` nor ``fraction-train`` is given, the
    experiment's share of clients per round is kept.
    """
    given = _given(run_config)
    raw, _ = _experiment(run_config)
    fed = raw.setdefault("federation", {})
    if not isinstance(fed, dict):
        raise ConfigError(f"federation: expected a [federation] table, got {fed!r}")
    defaults = Config().federation
    old_n, old_k = fed.get("num_clients", defaults.num_clients), fed.get("clients_per_round",
                                                                        defaults.clients_per_round)
    for flat, value in given.items():
        if flat != "fraction-train":
            set_dotted(raw, FLAT_KEYS[flat], value)
    if num_nodes is not None and requested_num_clients(run_config) is None:
        fed["num_clients"] = num_nodes
    n = fed.get("num_clients", defaults.num_clients)
    if "fraction-train" in given and isinstance(n, int):
        fed["clients_per_round"] = _share(given["fraction-train"], n)
    elif ("clients-per-round" not in given and n != old_n and isinstance(n, int)
          and isinstance(old_n, int) and isinstance(old_k, int) and old_n > 0):
        fed["clients_per_round"] = _share(old_k / old_n, n)
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise _name_flat_key(exc, given) from None


def _share(fraction: float, n: int) -> int:
    """Clients per round for a share of `n` clients: floor, as Flower's `sample_nodes`, at least 1
    (the epsilon absorbs float error, e.g. 0.29 * 100 = 28.999...)."""
    return max(1, min(n, int(fraction * n + 1e-9)))


def _name_flat_key(exc: ConfigError, given: Mapping[str, Any]) -> ConfigError:
    """A validation error on a key the run config set names the flat key too."""
    text = str(exc)
    for flat in given:
        if text.startswith(FLAT_KEYS[flat] + ":"):
            return ConfigError(f"run config {flat} -> {text}")
    return exc


def flat_key_table() -> str:
    """The flat run-config keys as a Markdown table (docs/deployment.md; a test keeps them equal)."""
    helps = {key: text for key, _, _, text in describe_fields()}

    def cell(text: str) -> str:  # a "|" would end the cell, a "<name>" would read as HTML
        return text.replace("|", "\\|").replace("<", "&lt;")

    lines = ["| run-config key | fedsim key | meaning |", "|---|---|---|"]
    lines += [f"| `{flat}` | `{key}` | {cell(FLAT_NOTES.get(flat, helps[key]))} |" for flat, key in FLAT_KEYS.items()]
    return "\n".join(lines)


@cached(maxsize=16)  # every client-round reads the experiment from the same TOML text
def _parse(text: str) -> Config:
    return loads_toml(text)


def config_from_context(context: Context, fallback: str | None = None) -> Config:
    """The experiment of this run, parsed from `experiment_text` (once per text)."""
    return _parse(experiment_text(context, fallback))


def experiment_text(context: Context, fallback: str | None = None) -> str:
    """The experiment's TOML, from the first place that has it:

    1. the node's state, where a ClientApp keeps the TOML the server sent at discovery: the
       server's resolved experiment wins over anything in the run config, so a SuperNode
       needs nothing but its node config and trains what the server runs;
    2. ``run_config["fedsim-config"]``: the TOML itself (the server side of fedsim's runtimes,
       and of `flwr run` once `fedsim.serverapp` has resolved the experiment);
    3. `fallback`: Flower's `run_simulation` delivers no run config (its Context is read-only).

    The text is the whole experiment, so the client caches key on it (`fedsim.clients.app`).
    """
    stored = plain(context.state).get(CLIENT_STATE)  # read per client-round: no record views rebuilt
    if not isinstance(stored, ConfigRecord):
        stored = None
    text = (stored.get(RUN_CONFIG_KEY) if stored is not None else None) \
        or context.run_config.get(RUN_CONFIG_KEY) or fallback
    if not isinstance(text, str) or not text:
        raise ConfigError(f"run config: key {RUN_CONFIG_KEY!r} with the experiment TOML is missing")
    return text


def run_config_for(cfg: Config) -> dict[str, str]:
    return {RUN_CONFIG_KEY: dumps_toml(cfg)}


def derive_seed(*parts: int | str) -> int:
    """A stable 31-bit seed from (experiment seed, round, partition, purpose...).

    Python's hash() is salted per process, so it would break Ray/deployment
    determinism; crc32 of the joined parts is stable everywhere.
    """
    return zlib.crc32("/".join(map(str, parts)).encode()) & 0x7FFFFFFF
