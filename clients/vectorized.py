"""The vectorized engine: a round's clients trained at once with `torch.func`, Opacus' semantics.

Opacus (`clients.trainer`) trains one client at a time: its own PrivacyEngine, DataLoader
and Python loop, tiny batches that leave a CPU's vector units and a GPU idle. Here the
clients of a round share one model template and one set of batched computations:
``vmap`` over clients of ``vmap(grad)`` over samples, with each client's parameters stacked
on a leading axis. The same `ClientRule` hooks run inside (``vmap`` over clients), so every
algorithm behaves as under Opacus.

The engine is three modules, one job each:

* `clients.vectorized_grads`: per-sample gradients and Opacus' clipping for chains of
  Linear and LoRA layers, without per-sample autograd (the dense and outer-product paths);
* `clients.vectorized_functional`: the model as pure functions of stacked tensors
  (`Functional`), which picks the fastest of those paths or the general ``vmap`` path;
* this module: the round loop (`train_clients`), with `draw_batch` for each step's batch.

DP-SGD exactly as Opacus 1.6 runs it (`opacus/privacy_engine.py`, `optimizers/optimizer.py`):

* Poisson sampling with q = 1/ceil(n/B) (`poisson_sample_rate`); each step draws
  ``rand(n) < q`` from the client's own generator. Only drawn samples get per-sample
  gradients: a step gathers them into a batch padded to the round's largest draw.
* per-sample gradients of each sample's own loss (task loss + the rule's loss term),
  clipped as a whole over all trainable tensors by min(1, C / (norm + 1e-6));
* the sum plus N(0, sigma^2 C^2) noise on every trainable tensor, an empty batch included;
* division by the expected batch size int(q n); SGD with momentum as configured;
* E * ceil(n/B) steps (or ``client.local_steps``), and the accountant history extended the
  way Opacus' RDP accountant merges steps, so every client's epsilon is identical.

Without DP, each epoch is a fresh permutation cut into batches of B (the last one partial),
as a shuffled DataLoader gives, and the loss is the mean over the batch.

With ``privacy.secure_noise = "on"`` each client's generator (its Poisson draws and its
noise) gets a fresh state from the OS CSPRNG every round instead of its round seed, and the
noise is drawn as Opacus' ``secure_mode`` draws it (`fedsim.privacy.secure_noise`).

Clients take different numbers of steps: they are sorted by steps, so at each step the
active ones are a prefix of the stack. Each client draws from its own generator, seeded by
its round seed, so its draws do not depend on how clients are grouped into chunks; the float
rounding of its sums can, in the last bits: a step's batch is padded to the widest draw among
the clients trained together, and BLAS sums a longer padded row in another order. A client
trained alone (``runtime.engine_chunk = 1``, or one message under Ray and on a SuperNode)
gives the same bits wherever it trains.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from fedsim.algorithms import ClientRule, Hyper, LocalResult, State, Tensors, TrainSettings, tree_map
from fedsim.clients.vectorized_functional import Functional, stacked_forward
from fedsim.clients.vectorized_grads import CLIP_EPS, clip_factor, dense_chain, outer_chain
from fedsim.models import as_tensors
from fedsim.privacy.accounting import History, poisson_sample_rate
from fedsim.privacy.faults import fault
from fedsim.privacy.secure_noise import announce, fp_safe_standard_normal, secret_generator

# the engine's entry points, and the path selectors and helpers other modules reuse
# (learning from bags' batched loop), importable from here wherever they are defined
__all__ = ["CLIP_EPS", "BatchDraws", "VectorClient", "VectorOutcome", "batch_draws", "by_steps_in_chunks",
           "clip_factor", "default_chunk", "dense_chain", "draw_batch", "drawn_indices", "drawn_indices_torch",
           "extend_history", "momentum_direction", "outer_chain", "release_scratch", "scratch", "stacked_forward",
           "to_host", "train_clients", "unsupported_reason"]


@dataclass
class VectorClient:
    """One client of a vectorized round."""

    x: np.ndarray | torch.Tensor  # a tensor: already on the training device
    y: np.ndarray | torch.Tensor
    history: History
    seed: int
    state: State  # the rule's per-client tensors (from `ClientRule.setup`)
    # gradient canaries this client holds ({name: (c, *shape)}, `fedsim.privacy.canaries`) and
    # the seed of their Poisson draws; only a white-box audit plants them
    canaries: Tensors | None = None
    canary_seed: int = 0
    # this client's DP-SGD sigma where it differs from the round's (per-client calibration)
    noise_multiplier: float | None = None


@dataclass
class VectorOutcome:
    result: LocalResult
    final: Tensors  # trainable tensors after training, on the CPU


def unsupported_reason(model: nn.Module, rule: ClientRule) -> str | None:
    """Why this model/rule cannot run vectorized (None: it can). `auto` falls back to Opacus."""
    if rule.local_train is not None and rule.local_train_batched is None:
        return "the algorithm's client rule has its own local loop (local_train) and no batched version of it"
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"module {name or 'model'} has dropout, which vmap cannot draw per client"
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            return f"module {name} is a BatchNorm (couples samples; Opacus refuses it too)"
        if type(module).__module__.startswith("transformers"):
            return ("Hugging Face models (hf-text) build attention masks with data-dependent control flow, "
                    "which vmap cannot run, and train with dropout; they run under Opacus")
    return None


def extend_history(history: History, sigma: float, q: float, steps: int) -> list[tuple[float, float, int]]:
    """Opacus' RDPAccountant.step applied `steps` times: the same (sigma, q) as the last
    entry adds to its count, anything else opens a new entry."""
    out = [(float(s), float(qq), int(k)) for s, qq, k in history]
    if steps <= 0:
        return out
    if out and out[-1][0] == sigma and out[-1][1] == q:
        out[-1] = (out[-1][0], out[-1][1], out[-1][2] + steps)
    else:
        out.append((float(sigma), float(q), int(steps)))
    return out


def _stack_trees(trees: Sequence[Any], device: str):
    first = trees[0]
    if isinstance(first, dict):
        return {k: _stack_trees([t[k] for t in trees], device) for k in first}
    return torch.stack([torch.as_tensor(t) for t in trees]).to(device)


def default_chunk(num_params: int, batch_size: int, device: str) -> int:
    """Clients per chunk: per-sample gradients (about 3 B x P floats per client, with the
    draws' spread, and as much again for autograd's intermediates) within half the free
    memory on a GPU, a quarter of it (at most 1 GiB) on a CPU."""
    if device.startswith("cuda"):
        budget = torch.cuda.mem_get_info()[0] // 2
    else:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError):
            free = 4 << 30
        budget = min(1 << 30, free // 4)
    per_client = 4 * num_params * max(8, 3 * batch_size) * 4
    return max(1, int(budget // per_client))


_SCRATCH = threading.local()


def scratch(key: Any, shape: tuple[int, ...], device: str | torch.device,
            dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A buffer for `key`, kept for the next round (uninitialized on first use).

    The engine's round-sized temporaries (a round's noise, Poisson draws, lr-scaled steps:
    clients x parameters floats, megabytes at 100 clients) would otherwise be fresh
    allocations every round, which the allocator hands back to the system, so the first touch
    of each page faults again: about a sixth of the engine's time in a run. Only the engine's
    own temporaries live here, never what it returns. One set per thread."""
    buffers = _SCRATCH.__dict__.setdefault("buffers", {})
    key = (key, str(device))  # "cuda" and "cuda:0" differ as keys only: both stay valid
    found = buffers.get(key)
    if found is None or found.shape != shape or found.dtype != dtype:
        found = buffers[key] = torch.empty(shape, device=device, dtype=dtype)
    return found


def release_scratch() -> None:
    """Drop this thread's `scratch` buffers (a finished run's: on a GPU, hundreds of MB)."""
    _SCRATCH.__dict__.pop("buffers", None)


def by_steps_in_chunks(steps: Sequence[int], size: int, train: Callable[[list[int]], Sequence[Any]]) -> list[Any]:
    """``train(ids)`` over chunks of at most `size` clients (0: all at once), the clients sorted by
    their number of steps, most first (stable: ties keep client order), so that at every step the
    ones still training are a prefix of the chunk; the results come back in the clients' order."""
    order = sorted(range(len(steps)), key=lambda i: -steps[i])
    size = size or len(steps)
    out: list[Any] = [None] * len(steps)
    for start in range(0, len(order), size):
        ids = order[start:start + size]
        for i, done in zip(ids, train(ids)):
            out[i] = done
    return out


def momentum_direction(grads: Tensors, momentum: Tensors | None, active: int, mu: float) -> Tensors:
    """The step direction of torch.optim.SGD (dampening 0, no Nesterov) for the first `active`
    clients of the stack: the buffer b = mu b + g (it starts at zero, so the first step is g),
    updated in place and returned; without momentum (None), the gradient itself."""
    if momentum is None:
        return grads
    for name, g in grads.items():
        momentum[name][:active] = mu * momentum[name][:active] + g
    return {name: momentum[name][:active] for name in grads}


def train_clients(model: nn.Module, rule: ClientRule, hyper: Hyper, settings: TrainSettings,
                  clients: Sequence[VectorClient], *, chunk: int = 0,
                  batches: Sequence[Sequence[np.ndarray]] | None = None) -> list[VectorOutcome]:
    """Train every client from `model`'s current (trainable) tensors; the model is not changed.

    ``chunk`` bounds how many clients share one batched computation (0: from free memory).
    ``batches`` (tests) gives each client's index arrays, one per step, instead of sampling;
    with ``settings.dp_reference`` and sigma = 0 they are clipped as under DP-SGD.
    """
    device = settings.device
    if settings.noise_multiplier > 0:  # what this mode's noise hides and what it does not, once per process
        announce("on" if settings.secure_noise else "off")
    model = model.to(device)
    fn = Functional(model, rule, hyper, settings.task)
    sizes = [len(c.y) for c in clients]
    steps_per_epoch = [math.ceil(n / settings.batch_size) for n in sizes]
    steps = [settings.local_steps or settings.local_epochs * s for s in steps_per_epoch]
    if batches is not None:
        steps = [len(b) for b in batches]
    num_params = sum(p.numel() for p in fn.trainable.values())
    size = chunk or default_chunk(num_params, settings.batch_size, device)
    return by_steps_in_chunks(steps, size, lambda ids: _train_chunk(
        fn, settings, [clients[i] for i in ids], [steps[i] for i in ids], [steps_per_epoch[i] for i in ids],
        [batches[i] for i in ids] if batches is not None else None))


@dataclass
class BatchDraws:
    """How the clients of a chunk draw each step's batch (`draw_batch`), in one of three modes:

    ``given``    index arrays per client and step (tests feed two engines the same batches);
    ``poisson``  DP-SGD: each sample joins with probability q, drawn from the client's generator;
    ``shuffle``  no DP: a fresh permutation of the client's samples each epoch, cut into batches of B.

    The clients are sorted by steps, so the ones drawing at a step are a prefix (``active``).
    """

    mode: str
    sizes: list[int]
    generators: list[torch.Generator]
    device: str
    batch_size: int
    steps_per_epoch: list[int]
    given: list[Sequence[np.ndarray]] | None = None
    rates: torch.Tensor | None = None  # (clients,) q, for "poisson"
    # on the CPU: the same q as a float32 column and the uniforms as a numpy view, for the comparison in numpy
    rates_np: np.ndarray | None = None
    uniforms_np: np.ndarray | None = None
    # "poisson": one (clients, largest n) buffer of uniforms for the whole chunk, padded with
    # 2.0 (never below q), and each client's row of it: one view per client per chunk, not per
    # step (a Python-level view costs about as much as drawing a small client's rand)
    uniforms: torch.Tensor | None = None
    rows: list[torch.Tensor] = field(default_factory=list)
    perms: list[torch.Tensor | None] = field(default_factory=list)  # "shuffle": this epoch's, per client
    _rate_col: tuple[int, torch.Tensor | None] = (-1, None)  # (active, its rates as a column)


def batch_draws(settings: TrainSettings, sizes: list[int], steps_per_epoch: list[int],
                generators: list[torch.Generator], batches: list[Sequence[np.ndarray]] | None,
                private: bool) -> BatchDraws:
    """The `BatchDraws` of a chunk: given batches if any, else Poisson under DP-SGD, else shuffled."""
    device, k = settings.device, len(sizes)
    draws = BatchDraws("shuffle", sizes, generators, device, settings.batch_size, steps_per_epoch,
                       perms=[None] * k)
    if batches is not None:
        draws.mode, draws.given = "given", batches
    elif private:
        draws.mode = "poisson"
        draws.rates = torch.tensor([poisson_sample_rate(n, settings.batch_size) for n in sizes], device=device)
        draws.uniforms = scratch("draws", (k, max(sizes)), device).fill_(2.0)
        draws.rows = [draws.uniforms[i, :n] for i, n in enumerate(sizes)]
        if draws.uniforms.device.type == "cpu":
            draws.rates_np, draws.uniforms_np = draws.rates.numpy()[:, None], draws.uniforms.numpy()
    return draws


def draw_batch(draws: BatchDraws, t: int, active: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step `t`'s batch of the first `active` clients: (local indices, valid), rows padded to
    the largest draw. Each client draws from its own generator, so its batches do not depend
    on the other clients of its chunk."""
    device = draws.device
    if draws.mode == "given":
        return _pad([torch.as_tensor(np.asarray(draws.given[i][t], dtype=np.int64)) for i in range(active)],
                    device)
    if draws.mode == "poisson":
        if draws.uniforms_np is not None:
            local, valid = _poisson_numpy(draws, active)
            return torch.from_numpy(local), torch.from_numpy(valid)
        _draw_uniforms(draws, active)
        if draws._rate_col[0] != active:
            draws._rate_col = (active, draws.rates[:active, None])
        return drawn_indices(draws.uniforms[:active] < draws._rate_col[1])
    rows = []
    for i in range(active):
        j = t % draws.steps_per_epoch[i]
        if j == 0:
            draws.perms[i] = torch.randperm(draws.sizes[i], generator=draws.generators[i], device=device)
        rows.append(draws.perms[i][j * draws.batch_size:(j + 1) * draws.batch_size])
    return _pad(rows, device)


def _draw_uniforms(draws: BatchDraws, active: int) -> None:
    """Each active client's uniforms for its Poisson draw, from its own generator."""
    # uniform_ on each row is what torch.rand(out=row) runs, without its argument parsing and resize
    for row, generator in zip(draws.rows[:active], draws.generators[:active]):
        row.uniform_(generator=generator)


def _poisson_numpy(draws: BatchDraws, active: int) -> tuple[np.ndarray, np.ndarray]:
    """`draw_batch`'s Poisson draw on the CPU, as numpy arrays (local indices, valid): the
    float32 comparison with q in numpy, the dispatches of torch's a few microseconds each."""
    _draw_uniforms(draws, active)
    return drawn_indices_numpy(draws.uniforms_np[:active] < draws.rates_np[:active])


class _Canaries:
    """The gradient canaries of a chunk's clients (`fedsim.privacy.canaries`): at each step each
    client's canaries are drawn at its rate from their own generator (so the real samples'
    draws are those of a run without canaries), and the drawn ones' directions, clipped as
    Opacus clips a sample, join the client's clipped sum before the noise."""

    def __init__(self, clients: list[VectorClient], rates: list[float], device: str) -> None:
        self.members = [(i, {k: v.to(device) for k, v in c.canaries.items()},
                         torch.Generator().manual_seed(int(c.canary_seed)), rates[i])
                        for i, c in enumerate(clients) if c.canaries is not None]
        self.drawn_any = torch.zeros(len(clients), dtype=torch.bool, device=device)

    def add_to(self, summed: Tensors, active: int, *, max_grad_norm: float | None, divisor: float = 1.0) -> None:
        """Add step's drawn canaries to the first `active` clients' sums, in place: clipped to
        `max_grad_norm` (None: unclipped, the no-DP mean gradient) and divided by `divisor`."""
        self.drawn_any.zero_()
        for i, directions, generator, rate in self.members:
            if i >= active:
                continue
            count = len(next(iter(directions.values())))
            chosen = (torch.rand(count, generator=generator) < rate).nonzero().squeeze(1)
            if chosen.numel() == 0:
                continue
            self.drawn_any[i] = True
            picked = {name: d.index_select(0, chosen.to(d.device)) for name, d in directions.items()}
            norms = torch.stack([p.reshape(len(p), -1).norm(dim=1) for p in picked.values()], dim=1).norm(dim=1)
            factor = torch.ones_like(norms) if max_grad_norm is None or fault("no_clip") \
                else (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0)
            for name, p in picked.items():
                summed[name][i] += torch.einsum("i,i...", factor, p) / divisor


class _Noise:
    """DP-SGD's Gaussian noise N(0, std^2) on every trainable tensor, drawn at each step from
    each client's own generator into one (clients, parameters) buffer kept across rounds."""

    def __init__(self, shapes: dict[str, torch.Size], k: int, std: float | torch.Tensor, device: str,
                 generators: list[torch.Generator], fp_safe: bool = False) -> None:
        numels = [int(np.prod(s)) for s in shapes.values()]
        self.std, self.generators, self.fp_safe = std, generators, fp_safe
        self.flat = scratch("noise", (k, sum(numels)), device)
        self.rows = self.flat.unbind(0)
        self.parts = {name: part.view(k, *shapes[name]) for name, part in zip(shapes, self.flat.split(numels, dim=1))}
        self._active: tuple[int, Tensors] = (-1, {})

    def add_to(self, summed: Tensors, active: int, empty: torch.Tensor | None = None) -> None:
        """Add a fresh draw to the first `active` clients' clipped sums, in place. `empty`
        (clients whose batch drew nothing) is given only under the test-only fault that skips
        their noise (`fedsim.privacy.faults`)."""
        for i in range(active):
            if self.fp_safe:  # secure_noise: Opacus' secure_mode draw (`fp_safe_standard_normal`)
                fp_safe_standard_normal(self.rows[i].shape, generator=self.generators[i],
                                        device=self.rows[i].device, out=self.rows[i])
            else:  # what torch.randn(out=row) runs, without its argument parsing and resize
                self.rows[i].normal_(generator=self.generators[i])
        std = self.std[:active] if isinstance(self.std, torch.Tensor) else self.std  # a column: per-client sigmas
        self.flat[:active] *= std / 10 if fault("noise_div10") else std
        if empty is not None:
            self.flat[:active] *= (~empty[:active]).to(self.flat.dtype)[:, None]
        if self._active[0] != active:
            self._active = (active, {name: part[:active] for name, part in self.parts.items()})
        parts = self._active[1]
        torch._foreach_add_(list(summed.values()), [parts[name] for name in summed])


def client_sigmas(settings: TrainSettings, clients: list[VectorClient]) -> list[float]:
    """Each client's DP-SGD sigma: its own under per-client calibration, else the round's."""
    return [settings.noise_multiplier if c.noise_multiplier is None else c.noise_multiplier for c in clients]


def _stacked_data(clients: list[VectorClient], task: str, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The chunk's samples, client after client, on the training device."""
    if isinstance(clients[0].x, torch.Tensor):  # already on the device (copied once per run)
        return torch.cat([c.x for c in clients]), torch.cat([c.y for c in clients])
    return as_tensors(np.concatenate([c.x for c in clients]), np.concatenate([c.y for c in clients]), task, device)


def _train_chunk(fn: Functional, settings: TrainSettings, clients: list[VectorClient], steps: list[int],
                 steps_per_epoch: list[int], batches: list[Sequence[np.ndarray]] | None) -> list[VectorOutcome]:
    device, k = settings.device, len(clients)
    private = settings.noise_multiplier > 0 or settings.dp_reference
    sizes = [len(c.y) for c in clients]
    params = {name: t.unsqueeze(0).expand(k, *t.shape).clone() for name, t in fn.trainable.items()}
    momentum = {name: torch.zeros_like(t) for name, t in params.items()} if settings.momentum else None
    state = _stack_trees([c.state for c in clients], device) if clients[0].state else {}
    data_x, data_y = _stacked_data(clients, settings.task, device)
    offsets = torch.as_tensor(np.concatenate([[0], np.cumsum(sizes)[:-1]]), device=device)
    # secure_noise: the noise and Poisson masks from OS-CSPRNG state, which no seed in the run config
    # can regenerate (`fedsim.privacy.secure_noise`); else from the client's round seed
    secret = settings.secure_noise and settings.noise_multiplier > 0
    gens = [secret_generator(device) if secret else torch.Generator(device=device).manual_seed(c.seed)
            for c in clients]
    q = [poisson_sample_rate(n, settings.batch_size) for n in sizes]
    expected = torch.tensor([int(n * qq) for n, qq in zip(sizes, q)], dtype=torch.float32, device=device)
    sigmas = client_sigmas(settings, clients)
    # one number while every client has the round's sigma; a column of stds under per-client calibration
    std = sigmas[0] * settings.max_grad_norm if len(set(sigmas)) == 1 else \
        torch.tensor(sigmas, dtype=torch.float32, device=device)[:, None] * settings.max_grad_norm
    draws = batch_draws(settings, sizes, steps_per_epoch, gens, batches, private)
    noise = _Noise({name: t.shape[1:] for name, t in params.items()}, k, std, device, gens, secret) \
        if private and max(sigmas) > 0 else None
    lr_steps = {name: scratch(("step", name), tuple(p.shape), device, p.dtype) for name, p in params.items()}
    canaries = _Canaries(clients, q if private else [min(1.0, settings.batch_size / n) for n in sizes], device) \
        if any(c.canaries is not None for c in clients) else None
    # Opacus' steps without autograd where the step takes none (the dense path differentiates
    # by hand): inference mode skips autograd's two dispatch layers on each of a step's ~80 small
    # operations, about a sixth of a one-client step; the same kernels, the same bits
    no_autograd = fn.by_hand_task is not None and fn.rule.post_step is None
    with torch.inference_mode(no_autograd):
        losses, counts = _run_steps(fn, settings, params, momentum, state, data_x, data_y, offsets, steps, expected,
                                    draws, noise, lr_steps, canaries, private)
    # each step's batch loss and whether it had a sample, summed once the chunk is trained;
    # zero where a client was done, as a buffer of zeros filled step by step was
    step_losses, step_measured = _by_step(losses, k, device), _by_step(counts, k, device) > 0
    return _outcomes(settings, clients, params, steps, q, sigmas, step_losses, step_measured)


def _run_steps(fn: Functional, settings: TrainSettings, params: Tensors, momentum: Tensors | None, state: State,
               data_x: torch.Tensor, data_y: torch.Tensor, offsets: torch.Tensor, steps: list[int],
               expected: torch.Tensor, draws: BatchDraws, noise: _Noise | None, lr_steps: Tensors,
               canaries: _Canaries | None, private: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A chunk's steps, the stacks in `params` (and `momentum`) updated in place; each step's
    batch loss and real-sample count for its active clients."""
    device = settings.device
    names = list(params)
    losses, counts = [], []
    offsets_np = offsets.numpy() if offsets.device.type == "cpu" else None
    actives = np.searchsorted(-np.asarray(steps), -np.arange(max(steps)), side="left").tolist() if steps else []
    last_active = -1
    for t, active in enumerate(actives):  # clients are sorted by steps: the active ones are a prefix
        if active != last_active:  # views of the stacks for this prefix, kept while it lasts
            last_active = active
            current = {name: p[:active] for name, p in params.items()}
            current_list = list(current.values())
            sub_state = tree_map(lambda v: v[:active], state)
            offset_col = offsets[:active, None]
            divisors = [expected[:active].view(-1, *([1] * (p.dim() - 1))) for p in current_list]
            lr_step = [lr_steps[name][:active] for name in names]
        if offsets_np is not None and draws.uniforms_np is not None:  # DP-SGD on the CPU: in numpy
            local_np, valid_np = _poisson_numpy(draws, active)
            off = offsets_np[:active, None]  # the samples' rows in the chunk's data; padding reads the client's first
            index = torch.from_numpy(np.where(valid_np, local_np + off, off))
            mask_np = valid_np.astype(np.float32)
            mask, count = torch.from_numpy(mask_np), torch.from_numpy(mask_np.sum(1))  # whole numbers: exact
        else:
            local, valid = draw_batch(draws, t, active)
            mask = valid.to(torch.float32)
            index = torch.where(valid, local + offset_col, offset_col)
            count = mask.sum(1)
        flat = index.view(-1)  # index_select copies the rows data_x[index] would, with less indexing machinery
        xb = data_x.index_select(0, flat).view(*index.shape, *data_x.shape[1:])
        yb = data_y.index_select(0, flat).view(*index.shape, *data_y.shape[1:])
        if private:
            if xb.shape[1] > 0:
                summed, values = fn.clipped_sum(current, sub_state, xb, yb, mask, settings.max_grad_norm)
                batch_loss = (values * mask).sum(1) / count.clamp_min(1.0)
            else:
                summed = {name: torch.zeros_like(p) for name, p in current.items()}
                batch_loss = torch.zeros(active, device=device)
            if canaries is not None:
                canaries.add_to(summed, active, max_grad_norm=settings.max_grad_norm)
            if noise is not None:
                empty = None
                if fault("empty_batch_no_noise"):  # test-only: which clients' batches drew nothing at all
                    empty = count == 0
                    if canaries is not None:
                        empty = empty & ~canaries.drawn_any[:active]
                noise.add_to(summed, active, empty)
            # in place: the clipped sums are this step's own tensors (Opacus: (sum + noise) / int(q n))
            summed_list = [summed[name] for name in names]
            torch._foreach_div_(summed_list, divisors)
            grad = dict(zip(names, summed_list))
        else:
            grad, batch_loss = fn.mean_grads(current, sub_state, xb, yb, mask)
            if canaries is not None:  # a drawn canary joins a batch of about B samples
                canaries.add_to(grad, active, max_grad_norm=None, divisor=float(settings.batch_size))
        losses.append(batch_loss)
        counts.append(count)
        grad = momentum_direction(grad, momentum, active, settings.momentum)
        # p - lr * d with the product rounded first, not add_'s fused alpha: the results of
        # published tables depend on this rounding
        if fn.rule.post_step is None:  # in place, on the active prefix of the stack
            for d, out in zip([grad[name] for name in names], lr_step):
                torch.mul(d, settings.lr, out=out)
            torch._foreach_sub_(current_list, lr_step)
        else:
            new = fn.post_step({name: current[name] - settings.lr * grad[name] for name in current},
                               current, sub_state)
            for name in params:
                params[name][:active] = new[name]
    return losses, counts


def _by_step(rows: list[torch.Tensor], k: int, device: str) -> torch.Tensor:
    """(steps, k): each step's values for its active prefix of the `k` clients, zero after it."""
    if not rows:
        return torch.zeros((0, k), device=device)
    out = nn.utils.rnn.pad_sequence(rows, batch_first=True)
    return nn.functional.pad(out, (0, k - out.shape[1])) if out.shape[1] < k else out


def _outcomes(settings: TrainSettings, clients: list[VectorClient], params: Tensors, steps: list[int],
              q: list[float], sigmas: list[float], step_losses: torch.Tensor,
              step_measured: torch.Tensor) -> list[VectorOutcome]:
    """Each client's `LocalResult` and trained tensors (on the CPU) once its chunk is trained;
    `sigmas` are the chunk's `client_sigmas`, which its accountant histories record."""
    private = settings.noise_multiplier > 0 or settings.dp_reference
    sizes = [len(c.y) for c in clients]
    # summed in float64 in step order (cumsum runs the steps in order), as a running sum of
    # Python floats adds them up
    loss_sum = torch.where(step_measured, step_losses.double(), 0.0).cumsum(0)[-1] if len(step_losses) \
        else torch.zeros(len(clients), dtype=torch.float64)
    loss_count = step_measured.double().sum(0)
    mean_loss = (loss_sum / loss_count.clamp_min(1)).tolist()
    measured = (loss_count > 0).tolist()
    # one copy per tensor, not per client, and one view per client (unbind, not k indexings)
    final = {name: to_host(p.detach()).unbind(0) for name, p in params.items()}
    outcomes = []
    for i, c in enumerate(clients):
        history = extend_history(c.history, sigmas[i], q[i], steps[i]) if sigmas[i] > 0 \
            else [tuple(h) for h in c.history]
        rate = q[i] if private else min(1.0, settings.batch_size / max(sizes[i], 1))
        result = LocalResult(sizes[i], steps[i], mean_loss[i] if measured[i] else float("nan"), history, rate)
        outcomes.append(VectorOutcome(result, {name: p[i] for name, p in final.items()}))
    return outcomes


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor` in host memory (itself if it is there). From a GPU, through page-locked memory
    (torch's caching host allocator, so a round reuses the last round's blocks): copying a
    round's trained tensors into ordinary pageable memory ran at 3.3 GB/s on an H100, 100 ms
    of a 170 ms round of 50 clients of a 1.6M-parameter CNN."""
    if tensor.device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
    return host.copy_(tensor)


def drawn_indices(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's drawn samples (the True entries of `chosen`, clients x samples), in order,
    padded to the largest draw: (indices, valid). On the CPU through numpy, whose stable
    argsort of these few bytes costs a third of torch's (about 15 against 50 us, paid at
    every step); elsewhere in torch (`drawn_indices_torch`), on the device."""
    if chosen.device.type != "cpu":
        return drawn_indices_torch(chosen)
    local, valid = drawn_indices_numpy(chosen.numpy())
    return torch.from_numpy(local), torch.from_numpy(valid)


def drawn_indices_numpy(drawn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`drawn_indices` of a boolean numpy array, as numpy arrays."""
    counts = drawn.sum(1)
    width = int(counts.max(initial=0))
    local = np.argsort(~drawn, axis=1, kind="stable")[:, :width]
    return local, np.arange(width)[None, :] < counts[:, None]


def drawn_indices_torch(chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`drawn_indices` in torch ops, for a device."""
    counts = chosen.sum(1)
    width = int(counts.max()) if chosen.numel() else 0
    local = torch.argsort((~chosen).to(torch.int8), dim=1, stable=True)[:, :width]
    return local, torch.arange(width, device=chosen.device)[None, :] < counts[:, None]


def _pad(rows: list[torch.Tensor], device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Index rows of different lengths as one (rows, longest) tensor and its validity mask."""
    # the rows joined and scattered by the mask in one go, row after row (a row's own two slice
    # assignments cost about 10 us on the CPU, paid per client per step of a no-DP round)
    lengths = np.fromiter((len(r) for r in rows), np.int64, len(rows))
    valid = np.arange(int(lengths.max(initial=0)))[None, :] < lengths[:, None]
    joined = torch.cat(rows).to(torch.long) if rows else torch.zeros(0, dtype=torch.long)
    if joined.device.type == "cpu":
        local = np.zeros(valid.shape, np.int64)
        local[valid] = joined.numpy()
        return torch.from_numpy(local).to(device), torch.from_numpy(valid).to(device)
    mask = torch.from_numpy(valid).to(joined.device)
    local = torch.zeros(valid.shape, dtype=torch.long, device=joined.device)
    local[mask] = joined
    return local.to(device), mask.to(device)
