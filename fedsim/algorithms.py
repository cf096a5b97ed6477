"""The algorithm registry: one name -> (params class, strategy builder, client rule).

An algorithm is two files and one registry line (`fedsim.registry`):

* ``strategies/<name>.py``: the server half, a Flower `Strategy`, with its parameters as a
  frozen dataclass beside it (the ``[strategy.<name>]`` table of an experiment) and a
  ``build(params, cfg, fedavg_kwargs)`` function;
* ``clients/<name>.py``: the client half, a `ClientRule` of small pure functions.

Both halves meet only here, in the core: strategies and clients never import each other.
The registry is filled by the application (`fedsim.registry`, imported by ``import fedsim``);
`register_algorithm` adds a user's own algorithm the same way.

Why pure functions over tensor dicts: the same rule then runs under the Opacus engine, one
client at a time on an `nn.Module`, and under the vectorized engine, which stacks many
clients' parameters and applies the rule with `torch.func.vmap`. A rule never touches a
model, an optimizer or Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

if TYPE_CHECKING:  # torch is imported where tensors are made: `import fedsim` (and the CLI's
    # --help, report, status) stays free of torch's 1.2 s import
    import torch
    from torch import nn

Tensors = dict[str, "torch.Tensor"]  # parameter name -> tensor (one client, or stacked clients)
State = dict[str, Any]  # a rule's per-client tensors: a nested dict of tensors (a pytree)
# What a node keeps from one of its rounds to its next (SCAFFOLD's c_i): a flat dict of CPU
# tensors, the same type into a rule (`RoundStart.node_state`) and out of it (`finish`).
# The ClientApp stores it in the node's Flower state as an ArrayRecord (and checkpoints it).
NodeState = dict[str, "torch.Tensor"]
P = TypeVar("P")  # an algorithm's params dataclass (its [strategy.<name>] table)


def tree_map(fn: Callable[[Any], Any], tree: Any) -> Any:
    """`fn` applied to every leaf of a nested dict (a rule's `State`), keeping its shape."""
    if isinstance(tree, dict):
        return {k: tree_map(fn, v) for k, v in tree.items()}
    return fn(tree)

TRAINABLE_GROUPS = ("all", "lora", "lora-b")


@dataclass(frozen=True)
class Hyper(Generic[P]):
    """The scalars every client of a round shares: the algorithm's params and the local settings.

    Generic in the params type, so a rule's hooks can say what they read. A client half never
    imports its server half's params class, so it names the fields it reads in a
    `typing.Protocol` (`fedsim.clients.fedprox`: ``Hyper[ProxParams]``, with ``mu: float``).
    """

    params: P  # the algorithm's params dataclass (its [strategy.<name>] table)
    lr: float
    private: bool  # DP-SGD is on (sigma > 0)


@dataclass(frozen=True)
class RoundStart:
    """What a client rule sees when a round starts (CPU tensors, read-only).

    ``global_params``: the trainable tensors as the server sent them (the round's start point);
    ``server_arrays``: extra arrays the strategy sent beside the model (SCAFFOLD's c);
    ``node_state``: what this node kept after its last round (SCAFFOLD's c_i): the
    `NodeState` its rule's `finish` returned last time it trained, ``{}`` before that.
    """

    hyper: Hyper[Any]
    global_params: Tensors
    server_arrays: Tensors
    node_state: NodeState


@dataclass
class TrainSettings:
    """Everything the local loop needs to know, independent of Flower."""

    task: str
    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    noise_multiplier: float = 0.0
    max_grad_norm: float = 1.0
    device: str = "cpu"
    # Engine tests only: with sigma = 0 and given batches, still clip per sample through
    # Opacus (make_private at noise 0), the DP-SGD reference for the vectorized engine.
    dp_reference: bool = False
    # privacy.secure_noise resolved: DP-SGD noise and Poisson masks from OS-CSPRNG state, not from the
    # seed (`fedsim.privacy.secure_noise`)
    secure_noise: bool = False


@dataclass
class LocalResult:
    num_examples: int
    steps: int
    mean_loss: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    sample_rate: float = 1.0


@dataclass
class LocalTask:
    """One client's round for a rule with its own local loop (`ClientRule.local_train`)."""

    model: nn.Module
    x: np.ndarray
    y: np.ndarray
    settings: TrainSettings
    hyper: Hyper[Any]
    partition_id: int
    seed: int  # this round's seed for this client
    experiment_seed: int
    delta: float
    num_classes: int


def resolve_device(name: str) -> str:
    if name == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def seed_everything(seed: int, device: str) -> None:
    """Seed the generators local training draws from (sampling, noise, dropout).
    The CUDA generator only when training there: seeding it costs ms per call."""
    import torch

    torch.default_generator.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)


def _none(*_args: Any) -> None:
    return None


@dataclass(frozen=True)
class ClientRule:
    """The client half of an algorithm. Every hook is optional; the defaults are FedAvg's.

    trainable / upload
        Which tensors the client trains and returns: ``all``, ``lora`` (A and B) or
        ``lora-b``. Frozen tensors get no gradient and no DP noise.
    setup(start) -> state
        The per-client tensors the step hooks read (FedProx's anchor, SCAFFOLD's c - c_i).
        The vectorized engine stacks them over clients.
    loss_term(logits, mask, state, hyper) -> scalar
        A term added to the mean task loss of a batch (FedLD's margin control). ``mask`` is
        None for a batch of real samples, or a (B,) 0/1 float tensor marking the real rows of
        a padded batch. Under DP-SGD it is evaluated per sample (a batch of one), so it must
        be separable over samples to be clipped correctly.
    post_step(new, old, state, hyper) -> new'
        A data-independent correction after each optimizer step, from the parameters after
        (``new``) and before (``old``) the step (FedProx's pull, SCAFFOLD's drift). Applied
        after the noisy step, it is post-processing and costs no privacy.
    finish(start, state, final, steps, hyper) -> (reply arrays, node state)
        After training, from the round's start, the rule's ``state``, the trained tensors
        ``final`` (CPU) and the number of optimizer steps taken: the extra arrays to send the
        server beside the model (SCAFFOLD's delta c_i; ``{}``: none) and the `NodeState` to
        keep for this node's next round (SCAFFOLD's c_i+), both as flat dicts of CPU tensors.
        A node state of ``{}`` keeps the node's previous state as it was (there is no way to
        clear it; return zeros instead); a non-empty one replaces it as a whole.
    local_train(task) -> LocalResult
        Replaces the DP-SGD loop altogether (learning from bags). The Opacus engine runs it
        one client at a time, training ``task.model`` in place.
    local_train_batched(tasks, chunk) -> [(LocalResult, final tensors)]
        The same loop for a round's clients at once, so that the vectorized engine can train
        a rule with its own loop (otherwise such a rule falls back to Opacus, one client at a
        time). ``tasks`` share one model, settings and hyper (one round, the same arrays
        sent); the model is read-only. ``chunk`` caps the clients per batched computation
        (0: the rule chooses); results must not depend on it. Each client gets what
        ``local_train`` would give: its `LocalResult` and its trainable tensors after
        training, on the CPU. Needs ``local_train`` beside it.
    """

    trainable: str = "all"
    upload: str = "all"
    setup: Callable[[RoundStart], State] | None = None
    loss_term: Callable[[torch.Tensor, torch.Tensor | None, State, Hyper[Any]], torch.Tensor] | None = None
    post_step: Callable[[Tensors, Tensors, State, Hyper[Any]], Tensors] | None = None
    finish: Callable[[RoundStart, State, Tensors, int, Hyper[Any]], tuple[Tensors, NodeState]] | None = None
    local_train: Callable[[LocalTask], LocalResult] | None = None
    local_train_batched: Callable[[list[LocalTask], int], list[tuple[LocalResult, Tensors]]] | None = None

    def __post_init__(self) -> None:
        for name in ("trainable", "upload"):
            if getattr(self, name) not in TRAINABLE_GROUPS:
                raise ValueError(f"ClientRule.{name}: must be one of {', '.join(TRAINABLE_GROUPS)}")
        if self.local_train_batched is not None and self.local_train is None:
            raise ValueError("ClientRule.local_train_batched: a batched loop needs local_train beside it "
                             "(the Opacus engine runs one client at a time)")


@dataclass(frozen=True)
class Algorithm:
    """One registry entry.

    name          the value of ``strategy.name``; also the name of its config table.
    params        a frozen dataclass whose fields are the ``[strategy.<name>]`` keys, each
                  declared with `fedsim.config.param` (default, help, allowed values).
    build         ``build(params, cfg, fedavg_kwargs) -> flwr Strategy``.
    client        the `ClientRule`.
    check         optional ``check(params, cfg, data, client_sizes)``: rules between this
                  algorithm and the rest of the experiment, raising `ConfigError`.
    central_dp    user-level DP (`fedsim.central_dp`) is sound for it: its server step reads
                  the replies only through their mean (and, for arrays it sums, their sum).
    central_dp_refused  why not, where central DP is refused (one line the error shows).
    label_privacy optional ``label_privacy(params, delta) -> dict | None``: a label-level
                  privacy statement for summary.json (learning from bags).
    secure_aggregation  it can run under secure aggregation (`fedsim.secure_aggregation`): its
                  server step reads the replies only through their mean, their sum and their
                  count, which the sum and the number of replies give.
    secure_aggregation_refused  why not, where refused (one line the error shows).
    summary       one line for the run log: what the algorithm is.
    """

    name: str
    params: type
    build: Callable[..., Any]
    client: ClientRule = field(default_factory=ClientRule)
    check: Callable[..., None] = _none
    central_dp: bool = False
    central_dp_refused: str = ""
    label_privacy: Callable[[Any, float], Mapping | None] = _none
    summary: str = ""
    secure_aggregation: bool = False
    secure_aggregation_refused: str = ""


_REGISTRY: dict[str, Algorithm] = {}
_LOADERS: list[Callable[[], object]] = []


def add_registry_loader(load: Callable[[], object]) -> None:
    """Run `load` (which registers algorithms) before the first registry lookup.

    ``import fedsim`` adds the loader of the built-ins (`fedsim.registry`) this way instead of
    importing it: the core never imports the layers above it, and no module is half
    initialized when the registry is first read, whatever was imported first.
    """
    _LOADERS.append(load)


def load_registered() -> None:
    """Run pending loaders (the built-in algorithms and models); cheap once done."""
    while _LOADERS:
        _LOADERS.pop(0)()


def register_algorithm(algorithm: Algorithm, *, replace: bool = False) -> Algorithm:
    """Add an algorithm under ``algorithm.name``; a second one of the same name is refused."""
    if algorithm.name in _REGISTRY and not replace:
        raise ValueError(f"algorithm {algorithm.name!r} is registered already (pass replace=True)")
    _REGISTRY[algorithm.name] = algorithm
    return algorithm


def get_algorithm(name: str) -> Algorithm:
    """The algorithm registered under `name` (KeyError names the registered ones)."""
    load_registered()
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"no algorithm {name!r}; registered: {', '.join(algorithm_names())}") from None


def algorithm_names() -> list[str]:
    """Registered names, in registration order (built-ins first)."""
    load_registered()
    return list(_REGISTRY)


# ----------------------------------------------------------------------------- server state

def stateful_strategy(strategy: Any) -> Any | None:
    """The strategy that says what it keeps across rounds, or None if none does.

    A strategy exposes its state with two methods (the server half's only state hooks):

    ``state_dict() -> dict[str, np.ndarray]``
        Everything it carries from one round into the next, as named arrays (FedAdam's
        moments m_t and v_t, SCAFFOLD's server control c); ``{}`` for a stateless strategy.
    ``load_state_dict(state)``
        Takes that dict back, so the next ``configure_train`` continues as if never stopped.

    Checkpoints (`fedsim.checkpoint`) store it with the global model. fedsim's ``FedAvg``,
    which every built-in strategy extends, is stateless and defines both; a strategy that
    defines neither is not known to be resumable, so its runs write no checkpoint. Wrappers
    are looked through: fedsim's round seeding (``inner``) and Flower's DP wrappers
    (``strategy``).
    """
    while strategy is not None:
        if callable(getattr(strategy, "state_dict", None)) and callable(getattr(strategy, "load_state_dict", None)):
            return strategy
        strategy = getattr(strategy, "inner", None) or getattr(strategy, "strategy", None)
    return None


def strategy_state(strategy: Any) -> dict[str, np.ndarray]:
    """The named arrays a strategy keeps across rounds (see `stateful_strategy`)."""
    target = stateful_strategy(strategy)
    if target is None:
        raise TypeError(f"{type(strategy).__name__} does not expose its state (state_dict / load_state_dict)")
    return {k: np.asarray(v) for k, v in target.state_dict().items()}


def load_strategy_state(strategy: Any, state: Mapping[str, np.ndarray]) -> None:
    """Give a strategy back what `strategy_state` took from it."""
    target = stateful_strategy(strategy)
    if target is None:
        raise TypeError(f"{type(strategy).__name__} does not expose its state (state_dict / load_state_dict)")
    target.load_state_dict(dict(state))
