"""FedSVD: adaptive orthogonalization for private federated LoRA
(Lee et al., "FedSVD: Adaptive Orthogonalization for Private Federated Learning with
LoRA", 2025, arXiv 2505.12805).

Like FFA-LoRA, clients train only B (A frozen before Opacus wraps the model, so DP noise
touches B alone) and upload B; the server averages B. Unlike FFA-LoRA, A does not stay
random: at the start of each round i > 1, per LoRA layer,
    U, S, V^T = SVD(B_i A_{i-1})          (the unscaled product)
    A_i = V^T[:r]   (orthonormal rows)     B_i = U[:, :r] diag(S[:r])
which leaves B A unchanged (rank(B A) <= r) and gives A orthonormal rows ordered by the
singular values of the learned update.

What this does and does not change (tested in tests/test_fedsvd.py): the rows of B A are
combinations of the rows of A, so A_i stays inside span(A_0); B's SGD step, per-sample
clipping and isotropic noise are equivariant to the rotation, so FedSVD follows FFA-LoRA
run on an orthonormal basis of span(A_0) (``model.lora_init = "orthogonal"``). Its gain over
FFA-LoRA with peft's Kaiming A_0 comes from that basis: rows of norm 1 instead of ~1/sqrt(3),
and no spread of singular values when r is not << d_in.

Decisions the paper leaves open:
  * Round 1 sends A0 (Kaiming-uniform) and B0 = 0 untouched: B0 A0 = 0, so an SVD would
    throw A0 away. When B A is rank-deficient later, the trailing rows of V^T from the thin
    SVD are an orthonormal completion: A keeps orthonormal rows and B A is still exact,
    because the matching singular values are 0.
  * "exact" never forms B A: with B = Q_B R_B and A^T = Q_A R_A (thin QR), B A =
    Q_B (R_B R_A^T) Q_A^T, so the SVD of the r x r core gives the exact factors in
    O((d_out + d_in) r^2). "randomized" runs torch.svd_lowrank on the product instead.
  * svd_period n refactorizes in rounds 1 + n, 1 + 2n, ...; other rounds behave as FFA-LoRA.

The client half is FFA-LoRA's (`clients.ffa_lora`): train and upload B only.
"""

from __future__ import annotations

from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord
from flwr.common.logger import log

from fedsim import records as R
from fedsim.config import param
from fedsim.strategies.fedavg import with_params
from fedsim.strategies.ffa_lora import FFALoRA, check_lora_model


@dataclass(frozen=True)
class FedSVDParams:
    """``[strategy.fedsvd]``.

    period : int
        Refactorize B A every n rounds (rounds 1 + n, 1 + 2n, ...); other rounds behave as
        FFA-LoRA.
    method : str
        ``exact`` (thin QR of B and A^T, then the SVD of the r x r core) or ``randomized``
        (`torch.svd_lowrank` on the product).
    """

    period: int = param(1, "refactorize every n rounds", lo=1)
    method: str = param("exact", "exact (QR + small SVD) or randomized SVD", choices=("exact", "randomized"))


# Singular values below this fraction of the largest count as zero in the randomized path:
# far above float64 round-off (~1e-16), far below the float32 resolution (~1e-7) in which the
# factors travel, so dropping them changes B A by less than storing it does.
RANK_RTOL = 1e-9


def refactorize(b: np.ndarray, a: np.ndarray, method: str = "exact") -> tuple[np.ndarray, np.ndarray]:
    """(B_new, A_new) with B_new A_new = B A and A_new having orthonormal rows.

    When B A has fewer than r directions (d_out < r, e.g. a 5-class head with r = 8, or B
    with dependent columns), the missing rows of A are completed from the previous A: an
    orthonormal basis of the part of span(A) the kept rows miss, with zero columns in B. The
    product is unchanged and A stays inside span(A_0). The exact path gets this for free (its factors live in
    span(A) by construction); the randomized SVD's trailing singular vectors are directions
    of its random projection, so it keeps only singular values above `RANK_RTOL` times the
    largest and completes the rest from A in the same way.
    """
    rank = a.shape[0]
    if method == "randomized":
        product = b.astype(np.float64) @ a.astype(np.float64)
        u, s, v = torch.svd_lowrank(torch.as_tensor(product), q=rank, niter=4)
        u, s, vt = u.numpy(), s.numpy(), v.numpy().T
        kept = int(np.count_nonzero(s > RANK_RTOL * (s.max() if s.size else 0.0)))
    else:
        qb, rb = np.linalg.qr(b.astype(np.float64))
        qa, ra = np.linalg.qr(a.T.astype(np.float64))
        uc, s, vct = np.linalg.svd(rb @ ra.T)
        u, vt = qb @ uc, (qa @ vct.T).T
        kept = min(rank, len(s))
    b_new = np.zeros((b.shape[0], rank))
    b_new[:, :kept] = u[:, :kept] * s[:kept]
    a_new = vt[:kept]
    if kept < rank:
        # what of span(A) the kept rows miss: A's rows less their part in span(A_new); its
        # leading right singular vectors are an orthonormal basis of it, whichever rows of A
        # happen to be dependent on the kept ones (a QR of [A_new; A] picks wrong ones then)
        a64 = a.astype(np.float64)
        rest = a64 - (a64 @ a_new.T) @ a_new
        a_new = np.concatenate([a_new, np.linalg.svd(rest)[2][:rank - kept]])
    return b_new.astype(b.dtype), a_new.astype(a.dtype)


class FedSVD(FFALoRA):
    """FedSVD's server half: FFA-LoRA plus the refactorization of B A between rounds.

    Parameters
    ----------
    svd_period : int
        Refactorize every n rounds (default 1).
    svd_method : str
        "exact" (QR + small SVD) or "randomized".
    **fedavg_kwargs
        Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, svd_period: int = 1, svd_method: str = "exact", **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if svd_period < 1 or svd_method not in ("exact", "randomized"):
            raise ValueError(f"FedSVD: svd_period >= 1 and svd_method 'exact' or 'randomized' "
                             f"(got {svd_period}, {svd_method!r})")
        self.svd_period = svd_period
        self.svd_method = svd_method

    def summary(self) -> None:
        log(INFO, "\t├──> FedSVD settings:")
        log(INFO, "\t│\t└── refactorize every %d round(s) | %s SVD", self.svd_period, self.svd_method)
        super().summary()

    def prepare_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        if server_round == 1 or (server_round - 1) % self.svd_period != 0:
            return arrays
        tensors = R.record_to_numpy(arrays)
        for key_b in [k for k in tensors if ".lora_B." in k]:
            key_a = key_b.replace(".lora_B.", ".lora_A.")
            tensors[key_b], tensors[key_a] = refactorize(tensors[key_b], tensors[key_a], self.svd_method)
        return R.numpy_to_record(tensors)


check = check_lora_model


def build(params: FedSVDParams, cfg: Any, fedavg_kwargs: dict) -> FedSVD:
    return with_params(FedSVD(**fedavg_kwargs, svd_period=params.period, svd_method=params.method), params)
