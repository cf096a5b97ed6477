"""fedsim: a federated, privacy-aware training simulator on Flower and Opacus.

``import fedsim`` makes the built-in algorithms and models (`fedsim.registry`) load on the
first registry lookup, so every entry point (the CLI, a notebook, a SuperNode loading the
ClientApp) sees the same registry, whichever module it imports first.
"""

import importlib

from fedsim.algorithms import Algorithm, ClientRule, add_registry_loader, get_algorithm, register_algorithm

__version__ = "0.1.0"

add_registry_loader(lambda: importlib.import_module("fedsim.registry"))

__all__ = ["Algorithm", "ClientRule", "get_algorithm", "register_algorithm", "__version__"]
