"""FFA-LoRA: federated freeze-A LoRA (Sun et al., "Improving LoRA in Privacy-preserving
Federated Learning", ICLR 2024, arXiv 2403.12313).

A stays at its random initialization for the whole run; clients train and upload only B
(`clients.ffa_lora`), and the server averages B. With A fixed, averaging B averages the
products B A exactly, which is what makes LoRA aggregation sound under DP noise. It is also
the base of FedSVD, which re-orthogonalizes A between rounds (`strategies.fedsvd`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord

from fedsim.strategies.fedavg import RoundFedAvg, with_params
from fedsim.errors import ConfigError


@dataclass(frozen=True)
class FFALoRAParams:
    """FFA-LoRA has no knobs of its own; the adapters' rank and init are in ``[model]``."""


class FFALoRA(RoundFedAvg):
    """Averages the uploaded B; sends the last round's A and averaged B. The new global
    arrays are the round's with B replaced by the average: B_{i+1} = sum_k n_k/n B_k, A as
    sent (`RoundFedAvg` without a server update).

    Parameters
    ----------
    **fedavg_kwargs
        Sampling and key options of `flwr.serverapp.strategy.FedAvg`.
    """

    def prepare_round(self, server_round: int, arrays: ArrayRecord) -> ArrayRecord:
        """The adapters sent this round; FedSVD refactorizes here, FFA-LoRA sends them as they are."""
        return arrays


def check_lora_model(params: Any, cfg: Any, data: Any, sizes: list[int]) -> None:
    """The LoRA strategies train adapters: the model must have them (lora-mlp, hf-text, lora-...)."""
    if not (cfg.model.name.startswith("lora-") or cfg.model.name == "hf-text"):
        raise ConfigError(f"model.name: strategy {cfg.strategy.name!r} needs a LoRA model (lora-mlp, hf-text "
                          f"or a registered lora-... model), got {cfg.model.name!r}")


check = check_lora_model


def build(params: FFALoRAParams, cfg: Any, fedavg_kwargs: dict) -> FFALoRA:
    return with_params(FFALoRA(**fedavg_kwargs), params)
