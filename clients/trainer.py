"""Local training: E epochs (or a fixed number of steps) of SGD, DP-SGD when sigma > 0.

One loop serves every strategy. Strategy-specific pieces come in as two small
callables instead of subclasses:

* ``extra_loss(outputs, targets)``: a per-sample-separable term added to the loss
  (FedLD's margin control). Opacus sees it, so it is clipped and noised like the rest.
* ``post_step()``: a data-independent correction applied after each optimizer step
  (FedProx's proximal pull, SCAFFOLD's control-variate drift). Under DP-SGD such a
  term must not go through the per-sample gradients: Opacus would drop it (it
  rebuilds ``p.grad`` from per-sample gradients). Applying it after the noisy step
  is post-processing, so it costs no privacy.

Why the accountant history is passed in and out: a new PrivacyEngine starts a new
accountant, so a client's epsilon would silently restart every round. The history
is restored *before* ``make_private`` and saved after, and only rounds a client
actually trains in add steps.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedsim.models import loss_fn
from fedsim.privacy.accounting import History, poisson_sample_rate

log = logging.getLogger("fedsim")


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


@dataclass
class LocalResult:
    num_examples: int
    steps: int
    mean_loss: float
    history: list[tuple[float, float, int]] = field(default_factory=list)
    sample_rate: float = 1.0


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def seed_everything(seed: int, device: str) -> None:
    """Seed the generators local training draws from (sampling, noise, dropout).
    The CUDA generator only when training there: seeding it costs ms per call."""
    torch.default_generator.manual_seed(seed)
    if device.startswith("cuda"):
        torch.cuda.manual_seed(seed)


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
                extra_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                post_step: Callable[[], None] | None = None) -> LocalResult:
    """Train `model` in place on (x, y); only parameters with requires_grad are trained.

    Freeze what must not change (LoRA A, backbone) *before* calling this: Opacus
    computes per-sample gradients and noise only for trainable parameters, and
    unfreezing after `make_private` fails.
    """
    seed_everything(seed, settings.device)
    device = settings.device
    model.to(device).train()
    n = len(y)
    dataset = TensorDataset(torch.as_tensor(x, dtype=torch.float32),
                            torch.as_tensor(y, dtype=torch.long if settings.task == "classification"
                                            else torch.float32))
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=True)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    steps_per_epoch = math.ceil(n / settings.batch_size)
    total_steps = settings.local_steps or settings.local_epochs * steps_per_epoch
    criterion = loss_fn(settings.task)
    private = settings.noise_multiplier > 0
    engine = trained = None
    if private:
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
        engine.accountant.history = [tuple(h) for h in history]  # restore BEFORE make_private
        trained, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=settings.noise_multiplier, max_grad_norm=settings.max_grad_norm,
            poisson_sampling=True)
    forward = trained if trained is not None else model
    losses = []
    try:
        for xb, yb in _batches(loader, total_steps):
            xb, yb = xb.to(device), yb.to(device)
            optimizer.zero_grad(set_to_none=True)
            if len(yb) == 0:
                # Poisson sampling drew an empty batch: the DP step is pure noise. Run it
                # through the same graph with a zero loss so Opacus still adds noise and counts the step.
                out = forward(torch.zeros((1, *xb.shape[1:]), device=device))
                (out.sum() * 0.0).backward()
            else:
                out = forward(xb)
                loss = criterion(out, yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(out, yb)
                loss.backward()
                losses.append(float(loss.detach()))
            optimizer.step()
            if post_step is not None:
                post_step()
    finally:
        if trained is not None:
            trained.remove_hooks()  # or the next round's make_private fails ("hooks twice")
    new_history = list(engine.accountant.history) if engine is not None else list(history)
    q = poisson_sample_rate(n, settings.batch_size) if private else settings.batch_size / max(n, 1)
    return LocalResult(n, total_steps, float(np.mean(losses)) if losses else float("nan"),
                       [(float(s), float(qq), int(k)) for s, qq, k in new_history], min(q, 1.0))


@torch.no_grad()
def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray, task: str, device: str = "cpu",
             batch_size: int = 2048) -> dict[str, float]:
    """Loss and accuracy (classification) or MSE (regression) on (x, y)."""
    model.to(device).eval()
    criterion = loss_fn(task)
    total_loss, correct = 0.0, 0
    for start in range(0, len(y), batch_size):
        xb = torch.as_tensor(x[start:start + batch_size], dtype=torch.float32, device=device)
        yb = torch.as_tensor(y[start:start + batch_size], device=device,
                             dtype=torch.long if task == "classification" else torch.float32)
        out = model(xb)
        total_loss += float(criterion(out, yb)) * len(yb)
        if task == "classification":
            correct += int((out.argmax(1) == yb).sum())
    loss = total_loss / len(y)
    if task == "classification":
        return {"loss": loss, "accuracy": correct / len(y)}
    return {"loss": loss, "mse": loss}
