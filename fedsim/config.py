"""Experiment configuration: one TOML file, validated on load.

Why a schema of plain dataclasses: every key has one type, one default, one
allowed range and one line of help, so bad input can be refused with a single
line that names the key and what is allowed, before any work starts. The same
schema drives ``--set section.key=value`` overrides and the resolved
``config.toml`` written into each run directory.

One source of truth: each key's type and `param(...)` metadata (choices, bounds,
pattern). A pydantic model per section is generated from them (strict types, no
NaN or infinity, no unknown keys) and its errors are turned into fedsim's one line,
``section.key: must be ... (got X)``.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin, get_type_hints

from pydantic import ConfigDict, Field, ValidationError, create_model

from fedsim.algorithms import algorithm_names, get_algorithm
from fedsim.errors import ConfigError, InputFileError

log = logging.getLogger("fedsim")


def param(default: Any, help: str, *, choices: tuple | Callable[[], Any] | None = None,
          lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False,
          pattern: str | None = None, why: str = "") -> Any:
    """A schema field: default, help text and the allowed values.

    Used by every config section here and by each algorithm's params dataclass (its
    ``[strategy.<name>]`` table), so all keys are validated and documented the same way.
    ``choices`` may be a function returning them (strategy names come from the registry).
    ``lo``/``hi`` bound numbers (and each number of a list), open with ``lo_open``/``hi_open``;
    ``pattern`` is a regular expression a string must match in full; ``why`` is appended to the
    error when ``hi`` or ``pattern`` refuses a value (an upper bound needs a reason).
    Every number must be finite, whatever the bounds.
    """
    meta = {"help": help, "choices": choices, "lo": lo, "hi": hi, "lo_open": lo_open, "hi_open": hi_open,
            "pattern": pattern, "why": why}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


DATASETS = ("digits", "breast-cancer", "diabetes", "synthetic", "linear", "text-topics", "file")
TRACKERS = ("tensorboard", "mlflow")
PARTITIONERS = ("iid", "dirichlet", "shard", "pathological", "quantity", "natural-id", "feature-skew", "iid-mix")
GENERATED_DATASETS = ("synthetic", "linear", "text-topics")  # sized by data.synthetic_samples
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"  # a directory name, with room for a timestamp
# Upper bounds, each with its reason (the error says it).
MAX_ROUNDS = 1_000_000
MAX_CLIENTS = 1_000_000
MAX_WIDTH = 65_536
MAX_MLP_WEIGHTS = 2**24
MAX_GENERATED_FLOATS = 10**9
# Every number without an upper bound of its own is at most this: a bound against typos and
# overflow (training runs in float32, whose largest value is 3.4e38: 1e12 squared still fits).
MAX_FLOAT = 1e12
# A noise multiplier is 0 (off) or within these: below the floor epsilon is astronomic (over
# 1e5 for one step) and the RDP series at fractional orders needs ever more terms; above the
# ceiling every update is noise, and sigma**2 overflows beyond 1e154.
MIN_NOISE_MULTIPLIER = 0.01
MAX_NOISE_MULTIPLIER = 1e6
WHY_LONG = "a bound against typos: no experiment needs more, and the run would not end"
WHY_MEMORY = "the simulation holds this in one process's memory"
WHY_STD = "in units of the standardized features' std: beyond 100 the features are noise or shift alone"
WHY_OVERFLOW = "a bound against typos and overflow: training computes in float32 (at most 3.4e38)"
# Keys added with a default that changes what runs do: the value that reproduces a run made
# before the key existed (it had no validation split then). A recorded config without the key
# (a sweep cell's, a checkpoint's) holds this value, not today's default. data.iid_fraction
# is read only by the iid-mix partitioner, which came with it: any older run holds its default.
BEFORE_THE_KEY = {"data.validation_fraction": 0.0, "data.iid_fraction": 0.8}


@dataclass
class DataConfig:
    dataset: str = param("digits", "built-in dataset name, or 'file' to read data.path", choices=DATASETS)
    path: str = param("", "CSV, Parquet or NPZ file when dataset = 'file'")
    label_column: str = param("label", "label column of a user file")
    drop_columns: list[str] = param([], "user file: columns that are not features, e.g. ids, free text or a mostly "
                                        "empty column whose gaps would drop most rows")
    missing: str = param("drop", "rows with a missing value (NaN, None, empty string) in a used column: drop them "
                         "(one log line with the count per column) or refuse the data", choices=("drop", "error"))
    classes: list[int] = param([], "keep only these classes (relabelled 0..C-1); empty = all", lo=0)
    task: str = param("auto", "classification or regression; auto infers it",
                   choices=("auto", "classification", "regression"))
    label_range: list[float] = param([], "regression: the target's public range [a, b] in its own units; "
                                     "the target is standardized onto [-3, 3] by it. Empty: diabetes uses its "
                                     "documented range 25-346; a file uses its training labels' mean and std, "
                                     "which no privacy accounting covers")
    test_fraction: float = param(0.2, "held-out share for central evaluation", lo=0.0, hi=0.9, lo_open=True,
                                 why="at least a tenth of the data must be left to train on")
    validation_fraction: float = param(0.1, "share of the training split held out centrally for model selection "
                                       "(the best round); 0 = none, the best round is then picked on the test "
                                       "split", lo=0.0, hi=1.0, hi_open=True,
                                       why="some training data must be left to partition")
    partitioner: str = param("iid", "how samples are split across clients", choices=PARTITIONERS)
    alpha: float = param(0.5, "Dirichlet concentration (smaller = more label skew)", lo=0.0, lo_open=True)
    classes_per_client: int = param(2, "classes per client for shard / pathological; for iid-mix the size of "
                                    "each client's group of skewed classes", lo=1)
    iid_fraction: float = param(0.8, "iid-mix: share of each client's samples spread evenly over all classes, "
                                "the rest over its group of data.classes_per_client classes (FedLD's noniid_s / "
                                "100; 1 = IID)", lo=0.0, hi=1.0, why="it is a share of each client's samples")
    quantity_power: float = param(1.0, "power-law exponent of client sizes for 'quantity'", lo=0.0, hi=10.0,
                                  why="at 10 the second client already gets 1/1024 of the first's samples")
    natural_id_column: str = param("group", "column that names each sample's client for 'natural-id'")
    feature_shift: float = param(0.5, "std of the per-client mean shift for 'feature-skew'", lo=0.0, hi=100.0,
                                 why=WHY_STD)
    feature_noise: float = param(0.0, "std of per-client additive feature noise for 'feature-skew'", lo=0.0,
                                 hi=100.0, why=WHY_STD)
    synthetic_alpha: float = param(1.0, "Synthetic(alpha, beta): model heterogeneity", lo=0.0)
    synthetic_beta: float = param(1.0, "Synthetic(alpha, beta): feature heterogeneity", lo=0.0)
    synthetic_samples: int = param(100, "mean samples per group of the synthetic generators", lo=10,
                                   hi=10**6, why=WHY_MEMORY)
    linear_dim: int = param(100, "feature dimension of the 'linear' generator", lo=1, hi=MAX_WIDTH,
                            why=WHY_MEMORY)
    linear_noise: float = param(0.5, "label-noise std of the 'linear' generator", lo=0.0)
    text_column: str = param("", "user file: column of raw text, tokenized as the features (needs .[text])")
    tokenizer: str = param("all-MiniLM-L6-v2", "text data: packaged model name or local Hugging Face directory "
                        "whose tokenizer is used (hf-text loads the same model unless model.pretrained_path)")
    max_length: int = param(32, "text data: tokens per sample (padded or truncated)", lo=2, hi=512,
                            why="the packaged encoders have 512 positions")


@dataclass
class ModelConfig:
    name: str = param("mlp", "model architecture")  # checked against the open registry in models.build_model
    hidden: list[int] = param([64], "hidden widths of the MLP", lo=1, hi=MAX_WIDTH, why=WHY_MEMORY)
    lora_rank: int = param(8, "LoRA rank r", lo=1, hi=MAX_WIDTH, why="no layer is wider")
    lora_alpha: float = param(16.0, "LoRA scale alpha (update scaled by alpha/r)", lo=0.0, lo_open=True)
    lora_dropout: float = param(0.0, "LoRA dropout on the adapter input", lo=0.0, hi=0.9)
    lora_targets: list[str] = param([], "names of Linear modules to adapt; empty = every hidden Linear")
    lora_init: str = param("kaiming", "initial A: kaiming (peft), orthogonal (the Kaiming draw with orthonormal "
                        "rows), pissa (top-r SVD of the frozen weight)", choices=("kaiming", "orthogonal", "pissa"))
    pretrain_classes: list[int] = param([], "lora-mlp: classes of the central source task (empty = all)", lo=0)
    pretrain_epochs: int = param(30, "central pretraining epochs of the LoRA backbone", lo=1, hi=10_000,
                                 why="pretraining runs before the first round; " + WHY_LONG)
    pretrained_path: str = param("", "hf-text: packaged model name or local Hugging Face directory "
                              "(empty = data.tokenizer's model)")


@dataclass
class FederationConfig:
    num_clients: int = param(10, "number of simulated clients", lo=1, hi=MAX_CLIENTS, why=WHY_MEMORY)
    clients_per_round: int = param(5, "clients sampled per round (unset: at most num_clients)", lo=1,
                                   hi=MAX_CLIENTS, why=WHY_MEMORY)
    rounds: int = param(10, "federated rounds", lo=1, hi=MAX_ROUNDS, why=WHY_LONG)
    sampling: str = param("auto", "how a round's clients are drawn: poisson (each joins with q = K/N; "
                          "the cohort size varies), fixed (K without replacement), cyclic (blocks of K of "
                          "one seeded order, each client at most once per N/K rounds), auto (cyclic under "
                          "DP-FTRL, poisson under other user-level DP, else fixed); the user-level epsilon "
                          "accounts the one that runs", choices=("auto", "poisson", "fixed", "cyclic"))


@dataclass
class ClientConfig:
    local_epochs: int = param(1, "local epochs per round", lo=1, hi=10_000, why=WHY_LONG)
    local_steps: int = param(0, "local steps per round instead of epochs (0 = use epochs)", lo=0, hi=MAX_ROUNDS,
                             why=WHY_LONG)
    batch_size: int = param(32, "expected batch size (Poisson sampling under DP)", lo=1, hi=MAX_WIDTH,
                            why="a batch holds one per-sample gradient per row; " + WHY_MEMORY)
    lr: float = param(0.1, "local SGD learning rate", lo=0.0, lo_open=True)
    momentum: float = param(0.0, "local SGD momentum", lo=0.0, hi=1.0, hi_open=True,
                            why="at momentum 1 no gradient ever decays and the step grows without bound")


@dataclass
class PrivacyConfig:
    noise_multiplier: float = param(0.0, "DP-SGD noise multiplier sigma (0 = no DP)", lo=0.0)
    max_grad_norm: float = param(1.0, "DP-SGD per-sample clipping norm C", lo=0.0, lo_open=True)
    delta: float = param(1e-5, "delta of every reported epsilon; must also be < 1/n (n: samples of the "
                         "largest client; clients, for user-level DP)", lo=0.0, hi=1.0, lo_open=True, hi_open=True,
                         why="delta >= 1 bounds nothing")
    accountant: str = param("rdp", "accountant of every epsilon, sample and user level: rdp (Opacus' RDP), "
                            "prv (Opacus' PRV), pld (dp-accounting's PLD); fixed-cohort sampling and "
                            "DP-FTRL take rdp only at the user level", choices=("rdp", "prv", "pld"))
    target_epsilon: float = param(0.0, "calibrate sigma to this sample-level epsilon (0 = off)", lo=0.0)
    calibration: str = param("worst-client", "how privacy.target_epsilon sets sigma: worst-client (one sigma for "
                             "all, the tightest client at the target) or per-client (each client the smallest "
                             "sigma that puts its own epsilon at the target; assumes client sizes are public)",
                             choices=("worst-client", "per-client"))
    client_noise_multipliers: list[float] = param([], "DP-SGD sigma of each client by partition id, as per-client "
                                                  "calibration sets it (empty = privacy.noise_multiplier for all)",
                                                  lo=0.0)
    user_noise_multiplier: float = param(0.0, "central user-level DP noise multiplier (0 = off)", lo=0.0)
    user_clip: float = param(1.0, "central DP clipping norm of client updates", lo=0.0, lo_open=True)
    user_target_epsilon: float = param(0.0, "calibrate the user-level sigma to this epsilon (0 = off)", lo=0.0)
    user_clipping: str = param("server", "who clips a client's update to the user-level clip: the server, or the "
                               "client before it replies (the same math; the trust model differs: docs/privacy.md)",
                               choices=("server", "client"))
    user_clip_quantile: float = param(0.0, "adaptive clipping (Andrew et al. 2021): the target quantile of the update "
                                      "norms, e.g. 0.5 tracks the median; 0 = fixed clipping at privacy.user_clip "
                                      "(which is then the start)", lo=0.0, hi=1.0, hi_open=True,
                                      why="a quantile is below 1")
    user_clip_lr: float = param(0.2, "adaptive clipping: learning rate eta of the geometric clip update "
                                "C <- C exp(-eta (b - quantile))", lo=0.0, lo_open=True, hi=10.0,
                                why="a step of exp(10) per round does not track a quantile")
    user_clip_count_noise: float = param(0.0, "adaptive clipping: std sigma_b of the noise on the unclipped count, "
                                         "> user_noise_multiplier / 2 (0 = clients_per_round / 20, the paper's "
                                         "choice)", lo=0.0)
    noise_cohort_size: int = param(0, "add the noise of a cohort of M clients while clients_per_round train "
                                   "(pfl-research's noise_cohort_size); epsilon is then a simulated deployment's "
                                   "(0 = off)", lo=0, hi=10**9, why="no deployment samples more clients a round")
    min_cohort: int = param(1, "user-level DP: a round with fewer successful replies fails (the noised sum is "
                            "divided by the expected cohort, never by the replies)", lo=1, hi=MAX_CLIENTS,
                            why="more than federation.num_clients can be")
    user_mechanism: str = param("gaussian", "user-level noise: gaussian (a release per round, DP-FedAvg) or tree "
                                "(DP-FTRL's tree aggregation, Kairouz et al. 2021)", choices=("gaussian", "tree"))
    user_tree_restart: int = param(0, "tree: restart the tree every n rounds (0 = one tree for the run)", lo=0,
                                   hi=MAX_ROUNDS, why="more rounds than a run can have")
    secure_noise: str = param("auto", "where DP noise and Poisson masks come from: on = OS-CSPRNG state (secret from "
                              "whoever holds the run config), off = the seed (reproducible), auto = on under a "
                              "deployment, off in simulation (docs/privacy.md)", choices=("auto", "on", "off"))
    secure_aggregation: bool = param(False, "the server learns only the sum of a round's updates: Flower's SecAgg+ "
                                     "protocol in a deployment, its trust model in simulation; every client weighs "
                                     "1 and adds its share of the user-level noise (docs/privacy.md)")
    secagg_clipping_range: float = param(0.0, "secure aggregation: r, each coordinate of a client's (noised) update "
                                         "is clipped to [-r, r] before quantization; 0 = privacy.user_clip plus 6 "
                                         "noise-share stds under user-level DP, else 8", lo=0.0)
    secagg_quantization_range: int = param(2**22, "secure aggregation: Q, the integers a coordinate is quantized to; "
                                           "the aggregate's error is below 2r/Q per coordinate", lo=2, hi=2**31,
                                           why="Flower quantizes into int32")
    secagg_modulus: int = param(2**32, "secure aggregation: M, a power of 2 the masked sums are taken modulo; "
                                "federation.clients_per_round x Q must be below it", lo=4, hi=2**32,
                                why="Flower's masks are drawn below 2**32")
    secagg_num_shares: int = param(0, "SecAgg+: nodes that hold a share of each node's keys, itself included "
                                   "(0 = the whole round)", lo=0, hi=MAX_CLIENTS,
                                   why="more than federation.num_clients can be")
    secagg_threshold: int = param(0, "SecAgg+: shares that reconstruct a key; a round survives while every node "
                                  "keeps this many live share holders (0 = half the shares, at least 2)", lo=0,
                                  hi=MAX_CLIENTS, why="more than federation.num_clients can be")


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
    name: str = param("inprocess", "simulation runtime: inprocess (one process, a round's clients batched), ray "
                      "(the batched engine on a pool of Ray workers; RAY_ADDRESS joins a cluster), flower "
                      "(Flower's simulation engine, one client per message)", choices=("inprocess", "ray", "flower"))
    engine: str = param("auto", "training engine: vectorized trains a round's clients at once in process "
                        "(torch.func; in each Ray engine worker its share; one per message under Flower's "
                        "engine and on SuperNodes), opacus one at a time; "
                        "auto picks vectorized where the model and algorithm allow it",
                        choices=("auto", "vectorized", "opacus"))
    engine_chunk: int = param(0, "vectorized engine: clients per batched computation (0 = from free memory)",
                              lo=0, hi=MAX_CLIENTS, why="more than federation.num_clients can be")
    device: str = param("auto", "torch device", choices=("auto", "cpu", "cuda"))
    workers: int = param(0, "ray: engine workers (Ray actors) a round's clients are split across; 0 = one per "
                         "GPU, else one per 2 CPU cores of the Ray cluster", lo=0, hi=4096,
                         why="no Ray cluster needs more engine workers")
    worker_gpus: float = param(0.0, "ray: GPUs per engine worker (a fraction shares one); 0 = one each where the "
                               "Ray cluster has GPUs and runtime.device is not cpu", lo=0.0, hi=64.0,
                               why="no machine has more GPUs")
    torch_threads: int = param(0, "torch intra-op threads per training process (the run's, each Ray engine "
                               "worker's); 0 = auto: 1 on a CPU, up to 4 with CUDA (docs/engines.md)",
                               lo=0, hi=4096, why="no machine has more cores")
    num_cpus: float = param(1.0, "flower: CPUs per client", lo=0.0, lo_open=True, hi=4096.0,
                            why="no machine has more CPUs")
    num_gpus: float = param(0.0, "flower: GPUs per client", lo=0.0, hi=64.0, why="no machine has more GPUs")
    round_timeout: float = param(600.0, "seconds to wait for replies in a round (deployment); late nodes are dropped",
                              lo=0.0, lo_open=True, hi=30 * 86400.0, why="no round waits longer than 30 days")
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
    keep_best: bool = param(False, "also keep model-best.safetensors, the global model of the best round (on the "
                            "validation split; on the test split without one)")
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
    name: str = param("experiment", "experiment name, used in the default run directory", pattern=NAME_PATTERN,
                      why="the name becomes a directory name under runs/ or sweeps/, at most 100 characters")
    seed: int = param(0, "one seed fixes partition, sampling, initialization and, unless privacy.secure_noise is "
                      "on, noise", lo=0)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)

# --------------------------------------------------------------------------- validation

INT64_MAX = 2**63 - 1  # TOML's integer range: the resolved config.toml must hold every value
NO_NUL = r"^[^\x00]*$"  # a NUL cannot be part of a path or a column name


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is list:
        return f"list of {get_args(tp)[0].__name__}"
    return {int: "integer", float: "number", str: "string", bool: "true/false"}.get(tp, str(tp))


def _choices(meta: dict) -> tuple | None:
    """A field's allowed values; strategy names come from the registry, so they may be a function."""
    choices = meta.get("choices")
    return tuple(choices()) if callable(choices) else choices


def _scalar_schema(tp: Any, meta: dict, choices: tuple | None) -> Any:
    """The pydantic type of one value, from its declared type and `param` metadata."""
    if choices is not None:
        return Literal[choices]
    constraints: dict[str, Any] = {}
    if tp in (int, float):
        lo, hi = meta.get("lo"), meta.get("hi")
        if lo is not None:
            constraints["gt" if meta.get("lo_open") else "ge"] = lo
        if hi is not None:
            constraints["lt" if meta.get("hi_open") else "le"] = hi
        if tp is int:  # the integer range TOML can write back
            constraints.setdefault("le", INT64_MAX)
            constraints.setdefault("ge", -INT64_MAX - 1)
        else:
            constraints.setdefault("le", MAX_FLOAT)
            constraints.setdefault("ge", -MAX_FLOAT)
    elif tp is str:
        constraints["pattern"] = meta.get("pattern") or NO_NUL
    return Annotated[tp, Field(**constraints)] if constraints else tp


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """`typing.get_type_hints` of a config class, once: with postponed annotations it compiles
    every field's annotation on each call, and parsing a config asks for every section's
    hints several times (a third of a small run's fixed cost). Read-only for callers."""
    return get_type_hints(cls)


@functools.lru_cache(maxsize=256)
def _schema_for(cls: type, choices: tuple) -> Any:
    """A pydantic model of `cls`'s scalar and list keys (sections are walked by `_build`).

    Strict: no string for a number, no float for an integer, no bool for either (an int for
    a float is fine, TOML writes 1.0 as 1 often enough). No NaN or infinity anywhere."""
    hints = _type_hints(cls)
    specs = {}
    for f, field_choices in zip(_scalar_fields(cls), choices):
        tp = hints[f.name]
        if get_origin(tp) is list:
            schema: Any = list[_scalar_schema(get_args(tp)[0], f.metadata, field_choices)]
        else:
            schema = _scalar_schema(tp, f.metadata, field_choices)
        specs[f.name] = (schema, None)  # only the keys given are validated; defaults are known good
    config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    return create_model(f"{cls.__name__}Schema", __config__=config, **specs)


def _scalar_fields(cls: type) -> list[dataclasses.Field]:
    hints = _type_hints(cls)
    return [f for f in fields(cls) if f.name != "tables" and not dataclasses.is_dataclass(hints[f.name])]


def _show(value: Any, limit: int = 60) -> str:
    """A value as it goes into a one-line message: its repr (newlines escaped), shortened."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _key(text: str) -> str:
    """A user-given key as it goes into a one-line message."""
    return text if text.isprintable() else repr(text)


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _lower_text(meta: dict) -> str:
    lo, hi = meta["lo"], meta.get("hi")
    text = f"{'>' if meta.get('lo_open') else '>='} {lo}"
    if hi is not None:
        text += f" and {'<' if meta.get('hi_open') else '<='} {hi}"
    return text


def _message(key: str, tp: Any, meta: dict, choices: tuple | None, value: Any, error: dict) -> str:
    """fedsim's one line for a pydantic error on `key`: what is allowed, what it got, and why
    for an upper bound."""
    kind, got = error["type"], _show(error["input"])
    if len(error["loc"]) > 1:  # an element of a list: name it, and its type
        key, tp, value = f"{key}[{error['loc'][1]}]", get_args(tp)[0], error["input"]
    why = f"; {meta['why']}" if meta.get("why") else ""
    if kind == "finite_number":
        return f"{key}: must be a finite number (got {got})"
    if kind == "literal_error":
        return f"{key}: must be one of {', '.join(map(str, choices or ()))} (got {got})"
    if kind in ("greater_than", "greater_than_equal"):
        if meta.get("lo") is None:
            if tp is float:
                return f"{key}: must be >= {-MAX_FLOAT:g} (got {got}); {WHY_OVERFLOW}"
            return f"{key}: must be >= {-INT64_MAX - 1} (got {got})"
        return f"{key}: must be {_lower_text(meta)} (got {got})"
    if kind in ("less_than", "less_than_equal"):
        if meta.get("hi") is None:
            if tp is float:
                return f"{key}: must be <= {MAX_FLOAT:g} (got {got}); {WHY_OVERFLOW}"
            return f"{key}: must be <= {INT64_MAX}, the largest TOML integer (got {got})"
        return f"{key}: must be {'<' if meta.get('hi_open') else '<='} {meta['hi']} (got {got}){why}"
    if kind == "string_pattern_mismatch":
        if meta.get("pattern"):
            return f"{key}: must match {meta['pattern'].strip('^$')} (got {got}){why}"
        return f"{key}: must not contain a NUL character (got {got})"
    return f"{key}: expected {_article(_type_name(tp))}, got {_show(value)}"


def _validate_scalars(cls: type, raw: dict, prefix: str) -> dict:
    """Types, finiteness, ranges, choices and patterns of `raw`'s keys, all from `cls`'s fields."""
    scalar = _scalar_fields(cls)
    choices = tuple(_choices(f.metadata) for f in scalar)
    try:
        checked = _schema_for(cls, choices).model_validate(raw)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = str(error["loc"][0])
        spec = next(f for f in scalar if f.name == name)
        raise ConfigError(_message(prefix + name, _type_hints(cls)[name], spec.metadata,
                                   choices[scalar.index(spec)], raw.get(name), error)) from None
    return {name: getattr(checked, name) for name in raw}


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
    """Validate one table into `cls`: unknown and renamed keys, sections, then every value."""
    hints = _type_hints(cls)
    known = {f.name: f for f in fields(cls) if f.name != "tables"}
    _refuse_renamed(raw, prefix, known)
    if cls is StrategyConfig:
        return _build_strategy(raw, prefix, known)
    unknown = sorted(set(raw) - set(known))
    if unknown:
        where = prefix.rstrip(".") or "top level"
        raise ConfigError(f"{_key(prefix + unknown[0])}: unknown key in {where}; allowed: {', '.join(known)}")
    sections = {}
    for name, value in raw.items():
        if dataclasses.is_dataclass(hints[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{prefix}{name}: expected a [{prefix}{name}] table, got {_show(value)}")
            sections[name] = _build(hints[name], value, f"{prefix}{name}.")
    values = _validate_scalars(cls, {k: v for k, v in raw.items() if k not in sections}, prefix)
    return cls(**values, **sections)


def _build_strategy(raw: dict, prefix: str, known: dict) -> StrategyConfig:
    """``name`` plus one table per algorithm, each validated by that algorithm's params class."""
    tables = {}
    for key, value in raw.items():
        if key in known:
            continue
        if key not in algorithm_names():
            raise ConfigError(f"{_key(prefix + key)}: unknown key in strategy; allowed: name, or a table "
                              f"[strategy.<name>] with <name> one of {', '.join(algorithm_names())}")
        if not isinstance(value, dict):
            raise ConfigError(f"{prefix}{key}: expected a [{prefix}{key}] table, got {_show(value)}")
        tables[key] = _build(get_algorithm(key).params, value, f"{prefix}{key}.")
    name = _validate_scalars(StrategyConfig, {"name": raw["name"]}, prefix)["name"] if "name" in raw \
        else known["name"].default
    if name not in tables:
        tables[name] = get_algorithm(name).params()  # the resolved config shows the defaults
    return StrategyConfig(name=name, tables=tables)


def _resolve_defaults(cfg: Config, raw: dict) -> None:
    """Defaults that depend on other keys. An unset clients_per_round is at most num_clients,
    so `--num-clients 3` (or `deploy local --nodes 3`) works without also lowering it; a value
    the file or the command line sets stays as given, and is checked."""
    fed = cfg.federation
    if "clients_per_round" not in (raw.get("federation") or {}):
        fed.clients_per_round = min(fed.clients_per_round, fed.num_clients)


def _check_consistency(cfg: Config) -> None:
    """Cross-field rules that no single field can express."""
    fed = cfg.federation
    for key, values in (("data.classes", cfg.data.classes), ("data.drop_columns", cfg.data.drop_columns),
                        ("model.pretrain_classes", cfg.model.pretrain_classes),
                        ("model.lora_targets", cfg.model.lora_targets)):
        twice = sorted({v for v in values if values.count(v) > 1}, key=str)
        if twice:
            raise ConfigError(f"{key}: {_show(twice[0])} is listed twice (got {_show(values)}); each value once")
    for key in ("noise_multiplier", "user_noise_multiplier"):
        sigma = getattr(cfg.privacy, key)
        if sigma != 0 and not MIN_NOISE_MULTIPLIER <= sigma <= MAX_NOISE_MULTIPLIER:
            raise ConfigError(f"privacy.{key}: must be 0 (off) or between {MIN_NOISE_MULTIPLIER:g} and "
                              f"{MAX_NOISE_MULTIPLIER:g} (got {sigma:g}); below, epsilon exceeds 1e5 for a single "
                              f"step and its accounting does not end; above, every update is noise")
    sigmas = cfg.privacy.client_noise_multipliers
    if sigmas:
        if len(sigmas) != fed.num_clients:
            raise ConfigError(f"privacy.client_noise_multipliers: one sigma per client, {fed.num_clients} "
                              f"(federation.num_clients), got {len(sigmas)}")
        bad = [v for v in sigmas if not MIN_NOISE_MULTIPLIER <= v <= MAX_NOISE_MULTIPLIER]
        if bad:
            raise ConfigError(f"privacy.client_noise_multipliers: each must be between {MIN_NOISE_MULTIPLIER:g} "
                              f"and {MAX_NOISE_MULTIPLIER:g} (got {bad[0]:g})")
        if cfg.privacy.noise_multiplier != max(sigmas):
            raise ConfigError(f"privacy.noise_multiplier: with privacy.client_noise_multipliers it is their "
                              f"largest, {max(sigmas):g} (got {cfg.privacy.noise_multiplier:g})")
    if fed.clients_per_round > fed.num_clients:
        raise ConfigError(
            f"federation.clients_per_round: must be <= federation.num_clients ({fed.num_clients}), "
            f"got {fed.clients_per_round}")
    if cfg.data.dataset == "file" and not cfg.data.path:
        raise ConfigError("data.path: required when data.dataset = 'file'")
    if cfg.data.dataset in GENERATED_DATASETS:
        features = {"synthetic": 60, "linear": cfg.data.linear_dim, "text-topics": 2 * cfg.data.max_length}
        floats = cfg.data.synthetic_samples * fed.num_clients * features[cfg.data.dataset]
        if floats > MAX_GENERATED_FLOATS:
            raise ConfigError(
                f"data.synthetic_samples: {cfg.data.synthetic_samples} samples x {fed.num_clients} clients x "
                f"{features[cfg.data.dataset]} features = {floats:.3g} floats; at most {MAX_GENERATED_FLOATS:.0e} "
                f"(4 GB of float32), since the generated data set is held in memory")
    hidden = [*cfg.model.hidden]
    weights = sum(a * b for a, b in zip(hidden, hidden[1:]))
    if weights > MAX_MLP_WEIGHTS:
        raise ConfigError(f"model.hidden: {_show(hidden)} has {weights} hidden-to-hidden weights; at most "
                          f"{MAX_MLP_WEIGHTS}, as DP-SGD holds one gradient per batch row in memory")
    _check_user_dp(cfg)
    _check_secure_aggregation(cfg)
    for table in cfg.strategy.tables.values():
        check = getattr(table, "validate", None)  # rules between a table's own keys
        if check is not None:
            check()


def _check_user_dp(cfg: Config) -> None:
    """User-level DP settings that contradict each other (fedsim.central_dp)."""
    p, fed = cfg.privacy, cfg.federation
    if p.min_cohort > fed.clients_per_round:
        raise ConfigError(f"privacy.min_cohort: must be <= federation.clients_per_round ({fed.clients_per_round}), "
                          f"got {p.min_cohort}: every round would fail")
    if 0 < p.noise_cohort_size < fed.clients_per_round:
        raise ConfigError(f"privacy.noise_cohort_size: must be 0 (off) or >= federation.clients_per_round "
                          f"({fed.clients_per_round}), got {p.noise_cohort_size}: a smaller cohort's noise is only "
                          "more noise, raise user_noise_multiplier instead")
    if p.user_clip_quantile > 0 and p.user_mechanism == "tree":
        raise ConfigError("privacy.user_clip_quantile: adaptive clipping works with privacy.user_mechanism = "
                          "'gaussian' (tree aggregation's analysis holds one clip for the whole tree)")
    if p.user_clip_quantile > 0 and p.user_noise_multiplier > 0:
        count_noise = p.user_clip_count_noise or fed.clients_per_round / 20
        if count_noise <= p.user_noise_multiplier / 2:
            raise ConfigError(
                f"privacy.user_clip_count_noise: must be > privacy.user_noise_multiplier / 2 = "
                f"{p.user_noise_multiplier / 2:g} for adaptive clipping (Andrew et al. 2021: the count's noise would "
                f"take the whole budget), got {count_noise:g}"
                + (" (clients_per_round / 20, the default)" if not p.user_clip_count_noise else ""))


def secagg_shares(cfg: Config) -> tuple[int, int]:
    """(shares, threshold) of SecAgg+ for a full round, 0s resolved as Flower resolves its
    fractions 1.0 and 0.5 (`SecAggPlusWorkflow.setup_stage`)."""
    p, k = cfg.privacy, cfg.federation.clients_per_round
    shares = p.secagg_num_shares or k
    return shares, p.secagg_threshold or max(round(0.5 * shares), 2)


def _check_secure_aggregation(cfg: Config) -> None:
    """What secure aggregation needs (fedsim.secure_aggregation, docs/privacy.md)."""
    p, fed = cfg.privacy, cfg.federation
    if not p.secure_aggregation:
        return
    algorithm = get_algorithm(cfg.strategy.name)
    if not algorithm.secure_aggregation:
        reason = algorithm.secure_aggregation_refused or "its registry entry does not declare secure_aggregation"
        raise ConfigError(f"privacy.secure_aggregation: strategy {cfg.strategy.name!r} cannot work from the sum of "
                          f"the updates: {reason}")
    if fed.clients_per_round < 2:
        raise ConfigError(f"federation.clients_per_round: secure aggregation needs at least 2 (got "
                          f"{fed.clients_per_round}): the sum of one update is that update")
    q, m = p.secagg_quantization_range, p.secagg_modulus
    if m & (m - 1) or m <= q:
        raise ConfigError(f"privacy.secagg_modulus: must be a power of 2 above privacy.secagg_quantization_range "
                          f"({q}), got {m}")
    if fed.clients_per_round * q >= m:
        raise ConfigError(f"privacy.secagg_modulus: federation.clients_per_round x privacy.secagg_quantization_range "
                          f"= {fed.clients_per_round * q} must be below it ({m}), or the masked sum wraps around")
    if p.secagg_num_shares and not 3 <= p.secagg_num_shares <= fed.clients_per_round:
        raise ConfigError(f"privacy.secagg_num_shares: must be 0 (the whole round) or between 3 and "
                          f"federation.clients_per_round ({fed.clients_per_round}), got {p.secagg_num_shares}")
    shares, _ = secagg_shares(cfg)
    if p.secagg_threshold and not 2 <= p.secagg_threshold < shares:
        raise ConfigError(f"privacy.secagg_threshold: must be 0 (half the shares) or at least 2 and below the shares "
                          f"({shares}), got {p.secagg_threshold}")
    if not _user_dp(cfg):
        return
    where = "under privacy.secure_aggregation, where the server sees only the noised sum"
    if algorithm.label_privacy(cfg.strategy.params, p.delta) is not None:
        reason = algorithm.central_dp_refused or "it states a label-level guarantee"
        raise ConfigError(f"privacy.user_noise_multiplier: user-level noise does not apply to strategy "
                          f"{cfg.strategy.name!r}: {reason}")
    if p.user_clipping != "client":
        raise ConfigError(f"privacy.user_clipping: must be 'client' {where} and cannot clip "
                          f"(got {p.user_clipping!r})")
    if p.user_clip_quantile > 0:
        raise ConfigError(f"privacy.user_clip_quantile: must be 0 (fixed clipping) {where}: adaptive clipping "
                          f"needs each client's unclipped bit")
    if p.user_mechanism != "gaussian":
        raise ConfigError(f"privacy.user_mechanism: must be 'gaussian' {where}: each client adds a share of one "
                          f"round's Gaussian noise")
    if p.noise_cohort_size:
        raise ConfigError(f"privacy.noise_cohort_size: must be 0 {where}: the clients add the noise")
    if fed.sampling not in ("auto", "fixed"):
        raise ConfigError(f"federation.sampling: must be 'fixed' (or auto) {where}: each client's share is "
                          f"sigma C / sqrt(clients_per_round), so the round needs that many clients "
                          f"(got {fed.sampling!r})")


def config_from_dict(raw: dict) -> Config:
    """Validate a nested dict (as TOML gives it) into a Config."""
    cfg = _build(Config, raw, "")
    _resolve_defaults(cfg, raw)
    _check_consistency(cfg)
    return cfg


# --------------------------------------------------------------------------- keys that do nothing

def _dp(cfg: Config) -> bool:
    return cfg.privacy.noise_multiplier > 0 or cfg.privacy.target_epsilon > 0


def _user_dp(cfg: Config) -> bool:
    return cfg.privacy.user_noise_multiplier > 0 or cfg.privacy.user_target_epsilon > 0


def _label_delta(cfg: Config) -> float:
    """The delta of the algorithm's label-level guarantee (Gaussian bag means), or 0."""
    statement = get_algorithm(cfg.strategy.name).label_privacy(cfg.strategy.params, cfg.privacy.delta)
    return float((statement or {}).get("delta") or 0.0)


def _is_text(cfg: Config) -> bool:
    return cfg.data.dataset == "text-topics" or (cfg.data.dataset == "file" and bool(cfg.data.text_column))


# (keys, is read(cfg), when it is read, what it is here): a key the user sets that the run
# never reads is reported by `unused_keys`. Only built-in behaviour is listed: a registered
# model may read any model.* key, so model keys are listed for built-in model names only.
BUILTIN_MODELS = ("logreg", "linear", "mlp", "cnn", "lora-mlp", "hf-text")
_UNUSED_RULES: tuple[tuple[tuple[str, ...], Callable[[Config], bool], str, Callable[[Config], str]], ...] = (
    (("data.alpha",), lambda c: c.data.partitioner == "dirichlet",
     "data.partitioner = 'dirichlet'", lambda c: f"data.partitioner is {c.data.partitioner!r}"),
    (("data.classes_per_client",), lambda c: c.data.partitioner in ("shard", "pathological", "iid-mix"),
     "data.partitioner is 'shard', 'pathological' or 'iid-mix'",
     lambda c: f"data.partitioner is {c.data.partitioner!r}"),
    (("data.iid_fraction",), lambda c: c.data.partitioner == "iid-mix",
     "data.partitioner = 'iid-mix'", lambda c: f"data.partitioner is {c.data.partitioner!r}"),
    (("data.quantity_power",), lambda c: c.data.partitioner == "quantity",
     "data.partitioner = 'quantity'", lambda c: f"data.partitioner is {c.data.partitioner!r}"),
    (("data.natural_id_column",), lambda c: c.data.partitioner == "natural-id" and c.data.dataset == "file",
     "data.partitioner = 'natural-id' on a user file",
     lambda c: f"data.partitioner is {c.data.partitioner!r}, data.dataset {c.data.dataset!r}"),
    (("data.feature_shift", "data.feature_noise"), lambda c: c.data.partitioner == "feature-skew",
     "data.partitioner = 'feature-skew'", lambda c: f"data.partitioner is {c.data.partitioner!r}"),
    (("data.synthetic_alpha", "data.synthetic_beta"), lambda c: c.data.dataset == "synthetic",
     "data.dataset = 'synthetic'", lambda c: f"data.dataset is {c.data.dataset!r}"),
    (("data.synthetic_samples",), lambda c: c.data.dataset in GENERATED_DATASETS,
     f"data.dataset is one of {', '.join(GENERATED_DATASETS)}", lambda c: f"data.dataset is {c.data.dataset!r}"),
    (("data.linear_dim", "data.linear_noise"), lambda c: c.data.dataset == "linear",
     "data.dataset = 'linear'", lambda c: f"data.dataset is {c.data.dataset!r}"),
    (("data.path", "data.label_column", "data.text_column", "data.drop_columns"), lambda c: c.data.dataset == "file",
     "data.dataset = 'file'", lambda c: f"data.dataset is {c.data.dataset!r}"),
    (("data.tokenizer", "data.max_length"), _is_text,
     "the data is text (data.dataset = 'text-topics', or a file with data.text_column)",
     lambda c: f"data.dataset is {c.data.dataset!r}"),
    (("model.hidden",), lambda c: c.model.name in ("mlp", "lora-mlp") or c.model.name not in BUILTIN_MODELS,
     "model.name is 'mlp' or 'lora-mlp'", lambda c: f"model.name is {c.model.name!r}"),
    (("model.lora_rank", "model.lora_alpha", "model.lora_dropout", "model.lora_targets", "model.lora_init"),
     lambda c: c.model.name in ("lora-mlp", "hf-text") or c.model.name not in BUILTIN_MODELS,
     "model.name is a LoRA model (lora-..., hf-text)", lambda c: f"model.name is {c.model.name!r}"),
    (("model.pretrain_classes", "model.pretrain_epochs"),
     lambda c: c.model.name == "lora-mlp" or c.model.name not in BUILTIN_MODELS,
     "model.name = 'lora-mlp'", lambda c: f"model.name is {c.model.name!r}"),
    (("model.pretrained_path",), lambda c: c.model.name == "hf-text" or c.model.name not in BUILTIN_MODELS,
     "model.name = 'hf-text'", lambda c: f"model.name is {c.model.name!r}"),
    (("client.local_epochs",), lambda c: c.client.local_steps == 0,
     "client.local_steps = 0", lambda c: f"client.local_steps is {c.client.local_steps}"),
    (("privacy.max_grad_norm",), _dp, "DP-SGD is on (privacy.noise_multiplier or privacy.target_epsilon > 0)",
     lambda c: "both are 0: no per-sample clipping"),
    (("privacy.noise_multiplier",), lambda c: c.privacy.target_epsilon == 0, "privacy.target_epsilon = 0",
     lambda c: f"privacy.target_epsilon is {c.privacy.target_epsilon:g}: calibration sets sigma"),
    (("privacy.calibration",), lambda c: c.privacy.target_epsilon > 0, "privacy.target_epsilon > 0",
     lambda c: "privacy.target_epsilon is 0: nothing is calibrated"),
    (("privacy.user_clip",), _user_dp,
     "user-level DP is on (privacy.user_noise_multiplier or privacy.user_target_epsilon > 0)",
     lambda c: "both are 0"),
    (("privacy.user_clipping", "privacy.user_clip_quantile", "privacy.noise_cohort_size",
      "privacy.user_mechanism"), _user_dp,
     "user-level DP is on (privacy.user_noise_multiplier or privacy.user_target_epsilon > 0)",
     lambda c: "both are 0"),
    (("privacy.min_cohort",), lambda c: _user_dp(c) or c.privacy.secure_aggregation,
     "user-level DP or secure aggregation is on", lambda c: "neither is"),
    (("privacy.secagg_clipping_range", "privacy.secagg_quantization_range", "privacy.secagg_modulus",
      "privacy.secagg_num_shares", "privacy.secagg_threshold"), lambda c: c.privacy.secure_aggregation,
     "privacy.secure_aggregation = true", lambda c: "it is false"),
    (("privacy.user_clip_lr", "privacy.user_clip_count_noise"),
     lambda c: _user_dp(c) and c.privacy.user_clip_quantile > 0,
     "adaptive clipping is on (user-level DP and privacy.user_clip_quantile > 0)",
     lambda c: "privacy.user_clip_quantile is 0" if _user_dp(c) else "user-level DP is off"),
    (("privacy.user_tree_restart",), lambda c: _user_dp(c) and c.privacy.user_mechanism == "tree",
     "privacy.user_mechanism = 'tree' under user-level DP",
     lambda c: f"privacy.user_mechanism is {c.privacy.user_mechanism!r}" if _user_dp(c) else "user-level DP is off"),
    (("privacy.user_noise_multiplier",), lambda c: c.privacy.user_target_epsilon == 0,
     "privacy.user_target_epsilon = 0",
     lambda c: f"privacy.user_target_epsilon is {c.privacy.user_target_epsilon:g}: calibration sets it"),
    (("privacy.accountant", "privacy.secure_noise"), lambda c: _dp(c) or _user_dp(c),
     "sample- or user-level DP is on", lambda c: "no noise is configured"),
    (("privacy.delta",), lambda c: _dp(c) or _user_dp(c) or _label_delta(c) > 0,
     "some guarantee has a delta (DP-SGD, user-level DP, Gaussian label DP)", lambda c: "none is on"),
    (("runtime.num_cpus", "runtime.num_gpus"), lambda c: c.runtime.name == "flower",
     "runtime.name = 'flower'", lambda c: f"runtime.name is {c.runtime.name!r}"),
    (("runtime.workers", "runtime.worker_gpus"), lambda c: c.runtime.name == "ray",
     "runtime.name = 'ray'", lambda c: f"runtime.name is {c.runtime.name!r}"),
    (("runtime.engine_chunk",), lambda c: c.runtime.name != "flower" and c.runtime.engine != "opacus",
     "the vectorized engine trains whole rounds (runtime.engine auto or vectorized, in-process or ray; "
     "Flower's engine delivers one client at a time)",
     lambda c: f"runtime.engine is {c.runtime.engine!r}, runtime.name {c.runtime.name!r}"),
)


def _set_keys(raw: dict, prefix: str = "") -> list[str]:
    """Every dotted key `raw` sets; an empty table counts as a key of its own."""
    keys = []
    for name, value in raw.items():
        if isinstance(value, dict) and value:
            keys += _set_keys(value, f"{prefix}{name}.")
        else:
            keys.append(prefix + name)
    return keys


def _is_resolved(keys: set[str]) -> bool:
    """A run directory's config.toml (`dumps_toml`) sets every key of every section: its keys were
    checked when that run started, and a resumed or repeated run should not hear about them again."""
    every = {key for key, *_ in _describe(Config(), "", tables=False)}
    return every <= keys


def unused_keys(raw: dict, cfg: Config) -> dict[str, str]:
    """Keys that `raw` (the file plus overrides) sets but the run described by `cfg` never reads,
    each with the reason: an algorithm table other than strategy.name's, a partitioner's knob
    under another partitioner, sigma under a target epsilon, clipping without noise...
    None for a resolved config.toml, which lists every key."""
    rules = {key: rule for rule in _UNUSED_RULES for key in rule[0]}
    keys = _set_keys(raw)
    if _is_resolved(set(keys)):
        return {}
    out = {}
    for key in keys:
        parts = key.split(".")
        if parts[0] == "strategy" and len(parts) >= 2 and parts[1] != "name" and parts[1] != cfg.strategy.name:
            out[key] = f"read only when strategy.name = {parts[1]!r}; strategy.name is {cfg.strategy.name!r}"
        elif key in rules:
            _, used, when, here = rules[key]
            if not used(cfg):
                out[key] = f"read only when {when}; {here(cfg)}"
    return out


def report_unused(unused: dict[str, str], strict: bool) -> None:
    """A warning per key that does nothing, or (strict) one error naming the first."""
    if not unused:
        return
    if strict:
        key, why = next(iter(unused.items()))
        more = f" (and {len(unused) - 1} more unused keys)" if len(unused) > 1 else ""
        raise ConfigError(f"{key}: has no effect: {why}{more}; strict mode refuses keys that do nothing")
    for key, why in unused.items():
        log.warning("%s: has no effect: %s (--strict refuses it)", key, why)


# --------------------------------------------------------------------------- checks that need the data

def check_delta(delta: float, n: int, what: str = "samples in the largest client") -> None:
    """delta < 1/n: at delta >= 1/n the mechanism that publishes each of n records with probability
    delta is (0, delta)-DP, yet releases a record in expectation, so the guarantee means nothing.
    `n` is the number of protected units (records of the largest client; clients for user-level DP)."""
    if n >= 1 and delta >= 1.0 / n:
        raise ConfigError(f"privacy.delta: must be < 1/n = {1.0 / n:.3g}, n = {n} {what} (got {delta:g}); at "
                          f"delta >= 1/n, publishing each record with probability delta is (0, delta)-DP, so the "
                          f"guarantee would permit releasing a whole record")


def check_device(device: str) -> None:
    """An explicit ``runtime.device = "cuda"`` on a machine without one is refused up front."""
    if device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        raise ConfigError("runtime.device: 'cuda' but no CUDA device is available on this machine; "
                          "allowed here: auto, cpu")


def check_before_training(cfg: Config, sizes: list[int]) -> None:
    """What validation can tell only with the partition in hand (client sizes) and on the
    machine that trains: delta against the number of protected units, the device."""
    check_device(cfg.runtime.device)
    if sizes and (_dp(cfg) or _label_delta(cfg) > 0):
        check_delta(cfg.privacy.delta, max(sizes))
    if _user_dp(cfg):
        check_delta(cfg.privacy.delta, cfg.federation.num_clients, "clients (user-level DP protects a client)")


def config_to_dict(cfg: Config) -> dict:
    """The config as nested plain values, each algorithm table under ``strategy.<name>``."""
    out = dataclasses.asdict(cfg)
    tables = out["strategy"].pop("tables")
    out["strategy"].update(tables)
    return out


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/, installed as fedsim/configs
# A Flower app bundle (`flwr run .` from a checkout) copies the repository but drops the
# fedsim/configs symlink: there the experiments are the bundle's own configs/.
APP_CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def builtin_configs() -> dict[str, Path]:
    """The example experiments shipped with fedsim, by name (``quickstart`` ->
    ``configs/quickstart.toml``). Installed, they are package data of ``fedsim.configs``; in
    a checkout, ``fedsim/configs`` links to the repository's ``configs/``; in a Flower app
    bundle, which keeps no symlink, they are the bundle's ``configs/``."""
    in_app = (APP_CONFIGS.parent / "pyproject.toml").is_file()  # a bundle or checkout, not site-packages
    folder = next((d for d in (SHIPPED_CONFIGS, APP_CONFIGS if in_app else None) if d and d.is_dir()), None)
    if folder is None:
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.toml"))}


def resolve_config_path(path: str | Path) -> Path:
    """A config argument as a file: the path itself when it exists; else a shipped experiment
    named by it, as ``quickstart`` or as the repository path ``configs/quickstart.toml`` (what
    the README says, run from outside a checkout). Anything else is returned as given, and
    `read_toml` refuses it naming the shipped experiments."""
    p = Path(path)
    if p.exists():
        return p
    name = p.stem if p.suffix == ".toml" else p.name
    shipped = builtin_configs().get(name)
    if shipped is not None and (p.parent == Path(".") and p.suffix in ("", ".toml") or
                                p.parent == Path("configs") and p.suffix == ".toml"):
        return shipped
    return p


def read_toml(path: str | Path, what: str = "config") -> dict:
    """A TOML file as a dict; anything that is not a readable TOML text is one line.

    A missing file is bad input (exit 2); a file that cannot be read (a directory, no
    permission) an `InputFileError` (exit 1). Deeply nested arrays exhaust tomllib's recursion."""
    p = resolve_config_path(path)
    if p.is_dir():
        raise ConfigError(f"{what}: {p} is a directory; give a TOML file (or a shipped experiment's name)")
    if not p.exists():
        shipped = ", ".join(builtin_configs())
        raise ConfigError(f"{what}: file not found: {p}" + (f" (shipped experiments, by name: {shipped}; "
                                                             f"`fedsim init` copies one here)" if shipped else ""))
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputFileError(f"{what}: cannot read {p}: {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8-sig")  # a byte-order mark, as some Windows editors write, is no statement
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{what}: {p} is not a TOML text file (not UTF-8 at byte {exc.start})") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{what}: {p} is not valid TOML: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{what}: {p} is not valid TOML: nested too deeply") from None


def read_experiment(path: str | Path | None, overrides: dict[str, Any] | None = None) -> dict:
    """The raw experiment: the TOML file (without its ``[sweep]`` table) with dotted-key
    overrides applied, before validation. `unused_keys` reads which keys it sets."""
    raw = read_toml(path) if path is not None else {}
    raw.pop("sweep", None)  # read by `fedsim sweep`, not part of one run
    _check_overridden(raw, overrides or {}, path)
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return raw


def _check_overridden(raw: dict, overrides: Mapping[str, Any], path: str | Path | None) -> None:
    """The file's values that overrides replace are still checked, each on its own: a wrong value
    in the file (``rounds = nan``) is refused, not silently hidden by ``--rounds 1``."""
    shadow: dict = {}
    for key, value in flatten(raw).items():
        parts = key.split(".")  # the key itself or a table around it may be overridden
        if any(".".join(parts[:i]) in overrides for i in range(1, len(parts) + 1)):
            set_dotted(shadow, key, value)
    if shadow:
        try:
            _build(Config, shadow, "")
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in {path}, which the command line overrides: fix or remove it there)") \
                from None


def load_config(path: str | Path | None, overrides: dict[str, Any] | None = None, *,
                strict: bool = False) -> Config:
    """Load a TOML experiment, apply dotted-key overrides, validate everything.

    A key that is set but does nothing for this experiment (`unused_keys`) is a warning, or
    with ``strict=True`` an error (the CLI's ``--strict``)."""
    raw = read_experiment(path, overrides)
    cfg = config_from_dict(raw)
    report_unused(_unused_by_choice(unused_keys(raw, cfg), path, overrides or {}), strict)
    return cfg


def _unused_by_choice(unused: dict[str, str], path: str | Path | None, overrides: Mapping[str, Any]) -> dict[str, str]:
    """`unused` without the file's keys that only the command line made moot: `--target-epsilon 3`
    on a file that sets privacy.noise_multiplier replaces sigma on purpose (the README's own
    example), whereas a key the file sets in vain by itself is still named."""
    moot = [key for key in unused if key not in overrides]
    if not moot or not overrides or path is None:
        return unused
    try:
        file_only = read_experiment(path)
        in_vain = unused_keys(file_only, config_from_dict(file_only))
    except ConfigError:  # the file alone is not a valid experiment: name every key
        return unused
    return {key: why for key, why in unused.items() if key in overrides or key in in_vain}


def flatten(nested: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict by dotted keys, ``{"client": {"lr": 0.1}}`` -> ``{"client.lr": 0.1}``:
    the form the CLI's ``--set``, sweep cells, reports and trackers name keys in (the inverse
    of `set_dotted`)."""
    out: dict[str, Any] = {}
    for key, value in nested.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``section.key`` in a nested dict, refusing unknown sections up front."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{_key(part)}: expected a [{_key(part)}] table, got {_show(node)} (so {_key(key)} "
                              f"cannot be set)")
    node[parts[-1]] = value


def parse_value(text: str) -> Any:
    """Parse a CLI override value as a TOML literal; bare words stay strings."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def parse_assignment(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"--set: expected section.key=value, got {_show(text)}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value.strip())


def dumps_toml(cfg: Config) -> str:
    """Serialize a Config back to TOML (what `config.toml` in a run dir holds)."""
    import tomli_w

    return tomli_w.dumps(config_to_dict(cfg))


def loads_toml(text: str, what: str = "config") -> Config:
    """A Config from TOML text that fedsim wrote (a run's config.toml, a checkpoint's copy):
    text damaged on disk is one line naming `what`, not a parser's traceback."""
    try:
        raw = tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise ConfigError(f"{what}: the saved experiment is not valid TOML ({exc}); the file was damaged") from None
    return config_from_dict(raw)


def _describe(obj: Any, prefix: str, tables: bool = True) -> list[tuple[str, str, Any, str]]:
    hints = _type_hints(type(obj))
    rows = []
    for f in fields(obj):
        if f.name == "tables":
            continue
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            rows += _describe(value, f"{prefix}{f.name}.", tables)
        else:
            rows.append((prefix + f.name, _type_name(hints[f.name]), value, _allowed_text(f.metadata)))
        if isinstance(obj, StrategyConfig) and f.name == "name" and tables:
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
    """Help text plus the allowed values: choices, bounds or pattern (from the same metadata
    validation uses)."""
    text = meta.get("help", "")
    choices = _choices(meta)
    bounds = []
    if meta.get("lo") is not None:
        bounds.append(f"{'>' if meta.get('lo_open') else '>='} {_number(meta['lo'])}")
    if meta.get("hi") is not None:
        bounds.append(f"{'<' if meta.get('hi_open') else '<='} {_number(meta['hi'])}")
    if choices:
        text += f" ({' | '.join(choices)})"
    elif bounds:
        text += f" ({', '.join(bounds)})"
    elif meta.get("pattern"):
        text += f" (matching `{meta['pattern'].strip('^$')}`)"
    return text


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"
