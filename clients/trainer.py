"""The Opacus engine: E epochs (or a fixed number of steps) of SGD, DP-SGD when sigma > 0.

One loop serves every algorithm. Its pieces come in as two pure callables built from the
algorithm's `ClientRule` (`fedsim.algorithms`), never as subclasses:

* ``loss_term(outputs, mask)``: a per-sample-separable term added to the loss (FedLD's
  margin control). Opacus sees it, so it is clipped and noised like the rest.
* ``post_step(new, old)``: a data-independent correction after each optimizer step, from
  the trainable tensors after and before the step (FedProx's pull, SCAFFOLD's drift).
  Under DP-SGD such a term must not go through the per-sample gradients: Opacus would drop
  it (it rebuilds ``p.grad`` from per-sample gradients). Applying it after the noisy step
  is post-processing, so it costs no privacy.

Why the accountant history is passed in and out: a new PrivacyEngine starts a new
accountant, so a client's epsilon would silently restart every round. The history is
restored with the accountant's ``load_state_dict`` *before* ``make_private`` and read back
with ``state_dict`` after, and only rounds a client actually trains in add steps.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.algorithms import LocalResult, Tensors, TrainSettings, seed_everything, tree_map
from fedsim.models import as_tensors, loss_fn
from fedsim.privacy.accounting import History, poisson_sample_rate
from fedsim.privacy.faults import fault
from fedsim.privacy.secure_noise import announce, secret_seed_everything

log = logging.getLogger("fedsim")


class FixedBatches:
    """A batch sampler that yields given index arrays, one per step, for tests that compare
    engines on identical batches. Its length is what Opacus derives q from: the batches of
    one epoch, ceil(n/B), as for the Poisson sampler it stands in for."""

    def __init__(self, batches: list[np.ndarray], steps_per_epoch: int) -> None:
        self.batches = batches
        self.steps_per_epoch = steps_per_epoch

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __iter__(self):
        return (list(map(int, b)) for b in self.batches)


def _batches(loader: DataLoader, total_steps: int):
    """Yield exactly `total_steps` batches, cycling the loader as often as needed."""
    done = 0
    while done < total_steps:
        for batch in loader:
            yield batch
            done += 1
            if done == total_steps:
                return


def train_local(model: nn.Module, x: np.ndarray, y: np.ndarray, settings: TrainSettings,
                history: History = (), *, seed: int = 0,
                loss_term: Callable[[torch.Tensor, torch.Tensor | None, Any], torch.Tensor] | None = None,
                post_step: Callable[[Tensors, Tensors, Any], Tensors] | None = None,
                rule_state: Any = None, batches: list[np.ndarray] | None = None,
                canaries: dict[str, torch.Tensor] | None = None, canary_seed: int = 0) -> LocalResult:
    """Train `model` in place on (x, y); only parameters with requires_grad are trained.

    Freeze what must not change (LoRA A, backbone) *before* calling this: Opacus
    computes per-sample gradients and noise only for trainable parameters, and
    unfreezing after `make_private` fails. ``rule_state`` (the rule's tensors) is moved to
    the training device and handed to the hooks. ``batches`` replaces the sampler (Poisson
    under DP, shuffled otherwise) with given index arrays, one per step: the engine
    equivalence tests use it to feed two engines the same batches. ``canaries`` ({name: (c,
    *shape)}, `fedsim.privacy.canaries`) are gradient canaries this client holds: extra samples
    drawn at rate q from a generator seeded by ``canary_seed``, whose per-sample gradients are
    their directions, clipped and summed before the noise (`_CanaryHook`).
    """
    private = settings.noise_multiplier > 0 or settings.dp_reference
    secret = settings.secure_noise and settings.noise_multiplier > 0
    if secret:  # Opacus draws noise and Poisson masks from torch's default generators: a secret state
        secret_seed_everything(settings.device)
    else:
        seed_everything(seed, settings.device)
    if settings.noise_multiplier > 0:  # what this mode's noise hides and what it does not, once per process
        announce("on" if secret else "off")
    device = settings.device
    model.to(device).train()
    rule_state = tree_map(lambda v: v.to(device) if isinstance(v, torch.Tensor) else v, rule_state)
    n = len(y)
    dataset = TensorDataset(*as_tensors(x, y, settings.task))
    steps_per_epoch = math.ceil(n / settings.batch_size)
    if batches is None:
        loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    else:
        from opacus.data_loader import wrap_collate_with_empty  # empty batches, as Opacus' own loader
        from torch.utils.data import default_collate

        x0, y0 = dataset[0]
        collate = wrap_collate_with_empty(collate_fn=default_collate, sample_empty_shapes=[(0, *x0.shape),
                                                                                          (0, *y0.shape)],
                                          dtypes=[x0.dtype, y0.dtype])
        loader = DataLoader(dataset, batch_sampler=FixedBatches(batches, steps_per_epoch), collate_fn=collate)
    named = {k: p for k, p in model.named_parameters() if p.requires_grad}  # before Opacus renames them
    optimizer = torch.optim.SGD(list(named.values()), lr=settings.lr, momentum=settings.momentum)
    total_steps = settings.local_steps or settings.local_epochs * steps_per_epoch
    if batches is not None:
        total_steps = len(batches)
    criterion = loss_fn(settings.task)
    engine = trained = None
    if private:
        from opacus import PrivacyEngine

        with warnings.catch_warnings():  # `announce` states precisely what is secret, in either mode
            warnings.filterwarnings("ignore", message="Secure RNG turned off", category=UserWarning)
            engine = PrivacyEngine(accountant="rdp")
        if history:  # restore BEFORE make_private
            engine.accountant.load_state_dict({"history": [tuple(h) for h in history],
                                               "mechanism": engine.accountant.mechanism()})
        trained, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            poisson_sampling=batches is None)
        # secure_noise: the noise drawn as Opacus' secure_mode draws it (four draws summed and halved,
        # against floating-point attacks), from the secret default generator; secure_mode itself
        # needs torchcsprng for its generator (`fedsim.privacy.secure_noise`)
        optimizer.secure_mode = secret
    forward = trained if trained is not None else model
    hook = None
    if canaries is not None or (private and fault_hooks_needed()):
        hook = _CanaryHook(named, canaries, canary_seed, settings, n, device)
        if private:
            hook.attach(optimizer)
    losses = []
    try:
        for xb, yb in _batches(loader, total_steps):
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            if hook is not None:
                hook.draw(len(yb))
            if len(yb) == 0:
                # Poisson sampling drew an empty batch: the DP step is pure noise. Run it
                # through the same graph with a zero loss so Opacus still adds noise and counts the step.
                out = forward(torch.zeros((1, *xb.shape[1:]), device=device))
                (out.sum() * 0.0).backward()
            else:
                out = forward(xb)
                loss = criterion(out, yb)
                if loss_term is not None:
                    loss = loss + loss_term(out, None, rule_state)
                loss.backward()
                losses.append(float(loss.detach()))
            if hook is not None and not private:
                hook.add_to_mean_grads(len(yb))
            before = {k: p.detach().clone() for k, p in named.items()} if post_step is not None else None
            optimizer.step()
            if post_step is not None:
                with torch.no_grad():
                    corrected = post_step({k: p.detach() for k, p in named.items()}, before, rule_state)
                    for k, p in named.items():
                        p.copy_(corrected[k])
    finally:
        if trained is not None:
            trained.remove_hooks()  # or the next round's make_private fails ("hooks twice")
    new_history = list(engine.accountant.state_dict()["history"]) if engine is not None else list(history)
    q = poisson_sample_rate(n, settings.batch_size) if private else settings.batch_size / max(n, 1)
    return LocalResult(n, total_steps, float(np.mean(losses)) if losses else float("nan"),
                       [(float(s), float(qq), int(k)) for s, qq, k in new_history], min(q, 1.0))


def fault_hooks_needed() -> bool:
    """Whether a test-only fault (`fedsim.privacy.faults`) changes this engine's DP step."""
    return fault("noise_div10") or fault("no_clip") or fault("empty_batch_no_noise")


class _CanaryHook:
    """Gradient canaries, and the test-only faults, at the DP optimizer's clip and noise points.

    Opacus' DPOptimizer clips into ``p.summed_grad`` (`clip_and_accumulate`) and then adds the
    noise (`add_noise`); the hook wraps both on the optimizer instance, so a drawn canary's
    clipped direction joins the clipped sum before the single draw of noise, exactly as one
    more sample's would. Without DP (sigma = 0), a drawn canary adds its direction / B to the
    mean gradient (it joins a batch of about B samples).
    """

    def __init__(self, named: dict[str, torch.Tensor], canaries: dict[str, torch.Tensor] | None, seed: int,
                 settings: TrainSettings, n: int, device: str) -> None:
        self.params = list(named.values())
        self.directions = [canaries[k].to(device) for k in named] if canaries is not None else None
        self.count = len(self.directions[0]) if self.directions is not None else 0
        self.generator = torch.Generator().manual_seed(int(seed))
        private = settings.noise_multiplier > 0 or settings.dp_reference
        self.rate = poisson_sample_rate(n, settings.batch_size) if private else min(1.0, settings.batch_size / n)
        self.batch_size = settings.batch_size
        self.max_grad_norm = settings.max_grad_norm
        self.drawn = torch.zeros(0, dtype=torch.bool)
        self.empty = False

    def draw(self, real_samples: int) -> None:
        """This step's canary draws (Poisson, rate q), and whether the whole batch is empty."""
        if self.count:
            self.drawn = torch.rand(self.count, generator=self.generator) < self.rate
        self.empty = real_samples == 0 and not bool(self.drawn.any())

    def _summed(self, scale_by_clip: bool) -> list[torch.Tensor] | None:
        if not self.count or not bool(self.drawn.any()):
            return None
        chosen = self.drawn.nonzero().squeeze(1).to(self.directions[0].device)
        picked = [d.index_select(0, chosen) for d in self.directions]
        if scale_by_clip and not fault("no_clip"):
            norms = torch.stack([p.reshape(len(p), -1).norm(dim=1) for p in picked], dim=1).norm(dim=1)
            factor = (self.max_grad_norm / (norms + 1e-6)).clamp(max=1.0)  # Opacus' clip factor
            return [torch.einsum("i,i...", factor, p) for p in picked]
        return [p.sum(0) for p in picked]

    def add_to_mean_grads(self, real_samples: int) -> None:
        summed = self._summed(scale_by_clip=False)
        if summed is None:
            return
        for p, g in zip(self.params, summed):
            p.grad = g.clone() / self.batch_size if p.grad is None else p.grad + g / self.batch_size

    def attach(self, optimizer) -> None:
        clip, noise = optimizer.clip_and_accumulate, optimizer.add_noise

        def clip_and_accumulate() -> None:
            if fault("no_clip"):
                bound, optimizer.max_grad_norm = optimizer.max_grad_norm, math.inf
                try:
                    clip()
                finally:
                    optimizer.max_grad_norm = bound
            else:
                clip()
            summed = self._summed(scale_by_clip=True)
            if summed is not None:
                for p, g in zip(optimizer.params, summed):
                    p.summed_grad += g.to(p.summed_grad.dtype).view_as(p.summed_grad)

        def add_noise() -> None:
            if fault("empty_batch_no_noise") and self.empty:
                for p in optimizer.params:
                    p.grad = p.summed_grad.clone().view_as(p)
                    p.summed_grad._processed = True  # as Opacus' add_noise marks it
                return
            if fault("noise_div10"):
                # only around the draw: the accountant's step hook reads noise_multiplier afterwards
                sigma, optimizer.noise_multiplier = optimizer.noise_multiplier, optimizer.noise_multiplier / 10
                try:
                    noise()
                finally:
                    optimizer.noise_multiplier = sigma
            else:
                noise()

        optimizer.clip_and_accumulate = clip_and_accumulate
        optimizer.add_noise = add_noise


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray | torch.Tensor, task: str,
             device: str = "cpu", batch_size: int = 2048) -> dict[str, float]:
    """Loss and accuracy (classification) or MSE (regression) on (x, y): arrays, or tensors
    already on `device` (the server's held-out split, copied to a GPU once per run)."""
    model.to(device).eval()
    criterion = loss_fn(task)
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb, yb = as_tensors(x[start:start + batch_size], y[start:start + batch_size], task, device)
        out = model(xb)
        total_loss += float(criterion(out, yb)) * len(yb)
        if task == "classification":
            correct += int((out.argmax(1) == yb).sum())
    loss = total_loss / len(y)
    if task == "classification":
        return {"loss": loss, "accuracy": correct / len(y)}
    return {"loss": loss, "mse": loss}
