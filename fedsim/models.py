"""Model registry: models are chosen by name in config.

The registry is open (`register_model`) so that other modules, like the LoRA
wrappers for FedSVD (`fedsim.lora_models`, registered by ``import fedsim``), add names
without touching this file. Every model is
Opacus-compatible: GroupNorm instead of BatchNorm, no in-place tricks.
"""

from __future__ import annotations

import contextlib
import functools
import copy
import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from fedsim.algorithms import load_registered
from fedsim.caches import Key, cached, frozen
from fedsim.config import ModelConfig
from fedsim.datasets import Dataset
from fedsim.errors import ConfigError

ModelBuilder = Callable[..., nn.Module]  # (cfg, data, cache_dir) -> module
_REGISTRY: dict[str, ModelBuilder] = {}


def register_model(name: str) -> Callable[[ModelBuilder], ModelBuilder]:
    def wrap(builder: ModelBuilder) -> ModelBuilder:
        _REGISTRY[name] = builder
        return builder
    return wrap


def model_names() -> list[str]:
    load_registered()  # the LoRA models register with the built-in algorithms
    return sorted(_REGISTRY)


@contextlib.contextmanager
def seeded_cpu_rng(seed: int) -> Iterator[None]:
    """Draw from the CPU generator seeded with `seed` inside, restoring its state after.

    Only the CPU generator, where module init draws: torch.manual_seed also seeds CUDA
    lazily, which costs milliseconds per call and adds up over client-rounds.
    """
    state = torch.get_rng_state()
    torch.default_generator.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(state)


SLOW_BUILD_SECONDS = 0.02  # slower than this to build: keep one and deep-copy it instead


def build_model(cfg: ModelConfig, data: Dataset, seed: int, cache_dir: str = "") -> nn.Module:
    """Build a model with a seeded initialization, identical on every client and the server.

    `cache_dir` (the run directory) is where models with a pretrained part keep it.
    Every client-round needs a fresh copy of the same initial model. One that is slow to
    build (hf-text loads pretrained weights: ~0.3 s) is built once per process and
    deep-copied after; a small one is built again, which is cheaper than a deep copy
    (MLP(64): 0.21 ms against 0.36 ms).
    """
    load_registered()
    if cfg.name not in _REGISTRY:
        raise ConfigError(f"model.name: must be one of {', '.join(model_names())} (got {cfg.name!r})")
    key = Key((frozen(cfg), data.name, data.input_shape, data.num_classes, data.tokenizer, seed, cache_dir),
              payload=data)
    template = _slow_template(key)
    if template is None:  # fast to build: building again is cheaper than copying
        return _build(cfg, data, seed, cache_dir)
    return copy.deepcopy(template)


def _build(cfg: ModelConfig, data: Dataset, seed: int, cache_dir: str) -> nn.Module:
    with seeded_cpu_rng(seed):
        return _REGISTRY[cfg.name](cfg, data, cache_dir=cache_dir)


@cached(maxsize=4)
def _slow_template(key: Key) -> nn.Module | None:
    """The model of `key`, kept if it took longer than SLOW_BUILD_SECONDS to build, else None.

    The key holds the config snapshot, the dataset's name and shapes (what a builder reads),
    the seed and the run directory; the dataset itself rides in the payload."""
    cfg, data, seed, cache_dir = key.value[0].thaw(), key.payload, key.value[5], key.value[6]
    start = time.perf_counter()
    model = _build(cfg, data, seed, cache_dir)
    return model if time.perf_counter() - start > SLOW_BUILD_SECONDS else None


class Reshape(nn.Module):
    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], *self.shape)


@register_model("logreg")
@register_model("linear")
def _linear(cfg: ModelConfig, data: Dataset, cache_dir: str = "") -> nn.Module:
    """Logistic regression (classification) or linear regression: one Linear layer."""
    return nn.Sequential(nn.Flatten(), nn.Linear(data.num_features, data.num_classes))


def mlp(in_features: int, hidden: list[int], out_features: int) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Flatten()]
    width = in_features
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers.append(nn.Linear(width, out_features))
    return nn.Sequential(*layers)


@register_model("mlp")
def _mlp(cfg: ModelConfig, data: Dataset, cache_dir: str = "") -> nn.Module:
    return mlp(data.num_features, cfg.hidden, data.num_classes)


@register_model("cnn")
def _cnn(cfg: ModelConfig, data: Dataset, cache_dir: str = "") -> nn.Module:
    """Two conv blocks with GroupNorm (Opacus rejects BatchNorm) and a linear head."""
    if len(data.input_shape) != 3:
        raise ConfigError(f"model.name: 'cnn' needs image data (channels, height, width); "
                          f"{data.name} has per-sample shape {data.input_shape}")
    channels = data.input_shape[0]
    return nn.Sequential(
        Reshape(data.input_shape),
        nn.Conv2d(channels, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.GroupNorm(4, 32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, data.num_classes),
    )


def as_tensors(x, y, task: str, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs as float32 and labels as `loss_fn(task)` takes them (class indices as int64,
    regression targets as float32), on `device`; tensors already so are not copied."""
    labels = torch.long if task == "classification" else torch.float32
    return torch.as_tensor(x, dtype=torch.float32, device=device), torch.as_tensor(y, dtype=labels, device=device)


def loss_fn(task: str, reduction: str = "mean") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """Cross-entropy for classification, squared error for regression; ``reduction="none"``
    gives one loss per sample (the vectorized engine masks padded rows with it)."""
    if task == "classification":
        return functools.partial(nn.functional.cross_entropy, reduction=reduction)
    return lambda out, y: nn.functional.mse_loss(out.squeeze(-1), y, reduction=reduction)

