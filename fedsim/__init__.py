"""fedsim: a federated, privacy-aware training simulator on Flower and Opacus."""

__version__ = "0.1.0"
