"""Experiment configuration: one TOML file, validated on load.

Why a schema of plain dataclasses: every key has one type, one default, one
allowed range and one line of help, so bad input can be refused with a single
line that names the key and what is allowed, before any work starts. The same
schema drives ``--set section.key=value`` overrides and the resolved
``config.toml`` written into each run directory.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from collections.abc import Callable
from typing import Any, get_args, get_origin, get_type_hints

from fedsim.algorithms import algorithm_names, get_algorithm
from fedsim.errors import ConfigError


def param(default: Any, help: str, *, choices: tuple | Callable[[], Any] | None = None,
          lo: float | None = None, hi: float | None = None, lo_open: bool = False) -> Any:
    """A schema field: default, help text and the allowed values.

    Used by every config section here and by each algorithm's params dataclass (its
    ``[strategy.<name>]`` table), so all keys are validated and documented the same way.
    ``choices`` may be a function returning them (strategy names come from the registry).
    """
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "breast-cancer", "diabetes", "synthetic", "linear", "text-topics", "file")
TRACKERS = ("tensorboard", "mlflow")
PARTITIONERS = ("iid", "dirichlet", "shard", "pathological", "quantity", "natural-id", "feature-skew")


@dataclass
class DataConfig:
    dataset: str = param("digits", "built-in dataset name, or 'file' to read data.path", choices=DATASETS)
    path: str = param("", "CSV, Parquet or NPZ file when dataset = 'file'")
    label_column: str = param("label", "label column of a user file")
    missing: str = param("drop", "rows with a missing value (NaN, None, empty string) in a used column: drop them "
                         "(one log line with the count per column) or refuse the data", choices=("drop", "error"))
    classes: list[int] = param([], "keep only these classes (relabelled 0..C-1); empty = all")
    task: str = param("auto", "classification or regression; auto infers it",
                   choices=("auto", "classification", "regression"))
    test_fraction: float = param(0.2, "held-out share for central evaluation", lo=0.0, hi=0.9, lo_open=True)
    partitioner: str = param("iid", "how samples are split across clients", choices=PARTITIONERS)
    alpha: float = param(0.5, "Dirichlet concentration (smaller = more label skew)", lo=0.0, lo_open=True)
    classes_per_client: int = param(2, "classes per client for shard / pathological", lo=1)
    quantity_power: float = param(1.0, "power-law exponent of client sizes for 'quantity'", lo=0.0)
    natural_id_column: str = param("group", "column that names each sample's client for 'natural-id'")
    feature_shift: float = param(0.5, "std of the per-client mean shift for 'feature-skew'", lo=0.0)
    feature_noise: float = param(0.0, "std of per-client additive feature noise for 'feature-skew'", lo=0.0)
    synthetic_alpha: float = param(1.0, "Synthetic(alpha, beta): model heterogeneity", lo=0.0)
    synthetic_beta: float = param(1.0, "Synthetic(alpha, beta): feature heterogeneity", lo=0.0)
    synthetic_samples: int = param(100, "mean samples per group of the synthetic generators", lo=10)
    linear_dim: int = param(100, "feature dimension of the 'linear' generator", lo=1)
    linear_noise: float = param(0.5, "label-noise std of the 'linear' generator", lo=0.0)
    text_column: str = param("", "user file: column of raw text, tokenized as the features (needs .[text])")
    tokenizer: str = param("all-MiniLM-L6-v2", "text data: packaged model name or local Hugging Face directory "
                        "whose tokenizer is used (hf-text loads the same model unless model.pretrained_path)")
    max_length: int = param(32, "text data: tokens per sample (padded or truncated)", lo=2)


@dataclass
class ModelConfig:
    name: str = param("mlp", "model architecture")  # checked against the open registry in models.build_model
    hidden: list[int] = param([64], "hidden widths of the MLP")
    lora_rank: int = param(8, "LoRA rank r", lo=1)
    lora_alpha: float = param(16.0, "LoRA scale alpha (update scaled by alpha/r)", lo=0.0, lo_open=True)
    lora_dropout: float = param(0.0, "LoRA dropout on the adapter input", lo=0.0, hi=0.9)
    lora_targets: list[str] = param([], "names of Linear modules to adapt; empty = every hidden Linear")
    lora_init: str = param("kaiming", "initial A: kaiming (peft), orthogonal (the Kaiming draw with orthonormal "
                        "rows), pissa (top-r SVD of the frozen weight)", choices=("kaiming", "orthogonal", "pissa"))
    pretrain_classes: list[int] = param([], "lora-mlp: classes of the central source task (empty = all)")
    pretrain_epochs: int = param(30, "central pretraining epochs of the LoRA backbone", lo=1)
    pretrained_path: str = param("", "hf-text: packaged model name or local Hugging Face directory "
                              "(empty = data.tokenizer's model)")


@dataclass
class FederationConfig:
    num_clients: int = param(10, "number of simulated clients", lo=1)
    clients_per_round: int = param(5, "clients sampled per round", lo=1)
    rounds: int = param(10, "federated rounds", lo=1)


@dataclass
class ClientConfig:
    local_epochs: int = param(1, "local epochs per round", lo=1)
    local_steps: int = param(0, "local steps per round instead of epochs (0 = use epochs)", lo=0)
    batch_size: int = param(32, "expected batch size (Poisson sampling under DP)", lo=1)
    lr: float = param(0.1, "local SGD learning rate", lo=0.0, lo_open=True)
    momentum: float = param(0.0, "local SGD momentum", lo=0.0, hi=1.0)


@dataclass
class PrivacyConfig:
    noise_multiplier: float = param(0.0, "DP-SGD noise multiplier sigma (0 = no DP)", lo=0.0)
    max_grad_norm: float = param(1.0, "DP-SGD per-sample clipping norm C", lo=0.0, lo_open=True)
    delta: float = param(1e-5, "delta of every reported epsilon", lo=0.0, hi=1.0, lo_open=True)
    accountant: str = param("rdp", "accountant for sample-level epsilon", choices=("rdp", "prv"))
    target_epsilon: float = param(0.0, "calibrate sigma to this sample-level epsilon (0 = off)", lo=0.0)
    user_noise_multiplier: float = param(0.0, "central user-level DP noise multiplier (0 = off)", lo=0.0)
    user_clip: float = param(1.0, "central DP clipping norm of client updates", lo=0.0, lo_open=True)
    user_target_epsilon: float = param(0.0, "calibrate the user-level sigma to this epsilon (0 = off)", lo=0.0)


@dataclass
class StrategyConfig:
    """``strategy.name`` picks the algorithm; each algorithm's knobs live in its own table,
    ``[strategy.<name>]``, validated by its params dataclass (`fedsim.algorithms`)."""

    name: str = param("fedavg", "server strategy; its knobs are in [strategy.<name>]", choices=algorithm_names)
    tables: dict[str, Any] = field(default_factory=dict)  # algorithm name -> its params instance

    @property
    def params(self) -> Any:
        """The chosen algorithm's params (its table, or the defaults)."""
        table = self.tables.get(self.name)
        return table if table is not None else get_algorithm(self.name).params()


@dataclass
class RuntimeConfig:
    name: str = param("inprocess", "simulation runtime", choices=("inprocess", "ray"))
    engine: str = param("auto", "in-process training engine: vectorized trains a round's clients at once "
                        "(torch.func), opacus one at a time; auto picks vectorized where the model and "
                        "algorithm allow it", choices=("auto", "vectorized", "opacus"))
    engine_chunk: int = param(0, "vectorized engine: clients per batched computation (0 = from free memory)",
                              lo=0)
    device: str = param("auto", "torch device", choices=("auto", "cpu", "cuda"))
    num_cpus: float = param(1.0, "ray: CPUs per client", lo=0.0, lo_open=True)
    num_gpus: float = param(0.0, "ray: GPUs per client", lo=0.0)
    round_timeout: float = param(600.0, "seconds to wait for replies in a round (deployment); late nodes are dropped",
                              lo=0.0, lo_open=True)
    on_client_error: str = param("fail", "a client exception stops the run, or the round goes on without it",
                              choices=("fail", "skip"))
    discovery_timeout: float = param(600.0, "seconds to wait before round 1 for all num_clients nodes to connect "
                                     "and answer discovery (deployment: each answer starts a ClientApp process)",
                                     lo=0.0, lo_open=True)


@dataclass
class OutputConfig:
    dir: str = param("", "run directory (default runs/<name>-<timestamp>)")
    checkpoint_every: int = param(1, "write checkpoint.safetensors (model, strategy and client state) every n "
                                  "rounds, for `fedsim run --resume`; 0 = never", lo=0)
    keep_best: bool = param(False, "also keep model-best.safetensors, the global model of the best round")
    trackers: list[str] = param([], "experiment trackers that also get every round and the summary, any of "
                                    f"{', '.join(TRACKERS)} (docs/tracking.md)")

    def __post_init__(self) -> None:
        # Each name is checked here because `choices` applies to scalar keys only.
        for name in self.trackers:
            if name not in TRACKERS:
                raise ConfigError(f"output.trackers: each must be one of {', '.join(TRACKERS)} (got {name!r})")
        if len(set(self.trackers)) < len(self.trackers):
            raise ConfigError(f"output.trackers: a tracker is listed twice (got {self.trackers!r})")


@dataclass
class Config:
    name: str = param("experiment", "experiment name, used in the default run directory")
    seed: int = param(0, "one seed fixes partition, sampling, initialization and noise", lo=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------- validation

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"list of {get_args(tp)[0].__name__}"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check one value against its declared type; ints are accepted for floats."""
    origin = get_origin(tp)
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return [_coerce(key, v, inner) for v in value]
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool or isinstance(value, bool):
        if tp is not bool or not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
        return value
    if not isinstance(value, tp):
        raise ConfigError(f"{key}: expected a {_type_name(tp)}, got {value!r}")
    return value


def _choices(meta: dict) -> tuple | None:
    """A field's allowed values; strategy names come from the registry, so they may be a function."""
    choices = meta.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _check_range(key: str, value: Any, meta: dict) -> None:
    choices = _choices(meta)
    if choices is not None and value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)} (got {value!r})")
    lo, hi = meta.get("lo"), meta.get("hi")
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, (int, float)):
            continue
        if lo is not None and (v < lo or (meta.get("lo_open") and v == lo)):
            bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
            allowed = f"{bound}" + (f" and <= {hi}" if hi is not None else "")
            raise ConfigError(f"{key}: must be {allowed} (got {v!r})")
        if hi is not None and v > hi:
            raise ConfigError(f"{key}: must be <= {hi} (got {v!r})")


# Keys that moved into an algorithm's own table: refused with one line naming the new key.
RENAMED_KEYS = {
    "strategy.proximal_mu": "strategy.fedprox.mu",
    "strategy.server_lr": "strategy.fedadam.server_lr (FedAdam) or strategy.scaffold.server_lr (SCAFFOLD)",
    "strategy.fedld_k_fraction": "strategy.fedld.k_fraction",
    "strategy.fedld_normalization": "strategy.fedld.normalization",
    "strategy.svd_period": "strategy.fedsvd.period",
    "strategy.svd_method": "strategy.fedsvd.method",
    "client.margin_lambda": "strategy.fedld.margin_lambda",
    "client.margin_mode": "strategy.fedld.margin_mode",
    **{f"bags.{k}": f"strategy.bags.{k}" for k in ("bag_size", "rho", "label_epsilon", "mechanism", "label_range")},
}


def _refuse_renamed(raw: dict, prefix: str, known: Any) -> None:
    for name, value in raw.items():
        if name in known:
            continue
        old = prefix + name
        if old in RENAMED_KEYS:
            raise ConfigError(f"{old}: renamed to {RENAMED_KEYS[old]}")
        if isinstance(value, dict):  # a whole old section, e.g. [bags]
            for sub in value:
                if f"{old}.{sub}" in RENAMED_KEYS:
                    raise ConfigError(f"{old}.{sub}: renamed to {RENAMED_KEYS[old + '.' + sub]}")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    """Validate one table into `cls`: types, ranges, unknown and renamed keys."""
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "tables"}
    _refuse_renamed(raw, prefix, known)
    if cls is StrategyConfig:
        return _build_strategy(raw, prefix, known)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key in {where}; allowed: {', '.join(known)}")
    kwargs = {}
    for name, value in raw.items():
        key = prefix + name
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a [{key}] table, got {value!r}")
            kwargs[name] = _build(tp, value, key + ".")
        else:
            kwargs[name] = _value(key, value, tp, known[name])
    return cls(**kwargs)


def _value(key: str, value: Any, tp: Any, spec: dataclasses.Field) -> Any:
    """One scalar or list key: its type, then its allowed values."""
    value = _coerce(key, value, tp)
    _check_range(key, value, spec.metadata)
    return value


def _build_strategy(raw: dict, prefix: str, known: dict) -> StrategyConfig:
    """``name`` plus one table per algorithm, each validated by that algorithm's params class."""
    tables = {}
    for key, value in raw.items():
        if key in known:
            continue
        if key not in algorithm_names():
            raise ConfigError(f"{prefix}{key}: unknown key in strategy; allowed: name, or a table "
                              f"[strategy.<name>] with <name> one of {', '.join(algorithm_names())}")
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}: expected a [{prefix}{key}] table, got {value!r}")
        tables[key] = _build(get_algorithm(key).params, value, f"{prefix}{key}.")
    name = _value(prefix + "name", raw["name"], str, known["name"]) if "name" in raw else known["name"].default
    if name not in tables:
        tables[name] = get_algorithm(name).params()  # the resolved config shows the defaults
    return StrategyConfig(name=name, tables=tables)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that no single field can express."""
    fed = cfg.federation
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: must be <= federation.num_clients ({fed.num_clients}), "
            f"got {fed.clients_per_round}")
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.path: required when data.dataset = 'file'")
    for table in cfg.strategy.tables.values():
        check = getattr(table, "validate", None)  # rules between a table's own keys
        if check is not None:
            check()


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict (as TOML gives it) into a Config."""
    cfg = _build(Config, raw, "")
    _check_consistency(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    """The config as nested plain values, each algorithm table under ``strategy.<name>``."""
    out = dataclasses.asdict(cfg)
    tables = out["strategy"].pop("tables")
    out["strategy"].update(tables)
    return out


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Load a TOML experiment, apply dotted-key overrides, validate everything."""
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file not found: {p}")
        try:
            raw = tomllib.loads(p.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config: {p} is not valid TOML: {exc}") from None
    raw.pop("sweep", None)  # read by `fedsim sweep`, not part of one run
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return config_from_dict(raw)


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``section.key`` in a nested dict, refusing unknown sections up front."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{key}: {part} is not a section")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """Parse a CLI override value as a TOML literal; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set: expected section.key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def dumps_toml(cfg: Config) -> str:
    """Serialize a Config back to TOML (what `config.toml` in a run dir holds)."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(cfg))


def loads_toml(text: str) -> Config:
    return config_from_dict(tomllib.loads(text))


def _describe(obj: Any, prefix: str) -> list[tuple[str, str, Any, str]]:
    hints = get_type_hints(type(obj))
    rows = []
    for f in fields(obj):
        if f.name == "tables":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += _describe(value, f"{prefix}{f.name}.")
        else:
            rows.append((prefix + f.name, _type_name(hints[f.name]), value, _allowed_text(f.metadata)))
        if isinstance(obj, StrategyConfig) and f.name == "name":
            for name in algorithm_names():
                rows += _describe(get_algorithm(name).params(), f"{prefix}{name}.")
    return rows


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field, algorithm tables included: the config reference
    of docs/config.md (`reference_table`)."""
    return _describe(Config(), "")


def reference_table() -> str:
    """The config reference of docs/config.md as a Markdown table (a test keeps the two equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | `{default!r}` | {text} |" for key, kind, default, text in describe_fields()]
    return "\n".join(lines)


def _allowed_text(meta: dict) -> str:
    text = meta.get("help", "")
    choices = _choices(meta)
    if choices:
        text += f" ({' | '.join(choices)})"
    return text
