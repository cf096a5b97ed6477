"""The model as pure functions of its trainable tensors, batched over clients and samples.

`Functional` gives the vectorized engine a round's two gradient computations for clients
stacked on a leading axis: the clipped sum of per-sample gradients (DP-SGD) and each
client's mean-loss gradient (no DP). It takes the fastest path the model allows, each
giving Opacus' numbers: the dense path or the outer-product path
(`clients.vectorized_grads`) for chains of Linear and LoRA layers, else the general
**vmap path**, ``vmap`` over clients of ``vmap(grad)`` over samples of ``functional_call``,
for any model (cnn, user models). The rule's hooks (loss term, post-step correction) run
inside, under ``vmap`` over clients.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from fedsim.algorithms import ClientRule, Hyper, State, Tensors
from fedsim.clients.vectorized_grads import (by_hand, clip_factor, dense_batch_grads, dense_chain, dense_clipped_sum,
                                             dense_forward, loss_and_output_grad, outer_chain, outer_grads)
from fedsim.models import loss_fn


def stacked_forward(model: nn.Module, chain: list[tuple[str, nn.Module]] | None, params: Tensors,
                    frozen: Tensors, x: torch.Tensor) -> torch.Tensor:
    """The model's outputs (clients, batch, ...) for trainable tensors stacked on a leading
    client axis: batched matmuls on the dense path (`dense_chain`), else ``vmap`` over clients
    of ``functional_call``. Ordinary autograd differentiates it in `params`, which gives every
    client's gradient of its own loss at once (for losses that are not per-sample, like bags')."""
    if chain is not None:
        return dense_forward(chain, params, x, leaf_outputs=False)[0]
    return vmap(lambda p, xb: functional_call(model, {**p, **frozen}, (xb,)))(params, x)


class Functional:
    """The model as pure functions of its trainable tensors, for one client and one sample."""

    def __init__(self, model: nn.Module, rule: ClientRule, hyper: Hyper, task: str) -> None:
        self.model = model
        self.trainable = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
        self.frozen = {k: v.detach() for k, v in list(model.named_parameters()) + list(model.named_buffers())
                       if k not in self.trainable}
        self.rule, self.hyper, self.task = rule, hyper, task
        self.losses = loss_fn(task, reduction="none")
        self.chain = dense_chain(model, rule)  # None: the outer-product or the vmap path
        self.by_hand_task = task if by_hand(self.chain) else None  # None: autograd on the dense path
        self.outer = outer_chain(model) if self.chain is None else None

    def clipped_sum(self, params: Tensors, state: State, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                    max_grad_norm: float) -> tuple[Tensors, torch.Tensor]:
        """Per client, the sum over the batch's real rows of per-sample gradients clipped to
        `max_grad_norm` as Opacus clips them, and the per-sample losses."""
        if self.chain is not None:
            return dense_clipped_sum(self.chain, params, x, y, mask, self.losses, max_grad_norm,
                                     self.by_hand_task)
        found = None
        if self.outer is not None:
            if self.rule.loss_term is None:
                def output_grads(out):
                    return loss_and_output_grad(self.task, out, y, torch.ones_like(mask))
            else:  # the rule's term differentiated as the vmap path does, from the outputs on
                def output_grads(out):
                    grads, values = self.per_sample_output_grads(out, state, y)
                    return values, grads
            found = outer_grads(self.outer, params, self.frozen, x, output_grads, per_sample=True)
        grads, values = found if found is not None else self.per_sample_grads(params, state, x, y)
        norms = torch.stack([g.reshape(*g.shape[:2], -1).norm(2, dim=-1) for g in grads.values()],
                            dim=-1).norm(2, dim=-1)
        factor = clip_factor(norms, max_grad_norm, mask)
        return {name: torch.einsum("ab,ab...->a...", factor, g) for name, g in grads.items()}, values

    def mean_grads(self, params: Tensors, state: State, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor) -> tuple[Tensors, torch.Tensor]:
        """Per client, the gradient of the mean loss over the batch's real rows, and that loss."""
        if self.chain is not None:
            return dense_batch_grads(self.chain, params, x, y, mask, self.losses, self.by_hand_task)
        if self.outer is not None:
            if self.rule.loss_term is None:
                count = mask.sum(1, keepdim=True).clamp_min(1.0)

                def output_grads(out):
                    found = loss_and_output_grad(self.task, out, y, mask / count)
                    if found is None:
                        return None
                    return (found[0] * mask).sum(1) / count.squeeze(1), found[1]
            else:
                def output_grads(out):
                    grads, values = self.batch_output_grads(out, state, y, mask)
                    return values, grads
            found = outer_grads(self.outer, params, self.frozen, x, output_grads, per_sample=False)
            if found is not None:
                return found
        return self.batch_grads(params, state, x, y, mask)

    def forward(self, params: Tensors, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, {**params, **self.frozen}, (x,))

    def sample_loss(self, params: Tensors, state: State, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One sample's own loss: what Opacus' per-sample gradients differentiate."""
        return self.sample_output_loss(self.forward(params, x.unsqueeze(0)), state, y.unsqueeze(0))

    def sample_output_loss(self, out: torch.Tensor, state: State, y: torch.Tensor) -> torch.Tensor:
        """`sample_loss` from the model's output for the sample (a batch of one) on."""
        loss = self.losses(out, y).mean()
        if self.rule.loss_term is not None:
            loss = loss + self.rule.loss_term(out, None, state, self.hyper)
        return loss

    def batch_loss(self, params: Tensors, state: State, x: torch.Tensor, y: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
        """Mean loss over a padded batch's real rows (`mask`), plus the rule's term."""
        return self.batch_output_loss(self.forward(params, x), state, y, mask)

    def batch_output_loss(self, out: torch.Tensor, state: State, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """`batch_loss` from the model's outputs on."""
        loss = (self.losses(out, y) * mask).sum() / mask.sum().clamp_min(1.0)
        if self.rule.loss_term is not None:
            loss = loss + self.rule.loss_term(out, mask, state, self.hyper)
        return loss

    @functools.cached_property
    def per_sample_output_grads(self):
        """(clients, samples, outputs) -> each sample's loss gradient with respect to its own
        output, and the loss: `sample_output_loss` under the vmap path's two ``vmap``s."""
        def one(out: torch.Tensor, state: State, y: torch.Tensor) -> torch.Tensor:
            return self.sample_output_loss(out.unsqueeze(0), state, y.unsqueeze(0))
        return vmap(vmap(grad_and_value(one), in_dims=(0, None, 0)), in_dims=(0, 0, 0))

    @functools.cached_property
    def batch_output_grads(self):
        """(clients, samples, outputs) -> each client's `batch_output_loss` gradient and value."""
        return vmap(grad_and_value(self.batch_output_loss), in_dims=(0, 0, 0, 0))

    @functools.cached_property
    def per_sample_grads(self):
        """(clients, samples) -> per-sample gradients and losses."""
        per_sample = vmap(grad_and_value(self.sample_loss), in_dims=(None, None, 0, 0))
        return vmap(per_sample, in_dims=(0, 0, 0, 0))

    @functools.cached_property
    def batch_grads(self):
        return vmap(grad_and_value(self.batch_loss), in_dims=(0, 0, 0, 0, 0))

    @functools.cached_property
    def post_step(self):
        rule, hyper = self.rule, self.hyper

        def one(new: Tensors, old: Tensors, state: State) -> Tensors:
            return rule.post_step(new, old, state, hyper)
        return vmap(one, in_dims=(0, 0, 0))
