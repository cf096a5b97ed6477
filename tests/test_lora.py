"""LoRA layers (`fedsim.lora`): the initializations of A and B."""

from __future__ import annotations

import numpy as np


def test_lora_inits_orthogonal_keeps_the_span_and_pissa_keeps_the_output():
    import torch
    from torch import nn

    from fedsim.lora import LoRALinear

    def layer(init):
        torch.manual_seed(0)
        return LoRALinear(nn.Linear(24, 10), rank=6, alpha=12.0, init=init)

    kaiming = layer("kaiming").lora_A.weight.detach().double()
    orth = layer("orthogonal").lora_A.weight.detach().double()
    np.testing.assert_allclose((orth @ orth.T).numpy(), np.eye(6), atol=1e-6)
    # same row space: projecting the Kaiming rows onto the orthonormal rows loses nothing
    np.testing.assert_allclose((kaiming @ orth.T @ orth).numpy(), kaiming.numpy(), atol=1e-6)

    torch.manual_seed(0)
    w0 = nn.Linear(24, 10).weight.detach().double()
    pissa = layer("pissa")
    a, b = pissa.lora_A.weight.detach().double(), pissa.lora_B.weight.detach().double()
    u, s, vt = np.linalg.svd(w0.numpy())
    # the scaled product is the top-6 SVD of W0, the frozen base holds the rest
    np.testing.assert_allclose((pissa.scaling * b @ a).numpy(), (u[:, :6] * s[:6]) @ vt[:6], atol=1e-5)
    residual = pissa.base.weight.detach().double()
    np.testing.assert_allclose((residual + pissa.scaling * b @ a).numpy(), w0.numpy(), atol=1e-5)
    x = torch.randn(3, 24)
    torch.manual_seed(0)
    plain = nn.Linear(24, 10)
    with torch.no_grad():
        torch.testing.assert_close(pissa(x), plain(x), atol=1e-5, rtol=1e-5)
