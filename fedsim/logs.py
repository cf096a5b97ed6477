"""Logging and warnings for fedsim's commands (and for a sweep's worker processes).

Quiet by default, but never about privacy. Only warnings known to be noise are hidden,
each matched by its message *and* category so that nothing else with a similar text is
swallowed. Everything else, Opacus' privacy warnings in particular ("Secure RNG turned
off", "Optimal order is the largest alpha", accounting and sample-rate notes), still
reaches the user: a privacy tool must not hide statements about privacy.

The list was taken from `python -W always -m fedsim.cli run ...` on configs/quickstart.toml,
configs/fedsvd.toml, the other shipped configs and `--runtime ray`; every warning those
runs emit is either filtered below (with the reason) or deliberately left visible.
"""

from __future__ import annotations

import logging
import os
import warnings

# (message regex matched at the start of the text, category, module regex or "" for any, why harmless)
HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # torch, raised at every client's first loss.backward(): the input batch does not require
    # gradients, so the full backward hook Opacus puts on the first layer gets grad_input = None.
    # Opacus computes per-sample gradients from the layer's activations and grad_output only,
    # so clipping, noise and accounting are unaffected.
    (r"Full backward hook is firing when gradients are computed with respect to module outputs",
     UserWarning, ""),
    # ray (runtime.name = "ray"), at ray.init: a note about a future change in how Ray sets
    # CUDA_VISIBLE_DEVICES for num_gpus=0 actors; fedsim sets each actor's GPUs explicitly.
    (r"Tip: In future versions of Ray, Ray will no longer override accelerator visible devices",
     FutureWarning, r"ray(\.|$)"),
    # Flower's dependencies (typer/click) and Flower itself: API deprecations inside those
    # libraries, not in fedsim's code; nothing a fedsim user can or needs to act on.
    (r"", DeprecationWarning, r"(flwr|typer|click)(\.|$)"),
)

# Shown, but once per process rather than once per client-round: Opacus warns at every
# make_private() (every client, every round) that its RNG is not cryptographically secure.
# That is a true statement about the privacy guarantee (secure_mode is off), so it stays.
ONCE_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (
    (r"Secure RNG turned off", UserWarning),
)


def filter_harmless_warnings() -> None:
    """Hide the known-harmless warnings above; every other warning keeps its default action."""
    for message, category, module in HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for message, category in ONCE_WARNINGS:
        warnings.filterwarnings("once", message=message, category=category)


def setup_logging(verbose: bool) -> None:
    """Quiet by default: warnings only, Flower's INFO chatter and known-harmless Python
    warnings hidden unless -v (verbose shows every warning untouched)."""
    if not verbose:  # before importing flwr, whose dependencies warn on import
        filter_harmless_warnings()
    import flwr.common.logger  # noqa: F401 - flwr configures its logger on import; override after

    level = logging.INFO if verbose else logging.WARNING
    fedsim_log = logging.getLogger("fedsim")
    if not fedsim_log.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s fedsim: %(message)s"))
        fedsim_log.addHandler(handler)
    fedsim_log.handlers[0].setLevel(level)
    fedsim_log.propagate = False
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.ERROR)
    flwr_log.propagate = False
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
