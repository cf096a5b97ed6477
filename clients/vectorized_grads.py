"""Per-sample gradients without per-sample autograd: the vectorized engine's fast paths.

Opacus clips each sample's gradient before summing. For a model that is a chain of Linear
layers, a sample's gradient of a Linear weight is the outer product g a^T of the layer's
output gradient g and its input a, so neither autograd over each sample nor ``vmap`` over
the model is needed:

* the **dense path** (`dense_chain`: Linear layers, all trained, elementwise activations, no
  rule loss term; logreg, linear, mlp and user models built the same way): one batched
  forward over all clients, each Linear's output gradient per sample, and a sample's norm
  ||g|| ||a|| (Goodfellow 2015; "ghost clipping", Li et al. 2022). The clipped sum is one
  batched matmul per layer: no per-sample gradient is ever materialized. For ReLU, Tanh,
  Sigmoid and Identity activations the output gradients come from the chain rule applied
  step by step with the ATen backward kernels autograd itself would call (`_chain_backward`):
  the same bits, without building and walking a graph at every step.
* the **outer-product path** (`outer_chain`, `outer_grads`: other chains of Linear and LoRA
  layers, such as lora-mlp under FedSVD, FFA-LoRA and FedAvg-LoRA, an MLP under FedLD whose
  margin term reads each sample's logits, a partly frozen MLP): per-sample gradients formed
  as outer products with the very kernels ``vmap`` uses, so the vmap path's bits at a
  fraction of its cost.

Both give Opacus' numbers; `clients.vectorized_functional` chooses between them and the
general ``vmap`` path, and `clients.vectorized` runs the rounds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from fedsim.algorithms import ClientRule, Tensors
from fedsim.lora import LoRALinear
from fedsim.privacy.faults import fault

CLIP_EPS = 1e-6  # Opacus' per_sample_clip_factor = C / (norm + 1e-6)


def clip_factor(norms: torch.Tensor, max_grad_norm: float, mask: torch.Tensor) -> torch.Tensor:
    """Opacus' per-sample clip factor min(1, C / (norm + 1e-6)), zero on padded rows."""
    if fault("no_clip"):  # test-only (`fedsim.privacy.faults`): an audit must catch it
        return mask.to(norms.dtype)
    return (max_grad_norm / (norms + CLIP_EPS)).clamp(max=1.0) * mask


ELEMENTWISE = (nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Tanh, nn.Sigmoid, nn.Softplus, nn.Identity)


def dense_chain(model: nn.Module, rule: ClientRule | None = None) -> list[tuple[str, nn.Module]] | None:
    """The model as (name, module) steps of the dense path, or None where it does not apply.

    The dense path needs every per-sample gradient to be a Linear layer's outer product: an
    ``nn.Sequential`` of Linear layers (all of their tensors trained), elementwise
    activations and a leading Flatten, no buffers, and no rule loss term (FedLD's margin
    term reads the logits per sample; the vmap path handles it).
    """
    if not isinstance(model, nn.Sequential) or next(model.buffers(), None) is not None or \
            (rule is not None and rule.loss_term is not None):
        return None
    steps, seen_linear = [], False
    for name, module in model.named_children():
        if isinstance(module, nn.Linear):
            if not all(p.requires_grad for p in module.parameters()):
                return None
            seen_linear = True
        elif isinstance(module, nn.Flatten):
            if seen_linear or (module.start_dim, module.end_dim) != (1, -1):
                return None
        elif not isinstance(module, ELEMENTWISE) or any(True for _ in module.parameters()):
            return None
        steps.append((name, module))
    return steps if seen_linear else None


def dense_forward(chain: list[tuple[str, nn.Module]], params: Tensors, x: torch.Tensor, leaf_outputs: bool = True):
    """Outputs (clients, batch, out) of the chain for stacked parameters, and for every Linear
    (its parameter-name prefix, its input a, its output z). With `leaf_outputs`, gradients are
    taken with respect to the outputs z: the first is made a leaf that requires grad, the
    others follow it."""
    h = x.flatten(2) if x.dim() > 3 else x  # (clients, batch, features), an empty batch included
    linears = []
    for name, module in chain:
        if isinstance(module, nn.Linear):
            weight, bias = params[f"{name}.weight"], params.get(f"{name}.bias")
            z = torch.bmm(h, weight.transpose(1, 2)) if bias is None else \
                torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
            if leaf_outputs and not linears:
                z.requires_grad_(True)
            linears.append((name, h, z))
            h = z
        elif not isinstance(module, nn.Flatten):
            h = module(h)
    return h, linears


# The backward of each activation the chain rule is applied to by hand, from the activation's
# output, exactly as autograd differentiates it (torch's derivatives.yaml): the same kernels.
_aten = torch.ops.aten
_BACKWARD_FROM_OUTPUT: dict[type, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    nn.ReLU: lambda grad, out: _aten.threshold_backward(grad, out, 0),
    nn.Tanh: _aten.tanh_backward,
    nn.Sigmoid: _aten.sigmoid_backward,
    nn.Identity: lambda grad, out: grad,
}


def _activation_by_hand(module: nn.Module) -> bool:
    """An activation with a backward in `_BACKWARD_FROM_OUTPUT` that does not work in place (it
    would overwrite an output the backward reads)."""
    return type(module) in _BACKWARD_FROM_OUTPUT and not getattr(module, "inplace", False)


def by_hand(chain: list[tuple[str, nn.Module]] | None) -> bool:
    """Whether `_chain_backward` can differentiate this dense chain (every activation passes
    `_activation_by_hand`); the others go through autograd."""
    return chain is not None and all(isinstance(m, (nn.Linear, nn.Flatten)) or _activation_by_hand(m)
                                     for _, m in chain)


def loss_and_output_grad(task: str, out: torch.Tensor, y: torch.Tensor,
                          weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample losses (clients, batch) of outputs (clients, batch, outputs) and
    d(sum of weight * loss)/d(out), computed as `models.loss_fn`'s loss and autograd compute
    them: cross-entropy is log_softmax then nll_loss (ignore_index -100, no class weights),
    squared error is mse_loss on the squeezed output. None where the shapes are not those."""
    flat_out, flat_y, flat_weight = out.flatten(0, 1), y.flatten(0, 1), weight.reshape(-1)
    if task == "classification" and flat_out.dim() == 2 and flat_y.dim() == 1 and y.dtype == torch.long:
        log_probs = torch.log_softmax(flat_out, 1)
        losses, total_weight = _aten.nll_loss_forward(log_probs, flat_y, None, 0, -100)
        grad = _aten.nll_loss_backward(flat_weight, log_probs, flat_y, None, 0, -100, total_weight)
        grad = _aten._log_softmax_backward_data(grad, log_probs, 1, out.dtype)
    elif task == "regression" and flat_out.dim() == 2 and flat_out.shape[1] == 1 and flat_y.shape == flat_out.shape[:1]:
        squeezed = flat_out.squeeze(-1)
        losses = nn.functional.mse_loss(squeezed, flat_y, reduction="none")
        grad = _aten.mse_loss_backward(flat_weight, squeezed, flat_y, 0).unsqueeze(-1)
    else:
        return None
    return losses.view(y.shape[:2]), grad.view(out.shape)


def _forward_recording(chain: list[tuple[str, nn.Module]], tensor: Callable[[str], torch.Tensor | None],
                       x: torch.Tensor) -> tuple[torch.Tensor, list[tuple[str, Any, Any]]]:
    """The chain's outputs for inputs (clients, batch, ...), each tensor by name from
    `tensor` (stacked per client or shared), and, in order, what a hand-applied backward reads:
    ("linear", name, (input, weight)), ("lora", name, (input, A input, A, B, scale)) or
    ("act", module type, output)."""
    h = x.flatten(2) if x.dim() > 3 else x
    recorded = []
    for name, module in chain:
        if isinstance(module, LoRALinear):
            a, b = tensor(f"{name}.lora_A.weight"), tensor(f"{name}.lora_B.weight")
            u = _linear(h, a)
            z = _linear(h, tensor(f"{name}.base.weight"), tensor(f"{name}.base.bias")) + \
                module.scaling * _linear(u, b)
            recorded.append(("lora", name, (h, u, a, b, module.scaling)))
        elif isinstance(module, nn.Linear):
            weight = tensor(f"{name}.weight")
            z = _linear(h, weight, tensor(f"{name}.bias"))
            recorded.append(("linear", name, (h, weight)))
        elif isinstance(module, nn.Flatten):
            continue
        else:
            z = module(h)
            recorded.append(("act", type(module), z))
        h = z
    return h, recorded


def _chain_backward(chain: list[tuple[str, nn.Module]], params: Tensors, x: torch.Tensor, y: torch.Tensor,
                    weight: torch.Tensor, task: str):
    """`_dense_output_grads` without autograd: the forward keeps each Linear's input and each
    activation's output (`_forward_recording`), and the backward applies the chain rule with
    the kernels autograd would use (a batched Linear's input gradient is ``grad.bmm(weight)``,
    as baddbmm's derivative gives it). Bit for bit autograd's result (tested), at about 40% of
    its cost for MLP(64): no graph is built or walked. None where the loss shapes do not fit."""
    out, recorded = _forward_recording(chain, params.get, x)
    found = loss_and_output_grad(task, out, y, weight)
    if found is None:
        return None
    losses, grad = found
    linears = sum(1 for kind, _, _ in recorded if kind == "linear")
    layers = []  # (name, input, output gradient), last layer first
    for kind, key, saved in reversed(recorded):
        if kind == "act":
            grad = _BACKWARD_FROM_OUTPUT[key](grad, saved)
            continue
        layers.append((key, saved[0], grad))
        if len(layers) == linears:  # nothing before the first Linear is trained
            break
        grad = _input_grad(grad, saved[1])
    return layers[::-1], losses


def _dense_output_grads(chain, params: Tensors, x: torch.Tensor, y: torch.Tensor, weight: torch.Tensor,
                        losses, task: str | None = None) -> tuple[list[tuple[str, torch.Tensor, torch.Tensor]],
                                                                  torch.Tensor]:
    """Per-sample losses (clients, batch) and, for every Linear, (name, input a, d(sum of
    weight * loss)/dz). Samples are independent, so row (k, b) of that gradient is sample b's
    own loss gradient times its weight. With `task` (the chain passed `by_hand`), by
    `_chain_backward`; else through autograd, with `losses`."""
    if task is not None:
        found = _chain_backward(chain, params, x, y, weight, task)
        if found is not None:
            return found
    # the engine may call in inference mode (`vectorized._train_chunk`, where the chain is
    # differentiated by hand): autograd needs it off, and ordinary tensors for what it saves
    with torch.inference_mode(False), torch.enable_grad():
        x, y, weight = (v.clone() if v.is_inference() else v for v in (x, y, weight))
        out, linears = dense_forward(chain, params, x)
        k, b = x.shape[:2]
        per_sample = losses(out.flatten(0, 1), y.flatten(0, 1)).reshape(k, b)
        outputs = [z for _, _, z in linears]
        grads = torch.autograd.grad((per_sample * weight).sum(), outputs)
    # inputs detached: the weight gradients built from them need no graph of their own
    return [(name, a.detach(), g) for (name, a, _), g in zip(linears, grads)], per_sample.detach()


def _dense_weight_grads(layers, params: Tensors, scale: torch.Tensor | None = None) -> Tensors:
    """Sum over samples of each Linear's gradient, g a^T (and g for the bias), with sample
    weights `scale` (clients, batch): one batched matmul per layer."""
    out = {}
    for name, a, g in layers:
        if scale is not None:
            g = g * scale.unsqueeze(-1)
        out[f"{name}.weight"] = torch.bmm(g.transpose(1, 2), a)
        if f"{name}.bias" in params:
            out[f"{name}.bias"] = g.sum(1)
    return out


def dense_clipped_sum(chain, params: Tensors, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      losses, max_grad_norm: float, task: str | None = None) -> tuple[Tensors, torch.Tensor]:
    """Opacus' clipped sum of per-sample gradients, without materializing them: a sample's
    gradient norm squared is sum over Linears of ||g||^2 (||a||^2 + 1 with a bias)."""
    layers, per_sample = _dense_output_grads(chain, params, x, y, mask, losses, task)
    norm_sq = None  # the first layer's term as it is: 0 + x is x for these sums of squares
    for name, a, g in layers:
        inputs_sq = a.square().sum(-1) + (1.0 if f"{name}.bias" in params else 0.0)
        term = g.square().sum(-1) * inputs_sq
        norm_sq = term if norm_sq is None else norm_sq + term
    return _dense_weight_grads(layers, params, clip_factor(norm_sq.sqrt(), max_grad_norm, mask)), per_sample


def dense_batch_grads(chain, params: Tensors, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor,
                      losses, task: str | None = None) -> tuple[Tensors, torch.Tensor]:
    """Each client's gradient of its mean loss over the batch's real rows (no DP), and that loss."""
    count = mask.sum(1, keepdim=True).clamp_min(1.0)
    layers, per_sample = _dense_output_grads(chain, params, x, y, mask / count, losses, task)
    return _dense_weight_grads(layers, params), (per_sample * mask).sum(1) / count.squeeze(1)


def outer_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The model as (name, module) steps of the outer-product path, or None where it does not
    apply: an ``nn.Sequential`` of Linear layers (trained or frozen, in whole or in part), LoRA
    layers (`fedsim.lora.LoRALinear` with a frozen base and no dropout), activations
    `_chain_backward` differentiates and a leading Flatten, with no buffers and something
    trained. `lora-mlp` under FedSVD, FFA-LoRA and FedAvg-LoRA, and `mlp` under FedLD."""
    if not isinstance(model, nn.Sequential) or next(model.buffers(), None) is not None:
        return None
    steps = []
    for name, module in model.named_children():
        if isinstance(module, LoRALinear):
            if not isinstance(module.dropout, nn.Identity) or any(p.requires_grad for p in module.base.parameters()):
                return None
        elif isinstance(module, nn.Flatten):
            if steps or (module.start_dim, module.end_dim) != (1, -1):
                return None
        elif isinstance(module, nn.Linear):
            if module.bias is not None and module.bias.requires_grad and not module.weight.requires_grad:
                return None  # a trained bias on a frozen weight: left to vmap
        elif not _activation_by_hand(module):
            return None
        steps.append((name, module))
    return steps if any(p.requires_grad for p in model.parameters()) else None


def _linear(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A Linear layer on (clients, batch, in) inputs with a shared weight (out, in) or one per
    client (clients, out, in): the calls ``vmap`` over clients and samples makes of it."""
    if weight.dim() == 2:
        return nn.functional.linear(h, weight, bias)
    if bias is None:
        return torch.bmm(h, weight.transpose(1, 2))
    if bias.dim() == 1:  # a frozen bias of a trained weight
        bias = bias.expand(weight.shape[0], -1)
    return torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))


def _input_grad(grad: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A Linear layer's input gradient for its output gradient: grad @ weight, batched per
    client where the weight is."""
    return grad @ weight if weight.dim() == 2 else torch.bmm(grad, weight)


OutputGrads = Callable[[torch.Tensor], "tuple[torch.Tensor, torch.Tensor] | None"]


def outer_grads(chain: list[tuple[str, nn.Module]], params: Tensors, frozen: Tensors, x: torch.Tensor,
                output_grads: OutputGrads, per_sample: bool) -> tuple[Tensors, torch.Tensor] | None:
    """Gradients of the trained tensors of an `outer_chain`, without autograd or ``vmap`` over
    the model: with `per_sample`, each sample's own (clients, batch, ...); else each client's
    (clients, ...). ``output_grads(out)`` gives the losses and the gradient of the model's
    output (clients, batch, outputs), or None (then so is the result).

    A sample's gradient of a Linear weight is the outer product of the layer's output gradient
    g and its input a, of its bias g; of a LoRA layer's B, of s g (s the LoRA scale) and A a;
    of A, of B^T s g and a. Each is computed with the kernels ``vmap(grad)`` uses for it, so
    the result is the vmap path's, bit for bit (tested), at a fraction of its cost.
    """
    def tensor(name: str) -> torch.Tensor | None:
        return params[name] if name in params else frozen.get(name)

    out, recorded = _forward_recording(chain, tensor, x)
    found = output_grads(out)
    if found is None:
        return None
    losses, grad = found

    def weight_grad(output_grad: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        if per_sample:
            return output_grad.unsqueeze(-1) * inputs.unsqueeze(-2)
        return torch.bmm(output_grad.transpose(1, 2), inputs)

    grads: Tensors = {}
    remaining = len(params)  # trained tensors still to reach, walking back
    for kind, key, saved in reversed(recorded):
        if kind == "act":
            grad = _BACKWARD_FROM_OUTPUT[key](grad, saved)
        elif kind == "linear":
            h_in, weight = saved
            if f"{key}.weight" in params:
                grads[f"{key}.weight"] = weight_grad(grad, h_in)
                remaining -= 1
            if f"{key}.bias" in params:
                grads[f"{key}.bias"] = grad if per_sample else grad.sum(1)
                remaining -= 1
            if remaining > 0:
                grad = _input_grad(grad, weight)
        else:
            h_in, u, a, b, scale = saved
            scaled = grad * scale
            if f"{key}.lora_B.weight" in params:
                grads[f"{key}.lora_B.weight"] = weight_grad(scaled, u)
                remaining -= 1
            a_name = f"{key}.lora_A.weight"
            if a_name in params or remaining > 0:
                to_u = _input_grad(scaled, b)
                if a_name in params:
                    grads[a_name] = weight_grad(to_u, h_in)
                    remaining -= 1
                if remaining > 0:
                    grad = _input_grad(grad, tensor(f"{key}.base.weight")) + _input_grad(to_u, a)
        if remaining == 0:
            break
    return {name: grads[name] for name in params}, losses
