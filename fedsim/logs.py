"""Logging and warnings for fedsim's commands, the Python API and a sweep's worker processes.

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
import re
import sys
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


def _installed(action: str, message: str, category: type[Warning], module: str = "") -> bool:
    """Whether `warnings.filterwarnings` with these arguments has already put this filter in place
    (it stores the patterns compiled, and equal patterns compile to equal objects)."""
    entry = (action, re.compile(message, re.I) if message else None, category,
             re.compile(module) if module else None, 0)
    return entry in warnings.filters


def filter_harmless_warnings() -> None:
    """Hide the known-harmless warnings above; every other warning keeps its default action.

    Each filter is added only if it is not there yet: any change to the warning filters makes
    Python forget which "once" warnings it has shown, so re-adding them per run (the API and
    an in-process sweep set up logging per run) showed "Secure RNG turned off" per sweep cell."""
    for message, category, module in HARMLESS_WARNINGS:
        if not _installed("ignore", message, category, module):
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for message, category in ONCE_WARNINGS:
        if not _installed("once", message, category):
            warnings.filterwarnings("once", message=message, category=category)


# Libraries whose loggers fedsim routes (see `setup_logging`), with the lowest level their
# console shows by default: Flower only its errors (its INFO is a banner and a line per
# round), Opacus and MLflow their warnings.
LIBRARY_LOGGERS: dict[str, int] = {"flwr": logging.ERROR, "opacus": logging.WARNING, "mlflow": logging.WARNING}
# One console style for everything fedsim prints, like its errors ("error: ..."): fedsim's
# own lines as "warning: ..." (Python warnings too), a library's as "warning: flwr: ...".
FEDSIM_FORMAT = "%(levelname_lower)s: %(message)s"
LIBRARY_FORMAT = "%(levelname_lower)s: %(name)s: %(message)s"


class ConsoleFormatter(logging.Formatter):
    """`logging.Formatter` with ``%(levelname_lower)s``: "warning", "info", "error"."""

    def format(self, record: logging.LogRecord) -> str:
        record.levelname_lower = record.levelname.lower()
        return super().format(record)


class ConsoleHandler(logging.StreamHandler):
    """A console handler that writes to whatever ``sys.stderr`` is when a record comes, so a
    notebook kernel or a test that swaps stderr after set-up still gets the lines."""

    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.setFormatter(ConsoleFormatter(fmt))

    @property
    def stream(self):  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:  # StreamHandler.__init__ assigns it; stderr is read per record
        pass

    def emit(self, record: logging.LogRecord) -> None:
        with around_progress_bars():
            super().emit(record)


def around_progress_bars():
    """A context in which a console line does not land in the middle of a run's or a sweep's
    tqdm bar: the bars on the console are cleared first and drawn again after (tqdm's own
    ``external_write_mode``, what ``tqdm.write`` uses)."""
    from tqdm import tqdm

    return tqdm.external_write_mode(file=sys.stderr)


def show_warnings_around_progress_bars() -> None:
    """Print Python warnings around the console's progress bars (`around_progress_bars`). The
    CLI does this for its process; the Python API leaves ``warnings.showwarning`` alone, since
    replacing it would stop a caller's ``warnings.catch_warnings(record=True)`` from recording."""
    warnings.showwarning = _show_warning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """``warnings.showwarning`` for the console: Python's, around any progress bar."""
    stream = file if file is not None else sys.stderr
    try:
        with around_progress_bars():
            stream.write(warnings.formatwarning(message, category, filename, lineno, line))
    except (OSError, AttributeError):  # no usable stderr (pythonw, a closed stream): as Python does
        pass


class ToRunLog(logging.Handler):
    """Hands a library's records to the run.log file handlers that `fedsim.results.run_log`
    puts on fedsim's logger while a run is on, so run.log has Flower's and Opacus' lines too."""

    def emit(self, record: logging.LogRecord) -> None:
        for handler in logging.getLogger("fedsim").handlers:
            if isinstance(handler, logging.FileHandler) and record.levelno >= handler.level:
                handler.handle(record)


def _consoles(logger: logging.Logger) -> list[logging.Handler]:
    return [h for h in logger.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def route_library_logger(name: str, console_level: int) -> None:
    """INFO and above of library `name` into run.log, `console_level` and above on the
    console (the library's own console handler if it has one, else a new one), and nothing to
    the root logger. Propagating to the root printed every Flower line twice: Opacus calls
    ``logging.basicConfig`` on import, so the root logger has a console handler of its own."""
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    consoles = _consoles(logger)
    if not consoles:
        consoles = [ConsoleHandler(LIBRARY_FORMAT)]
        logger.addHandler(consoles[0])
    for handler in consoles:
        handler.setLevel(console_level)
    if not any(isinstance(h, ToRunLog) for h in logger.handlers):  # once, however often set up
        logger.addHandler(ToRunLog())


_PYTHON_FORMAT = warnings.formatwarning


_shown_once: set[str] = set()  # the ONCE_WARNINGS texts this process has shown


def _one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A Python warning as the quiet console shows it: one line, without the source line of the
    library code that raised it (``-v`` keeps Python's own format, with file and line).

    A warning of ONCE_WARNINGS that this process has shown already is shown as nothing: Python's
    own "once" forgets what it has shown whenever any code enters ``warnings.catch_warnings``
    (many libraries do, per call), which showed "Secure RNG turned off" once per sweep cell."""
    text = " ".join(str(message).split())
    if any(re.match(pattern, text, re.I) and issubclass(category, kind) for pattern, kind in ONCE_WARNINGS):
        if text in _shown_once:
            return ""
        _shown_once.add(text)
    return f"warning: {text}\n"


def setup_logging(verbose: bool) -> None:
    """Quiet by default: warnings only, Flower's INFO chatter and known-harmless Python
    warnings hidden unless verbose (which shows every warning untouched). Flower's, Opacus'
    and MLflow's INFO lines go to run.log either way. Safe to call again (the Python API
    does, per run): no handler is added twice."""
    if not verbose:  # before importing flwr, whose dependencies warn on import
        filter_harmless_warnings()
    warnings.formatwarning = _PYTHON_FORMAT if verbose else _one_line_warning
    # MLflow replaces its loggers' handlers when it is imported unless told not to; fedsim
    # routes them here instead (a user's own setting of the variable wins).
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    import flwr.common.logger  # noqa: F401 - flwr configures its logger on import; override after

    fedsim_log = logging.getLogger("fedsim")
    consoles = [h for h in fedsim_log.handlers if isinstance(h, ConsoleHandler)]
    if not consoles:
        consoles = [ConsoleHandler(FEDSIM_FORMAT)]
        fedsim_log.addHandler(consoles[0])
    consoles[0].setFormatter(ConsoleFormatter(FEDSIM_FORMAT))
    consoles[0].setLevel(logging.INFO if verbose else logging.WARNING)
    fedsim_log.setLevel(logging.INFO)
    fedsim_log.propagate = False
    for name, quiet_level in LIBRARY_LOGGERS.items():
        route_library_logger(name, logging.INFO if verbose else quiet_level)
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
