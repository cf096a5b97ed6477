"""FedLD: principal-gradient aggregation (Zeng et al., "Tackling Data Heterogeneity in
Federated Learning via Loss Decomposition", MICCAI 2024; code: github.com/Zeng-Shuang/FedLD).

FedLD splits the global loss into local + distribution-shift + aggregation losses. Clients
fight distribution shift with a margin-control term (`clients.fedld`, weighted by
``margin_lambda``). The server fights aggregation loss by
keeping only the consistent principal directions of the client updates.

Per parameter tensor, over the m clients that replied:
  1. Delta_i = theta_i - theta_g (flattened), G = [Delta_1; ...; Delta_m]  (m x d)
  2. H = G G^T / m = E diag(s) E^T, principal directions v_j = G^T e_j
  3. k = int(k_fraction * m); flip v_j (j < k) if more clients have <Delta_i, v_j> < 0 than >= 0
  4. Delta~_i = sum_{j<k} sign(<Delta_i, v_j>) (s_j / S) ||Delta_i|| v_j / ||v_j||
     with S = sum_l s_l ("all", the authors' form) or sum_{j<k} s_j ("topk")
  5. theta_g <- theta_g + (1/m) sum_i Delta~_i
  6. round 1 and scalar tensors: the plain mean of the client models.
The SVD is of an m x m matrix, so a round costs O(m^2 d): linear in the model size.

Decisions the authors' code leaves open:
  * guards: a zero singular value or zero projection would give NaN; directions with
    ||v_j|| = 0 are skipped, sign(0) counts as +1 (consistent with step 3's ">= 0"), and an
    all-zero G gives a zero update.
  * partial participation: only the clients that replied this round form G.
  * k: at least 1, so m = 1 keeps its single direction (Delta~ = Delta when S is "topk").
It is post-processing of the clients' DP outputs, so it does not change epsilon.

The client half (margin control) is `clients.fedld`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common.logger import log

from fedsim import records as R
from fedsim.config import param
from fedsim.strategies.fedavg import RoundFedAvg, check_arrays, with_params
from fedsim.errors import ConfigError


@dataclass(frozen=True)
class FedLDParams:
    """``[strategy.fedld]``: both halves of FedLD.

    k_fraction : float
        Share of principal directions the server keeps, k = max(1, int(k_fraction * m)).
    normalization : str
        Divide the direction weights by the sum of ``all`` singular values (the authors'
        code) or of the ``topk`` kept ones.
    margin_lambda : float
        Weight lambda of the clients' margin-control term lambda * log(1 + ||softmax(z)||^2).
    margin_mode : str
        ``batch``: the norm over the whole batch x classes matrix (the authors' code);
        ``sample``: the mean over samples of the per-sample term. Under DP-SGD fedsim always
        uses ``sample``: the batch form couples samples, so clipping would not bound one
        sample's influence.
    """

    k_fraction: float = param(0.8, "share of principal directions kept", lo=0.0, hi=1.0, lo_open=True)
    normalization: str = param("all", "divide by the sum of all or of the top-k singular values",
                               choices=("all", "topk"))
    margin_lambda: float = param(0.1, "margin-control weight lambda (clients)", lo=0.0)
    margin_mode: str = param("batch", "margin norm over the batch (authors) or per-sample mean; "
                             "always per-sample under DP-SGD", choices=("batch", "sample"))


def principal_gradient_update(deltas: np.ndarray, k_fraction: float = 0.8,
                              normalization: str = "all") -> np.ndarray:
    """The aggregated update g = (1/m) sum_i Delta~_i for G = deltas of shape (m, d).

    Only the Gram matrix touches d. With H = G G^T / m = E diag(s) E^T and v_j = G^T e_j:
      <Delta_i, v_j> = (G G^T e_j)_i = m s_j E_ij      ||v_j|| = sqrt(e_j^T G G^T e_j) = sqrt(m s_j)
      ||Delta_i||    = sqrt(m H_ii)
    and sum_i sum_j w_ij v_j / ||v_j|| = G^T (E_k c) with c_j = sum_i w_ij / ||v_j||.
    So one round costs O(m^2 d) for the Gram plus O(m d) for the final product, and never
    materializes the k x d directions.
    """
    g = np.asarray(deltas)
    if g.dtype not in (np.float32, np.float64):
        g = g.astype(np.float64)
    m = g.shape[0]
    gram = (g @ g.T).astype(np.float64) / m
    eigvecs, s, _ = np.linalg.svd(gram)  # H is symmetric PSD: its SVD is its eigendecomposition
    k = max(1, int(k_fraction * m))
    s_k = np.clip(s[:k], 0.0, None)
    total = s.sum() if normalization == "all" else s_k.sum()
    if total <= 0:
        return np.zeros(g.shape[1], dtype=g.dtype)
    proj = m * eigvecs[:, :k] * s_k  # <Delta_i, v_j>, shape (m, k)
    flip = np.where((proj < 0).sum(axis=0) > (proj >= 0).sum(axis=0), -1.0, 1.0)  # step 3
    proj = proj * flip
    signs = np.where(proj >= 0, 1.0, -1.0)
    client_norms = np.sqrt(np.clip(np.diag(gram) * m, 0.0, None))
    weights = (s_k / total)[None, :] * signs * client_norms[:, None]  # (m, k)
    norms = np.sqrt(m * s_k)
    usable = norms > 0  # guard: a zero singular value has no direction
    coef = np.zeros(k)
    coef[usable] = weights.sum(axis=0)[usable] / norms[usable] * flip[usable]
    return (g.T @ (eigvecs[:, :k] @ coef).astype(g.dtype)) / m


class FedLD(RoundFedAvg):
    """FedLD's server half: principal-gradient aggregation.

    Parameters
    ----------
    k_fraction : float
        Share of principal directions kept, k = max(1, int(k_fraction * m)). Default 0.8.
    normalization : str
        "all" (divide by the sum of all singular values, the authors' form) or "topk".
    **fedavg_kwargs
        Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
    """

    def __init__(self, *, k_fraction: float = 0.8, normalization: str = "all", **fedavg_kwargs: Any) -> None:
        super().__init__(**fedavg_kwargs)
        if not 0 < k_fraction <= 1 or normalization not in ("all", "topk"):
            raise ValueError(f"FedLD: k_fraction in (0, 1] and normalization 'all' or 'topk' "
                             f"(got {k_fraction}, {normalization!r})")
        self.k_fraction = k_fraction
        self.normalization = normalization

    def summary(self) -> None:
        log(INFO, "\t├──> FedLD settings:")
        log(INFO, "\t│\t└── k_fraction (%s) | normalization (%s)", f"{self.k_fraction:.6g}", self.normalization)
        super().summary()

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid = R.successful_replies(list(replies))
        if not valid:
            return None, None
        views = R.model_views(valid, self.weighted_by_key)
        metrics = self.train_metrics_aggr_fn(views, self.weighted_by_key)
        models = [R.record_to_numpy(R.record_of(v, R.ARRAYS, ArrayRecord)) for v in views]
        current = self.round_arrays()
        for model in models:
            check_arrays(current, model)
        out = {}
        for key, theta_g in current.items():
            stacked = np.stack([m[key] for m in models]).astype(np.float64)
            if server_round == 1 or theta_g.size == 1 or not np.issubdtype(theta_g.dtype, np.floating):
                out[key] = stacked.mean(axis=0).astype(theta_g.dtype)
                continue
            deltas = (stacked - theta_g).reshape(len(models), -1)
            update = principal_gradient_update(deltas, self.k_fraction, self.normalization)
            out[key] = (theta_g + update.reshape(theta_g.shape)).astype(theta_g.dtype)
        return R.numpy_to_record(out), metrics


def check(params: FedLDParams, cfg: Any, data: Any, sizes: list[int]) -> None:
    if data.task != "classification":
        raise ConfigError("strategy.name: fedld's margin control needs a classification dataset")


def build(params: FedLDParams, cfg: Any, fedavg_kwargs: dict) -> FedLD:
    return with_params(FedLD(**fedavg_kwargs, k_fraction=params.k_fraction, normalization=params.normalization),
                       params)
