"""fedsim: a federated, privacy-aware training simulator on Flower and Opacus.

``import fedsim`` is the Python API (`fedsim.api`): ``fedsim.run``, ``fedsim.sweep``,
``fedsim.report``, ``fedsim.load_run``, ``fedsim.load_model``, ``fedsim.config_for`` and
``fedsim.RunResult``, each imported on first use, so ``import fedsim`` loads neither Flower,
pandas nor torch (the CLI's ``--help``, ``report`` and ``status`` start in a fraction of a second).

Three of these names are also submodules: fedsim/run.py, fedsim/sweep.py and
fedsim/report.py. Importing a submodule sets it as an attribute of the package, so a plain
function ``fedsim.sweep`` would be replaced by the module the first time anything imported
``fedsim.sweep``. Instead the module *is* the function: when the import machinery sets one of
these submodules on the package, its class becomes `CallableModule`, whose ``__call__`` is
the API function. So ``fedsim.sweep(...)`` runs a sweep whatever was imported first, while
``fedsim.sweep.run_sweep``, ``from fedsim.sweep import ...`` and ``fedsim.report.render``
work as before, and the module files stay where they are.

``import fedsim`` also makes the built-in algorithms and models (`fedsim.registry`) load on
the first registry lookup, so every entry point (the CLI, a notebook, a SuperNode loading the
ClientApp) sees the same registry, whichever module it imports first.
"""

import importlib
import inspect
import sys
import types

from fedsim.algorithms import Algorithm, ClientRule, add_registry_loader, get_algorithm, register_algorithm

__version__ = "0.1.0"

add_registry_loader(lambda: importlib.import_module("fedsim.registry"))

# API names, defined in fedsim.api; run, sweep and report are also submodules (see above).
API = ("run", "sweep", "report", "load_run", "load_model", "config_for", "RunResult")
CALLABLE_SUBMODULES = ("run", "sweep", "report")


def _api():
    # imported by name, like the registry: the package root is a facade above the layers
    return importlib.import_module("fedsim.api")


class CallableModule(types.ModuleType):
    """A submodule that is also the API function of its name (``fedsim.sweep(...)``)."""

    def __call__(self, *args, **kwargs):
        return getattr(_api(), self.__name__.rpartition(".")[2])(*args, **kwargs)


class _Package(types.ModuleType):
    def __setattr__(self, name: str, value) -> None:
        if (name in CALLABLE_SUBMODULES and isinstance(value, types.ModuleType)
                and value.__name__ == f"{__name__}.{name}"):
            value.__class__ = CallableModule
            value.__signature__ = inspect.signature(getattr(_api(), name))  # for help() and notebooks' "?"
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name in CALLABLE_SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name in API:
        return getattr(_api(), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(API))


__all__ = ["Algorithm", "ClientRule", "get_algorithm", "register_algorithm", "__version__", *API]
