"""FFA-LoRA's client half (Sun et al., ICLR 2024), also FedSVD's: train and upload B only.

A is frozen *before* Opacus wraps the model, so DP-SGD's per-sample gradients, clipping and
noise cover B alone.
"""

from fedsim.algorithms import ClientRule

RULE = ClientRule(trainable="lora-b", upload="lora-b")
