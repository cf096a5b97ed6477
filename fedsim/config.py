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
from typing import Any, get_args, get_origin, get_type_hints

from fedsim.errors import ConfigError


def _f(default: Any, help: str, *, choices: tuple | None = None, lo: float | None = None,
       hi: float | None = None, lo_open: bool = False) -> Any:
    """A schema field: default, help text and the allowed values."""
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "breast-cancer", "diabetes", "synthetic", "linear", "text-topics", "file")
PARTITIONERS = ("iid", "dirichlet", "shard", "pathological", "quantity", "natural-id", "feature-skew")
STRATEGIES = ("fedavg", "fedprox", "fedadam", "scaffold", "fedld",
              "fedsvd", "ffa-lora", "fedavg-lora", "bags")


@dataclass
class DataConfig:
    dataset: str = _f("digits", "built-in dataset name, or 'file' to read data.path", choices=DATASETS)
    path: str = _f("", "CSV, Parquet or NPZ file when dataset = 'file'")
    label_column: str = _f("label", "label column of a user file")
    classes: list[int] = _f([], "keep only these classes (relabelled 0..C-1); empty = all")
    task: str = _f("auto", "classification or regression; auto infers it",
                   choices=("auto", "classification", "regression"))
    test_fraction: float = _f(0.2, "held-out share for central evaluation", lo=0.0, hi=0.9, lo_open=True)
    partitioner: str = _f("iid", "how samples are split across clients", choices=PARTITIONERS)
    alpha: float = _f(0.5, "Dirichlet concentration (smaller = more label skew)", lo=0.0, lo_open=True)
    classes_per_client: int = _f(2, "classes per client for shard / pathological", lo=1)
    quantity_power: float = _f(1.0, "power-law exponent of client sizes for 'quantity'", lo=0.0)
    natural_id_column: str = _f("group", "column that names each sample's client for 'natural-id'")
    feature_shift: float = _f(0.5, "std of the per-client mean shift for 'feature-skew'", lo=0.0)
    feature_noise: float = _f(0.0, "std of per-client additive feature noise for 'feature-skew'", lo=0.0)
    synthetic_alpha: float = _f(1.0, "Synthetic(alpha, beta): model heterogeneity", lo=0.0)
    synthetic_beta: float = _f(1.0, "Synthetic(alpha, beta): feature heterogeneity", lo=0.0)
    synthetic_samples: int = _f(100, "mean samples per group of the synthetic generators", lo=10)
    linear_dim: int = _f(100, "feature dimension of the 'linear' generator", lo=1)
    linear_noise: float = _f(0.5, "label-noise std of the 'linear' generator", lo=0.0)
    text_column: str = _f("", "user file: column of raw text, tokenized as the features (needs .[text])")
    tokenizer: str = _f("all-MiniLM-L6-v2", "text data: packaged model name or local Hugging Face directory "
                        "whose tokenizer is used (hf-text loads the same model unless model.pretrained_path)")
    max_length: int = _f(32, "text data: tokens per sample (padded or truncated)", lo=2)


@dataclass
class ModelConfig:
    name: str = _f("mlp", "model architecture")  # checked against the open registry in models.build_model
    hidden: list[int] = _f([64], "hidden widths of the MLP")
    lora_rank: int = _f(8, "LoRA rank r", lo=1)
    lora_alpha: float = _f(16.0, "LoRA scale alpha (update scaled by alpha/r)", lo=0.0, lo_open=True)
    lora_dropout: float = _f(0.0, "LoRA dropout on the adapter input", lo=0.0, hi=0.9)
    lora_targets: list[str] = _f([], "names of Linear modules to adapt; empty = every hidden Linear")
    lora_init: str = _f("kaiming", "initial A: kaiming (peft), orthogonal (the Kaiming draw with orthonormal "
                        "rows), pissa (top-r SVD of the frozen weight)", choices=("kaiming", "orthogonal", "pissa"))
    pretrain_classes: list[int] = _f([], "lora-mlp: classes of the central source task (empty = all)")
    pretrain_epochs: int = _f(30, "central pretraining epochs of the LoRA backbone", lo=1)
    pretrained_path: str = _f("", "hf-text: packaged model name or local Hugging Face directory "
                              "(empty = data.tokenizer's model)")


@dataclass
class FederationConfig:
    num_clients: int = _f(10, "number of simulated clients", lo=1)
    clients_per_round: int = _f(5, "clients sampled per round", lo=1)
    rounds: int = _f(10, "federated rounds", lo=1)


@dataclass
class ClientConfig:
    local_epochs: int = _f(1, "local epochs per round", lo=1)
    local_steps: int = _f(0, "local steps per round instead of epochs (0 = use epochs)", lo=0)
    batch_size: int = _f(32, "expected batch size (Poisson sampling under DP)", lo=1)
    lr: float = _f(0.1, "local SGD learning rate", lo=0.0, lo_open=True)
    momentum: float = _f(0.0, "local SGD momentum", lo=0.0, hi=1.0)
    margin_lambda: float = _f(0.1, "FedLD margin-control weight lambda", lo=0.0)
    margin_mode: str = _f("batch", "FedLD margin norm: over the batch (authors) or per-sample mean",
                          choices=("batch", "sample"))


@dataclass
class PrivacyConfig:
    noise_multiplier: float = _f(0.0, "DP-SGD noise multiplier sigma (0 = no DP)", lo=0.0)
    max_grad_norm: float = _f(1.0, "DP-SGD per-sample clipping norm C", lo=0.0, lo_open=True)
    delta: float = _f(1e-5, "delta of every reported epsilon", lo=0.0, hi=1.0, lo_open=True)
    accountant: str = _f("rdp", "accountant for sample-level epsilon", choices=("rdp", "prv"))
    target_epsilon: float = _f(0.0, "calibrate sigma to this sample-level epsilon (0 = off)", lo=0.0)
    user_noise_multiplier: float = _f(0.0, "central user-level DP noise multiplier (0 = off)", lo=0.0)
    user_clip: float = _f(1.0, "central DP clipping norm of client updates", lo=0.0, lo_open=True)
    user_target_epsilon: float = _f(0.0, "calibrate the user-level sigma to this epsilon (0 = off)", lo=0.0)


@dataclass
class StrategyConfig:
    name: str = _f("fedavg", "server strategy", choices=STRATEGIES)
    proximal_mu: float = _f(0.01, "FedProx proximal weight mu", lo=0.0)
    server_lr: float = _f(1.0, "server learning rate (FedAdam eta, SCAFFOLD global lr)", lo=0.0, lo_open=True)
    fedld_k_fraction: float = _f(0.8, "FedLD: share of principal directions kept", lo=0.0, hi=1.0, lo_open=True)
    fedld_normalization: str = _f("all", "FedLD: divide by the sum of all or of the top-k singular values",
                                  choices=("all", "topk"))
    svd_period: int = _f(1, "FedSVD: refactorize every n rounds", lo=1)
    svd_method: str = _f("exact", "FedSVD: exact or randomized SVD", choices=("exact", "randomized"))


@dataclass
class BagsConfig:
    bag_size: int = _f(1, "samples per bag k (1 = individual labels)", lo=1)
    rho: float = _f(1.0, "interpolation rho: 0 = bag-level loss, 1 = instance-level loss", lo=0.0, hi=1.0)
    label_epsilon: float = _f(0.0, "label-DP epsilon of released bag means (0 = no noise)", lo=0.0)
    mechanism: str = _f("laplace", "noise on bag means", choices=("laplace", "gaussian"))
    label_range: list[float] = _f([], "public response range [a, b]; empty = training-label range")


@dataclass
class RuntimeConfig:
    name: str = _f("inprocess", "simulation runtime", choices=("inprocess", "ray"))
    device: str = _f("auto", "torch device", choices=("auto", "cpu", "cuda"))
    num_cpus: float = _f(1.0, "ray: CPUs per client", lo=0.0, lo_open=True)
    num_gpus: float = _f(0.0, "ray: GPUs per client", lo=0.0)
    round_timeout: float = _f(600.0, "seconds to wait for replies in a round (deployment); late nodes are dropped",
                              lo=0.0, lo_open=True)
    on_client_error: str = _f("fail", "a client exception stops the run, or the round goes on without it",
                              choices=("fail", "skip"))


@dataclass
class OutputConfig:
    dir: str = _f("", "run directory (default runs/<name>-<timestamp>)")


@dataclass
class Config:
    name: str = _f("experiment", "experiment name, used in the default run directory")
    seed: int = _f(0, "one seed fixes partition, sampling, initialization and noise", lo=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    bags: BagsConfig = field(default_factory=BagsConfig)
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


def _check_range(key: str, value: Any, meta: dict) -> None:
    choices = meta.get("choices")
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


def _build(cls: type, raw: dict, prefix: str) -> Any:
    hints = get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
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
            value = _coerce(key, value, tp)
            _check_range(key, value, known[name].metadata)
            kwargs[name] = value
    return cls(**kwargs)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that no single field can express."""
    fed = cfg.federation
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: must be <= federation.num_clients ({fed.num_clients}), "
            f"got {fed.clients_per_round}")
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.path: required when data.dataset = 'file'")
    if len(cfg.bags.label_range) not in (0, 2) or (
            len(cfg.bags.label_range) == 2 and cfg.bags.label_range[0] >= cfg.bags.label_range[1]):
        raise ConfigError(f"bags.label_range: must be empty or [a, b] with a < b (got {cfg.bags.label_range})")


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict (as TOML gives it) into a Config."""
    cfg = _build(Config, raw, "")
    _check_consistency(cfg)
    return cfg


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


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


def describe_fields() -> list[tuple[str, str, Any, str]]:
    """(key, type, default, help) for every field: the README's config reference."""
    rows = []
    top = Config()
    for f in fields(Config):
        section = getattr(top, f.name)
        if dataclasses.is_dataclass(section):
            hints = get_type_hints(type(section))
            for sf in fields(section):
                rows.append((f"{f.name}.{sf.name}", _type_name(hints[sf.name]),
                             getattr(section, sf.name), _allowed_text(sf.metadata)))
        else:
            rows.append((f.name, _type_name(get_type_hints(Config)[f.name]), section,
                         _allowed_text(f.metadata)))
    return rows


def reference_table() -> str:
    """The README's config reference as a Markdown table (a test keeps the two equal)."""
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | `{default!r}` | {text} |" for key, kind, default, text in describe_fields()]
    return "\n".join(lines)


def _allowed_text(meta: dict) -> str:
    text = meta.get("help", "")
    if meta.get("choices"):
        text += f" ({' | '.join(meta['choices'])})"
    return text
