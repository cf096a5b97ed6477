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

In a Flower App Bundle built from the checkout (`flwr run .`, `fedsim deploy local`),
``fedsim.strategies`` and ``fedsim.clients`` are the bundle's own ``strategies/`` and
``clients/`` (`_BundleFinder`).
"""

import importlib
import importlib.util
import inspect
import os
import sys
import types

from fedsim.algorithms import Algorithm, ClientRule, add_registry_loader, get_algorithm, register_algorithm

__version__ = "0.1.0"


class _BundleFinder:
    """Finds ``fedsim.strategies`` and ``fedsim.clients`` in the directories beside ``fedsim/``.

    Flower builds an app bundle (FAB) from the files of the app directory and skips symbolic
    links, so a bundle of the checkout holds ``fedsim/`` without the links ``fedsim/strategies``
    and ``fedsim/clients``, and ``strategies/`` and ``clients/`` at its top. A SuperNode puts
    the unpacked bundle first on ``sys.path``, so ``fedsim`` comes from there, ahead of any
    installed copy: without this finder ``import fedsim.clients`` fails where fedsim was
    installed from a wheel (an editable install only hid it, importing the checkout's clients
    beside the bundle's core). It maps the two names as the wheel's ``package-dir`` does."""

    def __init__(self, dirs: dict[str, str]) -> None:
        self.dirs = dirs

    def find_spec(self, fullname: str, path=None, target=None):
        where = self.dirs.get(fullname)
        if where is None:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(where, "__init__.py"),
                                                      submodule_search_locations=[where])


def _find_bundle_subpackages() -> None:
    """Install `_BundleFinder` when this is an app bundle's (or a copy's) fedsim/: the two
    subpackages missing inside it, present beside it, with the app's pyproject.toml above."""
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    dirs = {f"{__name__}.{name}": os.path.join(root, name) for name in ("strategies", "clients")
            if not os.path.exists(os.path.join(here, name))
            and os.path.isfile(os.path.join(root, name, "__init__.py"))}
    if dirs and os.path.isfile(os.path.join(root, "pyproject.toml")) and not any(
            isinstance(f, _BundleFinder) and f.dirs == dirs for f in sys.meta_path):
        sys.meta_path.insert(0, _BundleFinder(dirs))  # ahead of an editable install's finder


_find_bundle_subpackages()

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
