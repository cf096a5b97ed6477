"""FedAvg-LoRA's client half: train and upload both adapters, A and B (both noised under DP)."""

from fedsim.algorithms import ClientRule

RULE = ClientRule(trainable="lora", upload="lora")
