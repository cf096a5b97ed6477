"""FedAvg's client half: plain local SGD (DP-SGD when sigma > 0) on every tensor.

Also the client half of FedAdam and of the bags-free baselines: the default `ClientRule`
changes nothing.
"""

from fedsim.algorithms import ClientRule

RULE = ClientRule()
