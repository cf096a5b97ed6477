"""The `fedsim` command line.

Every flag maps to one config key and goes through the same validation as the TOML
file, so a bad value is refused with the key's name and allowed values. Bad input
prints one line and exits 2; a failing client exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsim.api import OVERRIDE_KEYS
from fedsim.errors import ClientFailure, FedsimError
from fedsim.logs import setup_logging, show_warnings_around_progress_bars

# flag -> config key, for `run`, `partition`, `sweep` and `deploy local`: the Python API's
# keyword overrides (fedsim.api.OVERRIDE_KEYS), dashed, so both name every key alike
RUN_FLAGS: dict[str, str] = {"--" + name.replace("_", "-"): key for name, key in OVERRIDE_KEYS.items()}
# flag -> (metavar, help) where the config key alone does not say enough
FLAG_HELP: dict[str, tuple[str, str]] = {
    "--target-epsilon": ("EPS", "calibrate sigma to this sample-level epsilon"),
}


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        sys.stderr.write(f"error: {self.prog}: {message}\n")
        raise SystemExit(2)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def overrides_from(args: argparse.Namespace) -> dict:
    from fedsim.config import parse_assignment, parse_value

    out = {key: parse_value(getattr(args, key)) for key in RUN_FLAGS.values() if getattr(args, key, None) is not None}
    for item in args.set:
        key, value = parse_assignment(item)
        out[key] = value
    if "output.dir" in out:
        out["output.dir"] = str(out["output.dir"])
        if not out["output.dir"].strip():
            from fedsim.errors import ConfigError

            raise ConfigError("output.dir: --out got an empty path; give a directory, or leave --out out for "
                              "runs/<name>-<timestamp>")
    return out


def _load(args: argparse.Namespace, overrides: dict | None = None):
    from fedsim.config import load_config

    return load_config(args.config, overrides_from(args) if overrides is None else overrides, strict=args.strict)


def _count(minimum: int):
    """argparse type: an integer >= minimum (a bad one is argparse's one-line error, exit 2)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum} (got {value})")
        return value
    return parse


def _check_plot(path: str | None) -> None:
    """A --plot file with an extension matplotlib cannot write is refused before any work."""
    if path:
        from fedsim.plots import check_plot_path

        check_plot_path(path)


def _seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0 (got {text!r})")
    return value


# ----------------------------------------------------------------------------- commands

def _resume_config(args: argparse.Namespace):
    """The config of ``run --resume DIR``: DIR/config.toml, with any flags on top (a flag that
    changes it makes the resume refuse, naming the key)."""
    from fedsim.checkpoint import checkpoint_path
    from fedsim.config import load_config
    from fedsim.errors import ConfigError
    from fedsim.results import CONFIG_TOML, run_state

    run_dir = Path(args.resume)
    if args.config:
        raise ConfigError(f"run: --resume reads {run_dir / CONFIG_TOML}; give no config file with it "
                          f"(got {args.config})")
    if args.overwrite:
        raise ConfigError("run: --resume and --overwrite exclude each other")
    if not (run_dir / CONFIG_TOML).is_file():
        raise ConfigError(f"--resume: {run_dir} is not a run directory (no {CONFIG_TOML})")
    state = run_state(run_dir)
    if state == "finished":
        raise ConfigError(f"--resume: {run_dir}: finished run, nothing to resume (--overwrite runs it again)")
    if state != "running" and not checkpoint_path(run_dir).is_file():
        raise ConfigError(f"--resume: {run_dir}: no checkpoint to resume from (run {state}; "
                          f"output.checkpoint_every = 0, or no round finished)")
    overrides = overrides_from(args)
    out = overrides.pop("output.dir", None)
    if out is not None and Path(out).resolve() != run_dir.resolve():
        raise ConfigError(f"run: --out {out} differs from --resume {run_dir}; a run resumes in its own directory")
    try:
        cfg = load_config(run_dir / CONFIG_TOML, overrides)
    except ConfigError as exc:
        if any(str(exc).startswith(key + ":") for key in overrides):  # a flag's own value: the flag's line
            raise
        raise ConfigError(f"--resume: {run_dir / CONFIG_TOML}: {exc}") from None
    if not cfg.output.dir or Path(cfg.output.dir).resolve() != run_dir.resolve():
        cfg.output.dir = str(run_dir)  # the run directory was moved (or config.toml names a relative path)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.results import read_summary
    from fedsim.run import run_experiment

    from fedsim.run import default_out_dir

    if args.resume:
        cfg = _resume_config(args)
        args.run_dir = cfg.output.dir
        try:
            out = run_experiment(cfg, progress=not args.no_progress, resume=True)
        except FedsimError as exc:  # the run directory's own files are damaged: say whence
            if str(exc).startswith(str(args.resume).rstrip("/")):
                exc.args = (f"--resume: {exc}",)
            elif str(exc).startswith("config: the saved experiment"):  # the checkpoint's copy of the config
                exc.args = (f"--resume: {args.resume}: checkpoint{str(exc)[len('config'):]}",)
            raise
    else:
        cfg = _load(args)
        cfg.output.dir = cfg.output.dir or default_out_dir(cfg)
        args.run_dir = cfg.output.dir  # what an interruption's message names
        out = run_experiment(cfg, progress=not args.no_progress, overwrite=args.overwrite)
    summary = read_summary(out) or {}
    line = (f"{summary.get('metric_name')}: final {summary.get('final_metric'):.4f}, "
            f"best {summary.get('best_metric'):.4f} (round {summary.get('best_round')}, "
            f"selected on {summary.get('best_selected_on', 'test')})")
    sample = summary.get("sample_level") or {}
    if sample.get("accountant"):
        median = sample.get("epsilon_median")
        line += (f"; sample-level eps {sample['epsilon_max']:.2f} (largest client"
                 + (f", median {median:.2f}" if median is not None else "")
                 + f") at delta={sample['delta']:g} ({sample['accountant']})")
    user = summary.get("user_level")
    if user:
        line += f"; user-level eps {user['epsilon']:.2f} at delta={user['delta']:g} ({user['accountant']})"
    print(line)
    print(f"results: {out}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from fedsim.audit import run_audit

    record = run_audit(_load(args), level=args.level, mode=args.mode, canaries=args.canaries, beta=args.beta,
                       progress=not args.no_progress, overwrite=args.overwrite)
    others = ", ".join(f"{name} {found['epsilon_lower']:.3g}" if isinstance(found["epsilon_lower"], float)
                       else f"{name} {found['epsilon_lower']}"
                       for name, found in record["analyses"].items() if name != record["analysis"])
    print(f"epsilon_lower {record['epsilon_lower']:.3f} ({record['analysis']}, confidence 1 - beta = "
          f"{1 - record['beta']:g}; {others})")
    if record["epsilon_upper"] is None:
        print(f"epsilon_upper none: no {record['level']}-level DP in this run (the accountant claims nothing)")
    else:
        print(f"epsilon_upper {record['epsilon_upper']:.3f} at delta={record['delta']:g} ({record['accountant']}); "
              f"ratio lower/upper {record['ratio']:.2f}")
    print(f"guesses {record['guesses']}, correct {record['correct']} ({record['canaries']} canaries, "
          f"{record['level']} level, {record['mode']})")
    print(f"audit: {Path(record['run_dir']) / 'audit.json'}")
    return 0


def _beta(text: str) -> float:
    """argparse type: a confidence parameter in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1) (got {value})")
    return value


def cmd_partition(args: argparse.Namespace) -> int:
    from fedsim.partition import label_counts, partition

    _check_plot(args.plot)
    cfg = _load(args)
    counts = label_counts(cfg)
    left_out = partition(cfg).left_out  # the same partition, cached
    width = max(3, len(str(counts.max())))
    header = "client  size  " + " ".join(f"{c:>{width}}" for c in range(counts.shape[1]))
    unused = f", {left_out} left out" if left_out else ""
    print(f"{cfg.data.dataset}: {counts.sum()} training samples over {len(counts)} clients "
          f"({cfg.data.partitioner}{unused}); label counts per client:")
    print(header)
    for i, row in enumerate(counts):
        print(f"{i:>6} {row.sum():>5}  " + " ".join(f"{c:>{width}}" for c in row))
    if args.plot:
        from fedsim.plots import plot_label_distribution

        try:
            plot_label_distribution(cfg, counts, Path(args.plot))
        except OSError as exc:
            sys.stderr.write(f"error: partition: cannot write {exc.filename or args.plot}: {exc.strerror or exc}\n")
            return 1
        print(f"plot: {args.plot}")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    """Copy a shipped experiment into DIR, to edit and run: the start of a project of one's own."""
    from fedsim.config import builtin_configs
    from fedsim.errors import ConfigError
    from fedsim.results import write_atomic

    shipped = builtin_configs()
    if args.example not in shipped:
        raise ConfigError(f"--example: must be one of {', '.join(shipped)} (got {args.example!r})")
    target = Path(args.dir) / f"{args.example}.toml"
    if target.exists():
        raise ConfigError(f"init: {target} exists; edit it, or choose another DIR")
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target, shipped[args.example].read_text())
    print(f"wrote {target}\nnext: fedsim run {target}")
    return 0


def cmd_datasets(args: argparse.Namespace) -> int:
    from fedsim.datasets import BUILTIN_DESCRIPTIONS

    for name, text in BUILTIN_DESCRIPTIONS.items():
        print(f"{name:<14} {text}")
    print(f"{'file':<14} your CSV / Parquet / NPZ: data.path and data.label_column")
    return 0


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def cmd_cache_info(args: argparse.Namespace) -> int:
    from fedsim.caches import CACHE_ENV, cache_dir, disk_entries

    root = cache_dir()
    if root is None:
        print(f"cache: off ({CACHE_ENV}=off)")
        return 0
    entries = disk_entries()
    kinds: dict[str, int] = {}
    for path in entries:
        kinds[path.parent.name] = kinds.get(path.parent.name, 0) + 1
    size = sum(path.stat().st_size for path in entries)
    what = ", ".join(f"{kind}: {n}" for kind, n in sorted(kinds.items()))
    print(f"cache: {root}: {len(entries)} entries, {_mb(size)}" + (f" ({what})" if what else ""))
    return 0


def cmd_cache_clear(args: argparse.Namespace) -> int:
    from fedsim.caches import CACHE_ENV, cache_dir, clear_disk

    root = cache_dir()
    if root is None:
        print(f"cache: off ({CACHE_ENV}=off); nothing to clear")
        return 0
    count, size = clear_disk()
    print(f"cache: removed {count} entries ({_mb(size)}) from {root}")
    return 0


def _csv_values(text: str | None, flag: str) -> list | None:
    """A comma-separated flag's values; an empty list or an empty item is refused, not read as
    "no axis"."""
    from fedsim.config import parse_value
    from fedsim.errors import ConfigError

    if text is None:
        return None
    items = [v.strip() for v in text.split(",")]
    if not all(items):
        raise ConfigError(f"{flag}: expected comma-separated values, e.g. 0,1,2 (got {text!r})")
    return [parse_value(v) for v in items]


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import parse_grid, run_sweep

    grid = parse_grid(args.grid)
    try:
        cells = run_sweep(args.config, grid=grid, seeds=_csv_values(args.seeds, "--seeds"),
                          target_epsilons=_csv_values(args.target_epsilons, "--target-epsilons"),
                          overrides=overrides_from(args),
                          jobs=args.jobs, max_cells=args.max_cells, strict=args.strict)
    except OSError as exc:  # the sweep directory cannot be written: one line, exit 1
        sys.stderr.write(f"error: sweep: {exc}\n")
        return 1
    failed = cells[cells["error"].notna()]
    for name, error in zip(failed["cell"], failed["error"]):  # on stderr, one line each, like any error
        sys.stderr.write(f"error: failed cell {name}: {' '.join(str(error).splitlines())}\n")
    for name, status in zip(cells["cell"], cells["status"]):
        if status.startswith("running elsewhere"):
            print(f"cell {name} is {status}; run the sweep again to collect it")
    finished = int((cells["status"] == "finished").sum())
    print(f"{finished}/{len(cells)} cells finished; table: fedsim report {cells.attrs['out']}")
    return 1 if len(failed) else 0


def cmd_report(args: argparse.Namespace) -> int:
    from fedsim.report import check_paired, pivot_table, plot, render, report

    check_paired(args.pivot, args.paired_against, args.unpaired)
    _check_plot(args.plot)
    where = [(key, value) for key, _, value in (item.partition("=") for item in args.where)]
    # with --pivot the comparison is the pivot's (paired there); the long table is the plot's
    table = report(args.path, group_by=args.group_by, best_per=args.best_per, where=where,
                   median=args.median_client, paired_against=None if args.pivot else args.paired_against,
                   unpaired=args.unpaired or bool(args.pivot))
    for entry in table.attrs["skipped"]:
        sys.stderr.write(f"warning: skipped malformed run {entry}\n")
    shown = table
    if args.pivot:  # the plot keeps the long table: one row per setting
        shown = pivot_table(table, args.pivot, args.paired_against, args.unpaired)
        shown.attrs.update(table.attrs)
    for note in shown.attrs.get("paired", {}).get("dropped", []):
        sys.stderr.write(f"warning: paired: {note}\n")
    text = render(shown, args.format)
    for key, values in table.attrs.get("mixed", {}).items():  # after any refusal: that stays one line
        sys.stderr.write(f"warning: report: rows average runs that differ in {key} ({', '.join(values)}); "
                         f"split them with --group-by {key}, or pick one with --where {key}=VALUE\n")
    try:
        if args.output:
            Path(args.output).write_text(text)
        else:
            sys.stdout.write(text)
        for name in table.attrs["unfinished"]:
            sys.stderr.write(f"unfinished: {name}\n")
        if args.plot:
            plot(table, args.plot, log_epsilon=args.log_epsilon)
    except OSError as exc:
        sys.stderr.write(f"error: report: cannot write {exc.filename or args.output or args.plot}: "
                         f"{exc.strerror or exc}\n")
        return 1
    return 0


def cmd_deploy_local(args: argparse.Namespace) -> int:
    from fedsim.deploy import deploy_local
    from fedsim.run import default_out_dir, prepare

    overrides = overrides_from(args)
    # --nodes is the number of clients, unless --num-clients (or --set) names it too; then the two must agree
    overrides.setdefault("federation.num_clients", args.nodes)
    if args.secagg:
        if overrides.get("privacy.secure_aggregation") is False:
            from fedsim.errors import ConfigError

            raise ConfigError("privacy.secure_aggregation: --secagg and --set privacy.secure_aggregation=false "
                              "contradict each other; give one")
        overrides["privacy.secure_aggregation"] = True
    cfg = _load(args, overrides)
    if not cfg.output.dir:
        cfg.output.dir = default_out_dir(cfg)
    cfg.output.dir = str(Path(cfg.output.dir).resolve())
    cfg = prepare(cfg, deployment=True)  # real SuperNodes: privacy.secure_noise auto is on
    try:
        out = deploy_local(cfg, args.nodes, tls=args.tls, auth=args.auth, host=args.host, timeout=args.timeout)
    except OSError as exc:  # unwritable run directory, full disk: one line, exit 1
        sys.stderr.write(f"error: deploy local: {exc}\n")
        return 1
    print(f"deployed run finished: {out}")
    return 0


def cmd_deploy_certs(args: argparse.Namespace) -> int:
    from fedsim.deploy import make_certificates

    try:
        certs = make_certificates(args.dir, tuple(args.hosts.split(",")), overwrite=args.overwrite)
    except OSError as exc:  # unwritable or missing parent, full disk: one line, exit 1
        sys.stderr.write(f"error: deploy certs: cannot write {args.dir}: {exc.strerror or exc}\n")
        return 1
    print(f"CA: {certs.ca_cert}\nserver certificate: {certs.server_cert}\nserver key: {certs.server_key}")
    return 0


# ----------------------------------------------------------------------------- the command table

@dataclass(frozen=True)
class Flag:
    """One argparse argument: its names and `add_argument`'s keywords."""

    names: tuple[str, ...]
    options: dict[str, Any]


def flag(*names: str, **options: Any) -> Flag:
    return Flag(names, options)


@dataclass(frozen=True)
class Command:
    """A (sub)command: its texts, its own flags, and whether it takes an experiment (a config
    file, the experiment overrides of `RUN_FLAGS`, --set, --strict and -v)."""

    name: str
    help: str
    description: str
    examples: tuple[str, ...]
    func: Callable[[argparse.Namespace], int] | None = None
    flags: tuple[Flag, ...] = ()
    experiment: bool = False
    subcommands: tuple[Command, ...] = ()


# Flags more than one command shares
PLOT = "write stacked bars of each client's label counts (target deciles for regression; .png, .pdf, .svg, ...)"
OVERWRITE_RUN = flag("--overwrite", action="store_true",
                     help="replace the run already in --out (by default a finished or started run is refused)")
# The experiment flags, after the config file: the overrides, then --set, --strict and -v
EXPERIMENT_FLAGS = (
    flag("--set", action="append", default=[], metavar="KEY=VALUE",
         help="override any key, e.g. --set strategy.fedprox.mu=0.1 (repeatable)"),
    flag("--strict", action="store_true",
         help="refuse keys that do nothing for this experiment (by default a warning names them)"),
    flag("-v", "--verbose", action="store_true", help="show fedsim's and Flower's logs"),
)

COMMANDS: tuple[Command, ...] = (
    Command("run", "run one experiment",
            "Run one federated experiment and write rounds.csv, clients.csv, summary.json, config.toml, run.log "
            "and the trained model to its run directory, with a checkpoint every output.checkpoint_every "
            "rounds.\nExit codes: 0 finished, 1 failed (a client, the disk) or diverged (a NaN loss), 2 bad "
            "input or a run directory in use, 130 Ctrl-C, 143 SIGTERM.",
            ("fedsim run configs/quickstart.toml",
             "fedsim run configs/quickstart.toml --noise-multiplier 1.0 --rounds 20 --strategy fedprox "
             "--set strategy.fedprox.mu=0.1",
             "fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
             "--set privacy.user_clip_quantile=0.5 --set privacy.user_clip_count_noise=1",
             "fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
             "--set privacy.user_mechanism=tree --set privacy.user_tree_restart=10",
             "fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
             "--set privacy.noise_cohort_size=1000",
             "fedsim run configs/quickstart.toml --set privacy.user_target_epsilon=3 "
             "--set federation.sampling=poisson --accountant pld",
             "fedsim run --resume runs/quickstart-20261123-101500",
             "fedsim run configs/quickstart.toml --out runs/qs --overwrite"),
            cmd_run, experiment=True, flags=(
                flag("--no-progress", action="store_true", help="hide the progress bar"),
                flag("--resume", metavar="DIR", help="continue the interrupted or killed run in DIR from its "
                                                     "checkpoint, with DIR/config.toml"),
                OVERWRITE_RUN)),
    Command("audit", "empirical lower bound on epsilon (one-run audit)",
            "Run the experiment once with canaries (Steinke, Nasr & Jagielski 2023), each included with "
            "probability 1/2, scored on the trained model and guessed in or out. Prints epsilon_lower at "
            "confidence 1 - beta beside the accountant's epsilon_upper, and writes audit.json into the run "
            "directory. Takes the same flags and --set as `fedsim run`; see docs/privacy.md.",
            ("fedsim audit configs/audit.toml --canaries 1000",
             "fedsim audit configs/audit.toml --level user --set privacy.target_epsilon=0 "
             "--set privacy.user_noise_multiplier=4 --set federation.sampling=poisson",
             "fedsim audit configs/audit.toml --mode blackbox --canaries 2000"),
            cmd_audit, experiment=True, flags=(
                flag("--level", choices=("sample", "user"), default="sample",
                     help="sample: canaries inside DP-SGD; user: canary clients through the user-level layer"),
                flag("--mode", choices=("whitebox", "blackbox"), default="whitebox",
                     help="whitebox: gradient directions (or clients' updates), scored by the model's "
                          "displacement; blackbox: canary examples (random-label outliers), scored by loss"),
                flag("--canaries", type=_count(2), default=1000, metavar="M", help="number of canaries (default 1000)"),
                flag("--beta", type=_beta, default=0.05,
                     help="the bound holds with probability 1 - beta (default 0.05)"),
                flag("--no-progress", action="store_true", help="hide the progress bar"),
                OVERWRITE_RUN)),
    Command("partition", "show how a config splits the data",
            "Print per-client sizes and label counts; optionally plot them.",
            ("fedsim partition --dataset digits --partitioner dirichlet --alpha 0.1 --num-clients 20 "
             "--plot labels.png",),
            cmd_partition, experiment=True, flags=(flag("--plot", metavar="FILE.png", help=PLOT),)),
    Command("init", "copy a shipped experiment to start from",
            "Write a shipped example experiment (a TOML file) into DIR, to edit and run. Shipped experiments "
            "also run by name: fedsim run quickstart.",
            ("fedsim init my-study", "fedsim run my-study/quickstart.toml --rounds 5",
             "fedsim init . --example privacy-utility"),
            cmd_init, flags=(
                flag("dir", nargs="?", default=".", help="directory to write into (default: here)"),
                flag("--example", default="quickstart", help="which shipped experiment (quickstart, "
                     "privacy-utility, fedld-heterogeneity, fedsvd, bags, ...)"))),
    Command("datasets", "list the built-in datasets", "List the datasets that work offline.",
            ("fedsim datasets",), cmd_datasets),
    Command("sweep", "run a grid of experiments (resumable)",
            "Run every cell of a grid; re-running skips finished cells. A cell is its values and its resolved "
            "config: a finished cell of another config is refused, never reused. A failing cell is reported "
            "and the others go on (exit 1). Two sweeps on one directory share the cells.",
            ("fedsim sweep configs/privacy-utility.toml --jobs 2",
             "fedsim sweep configs/quickstart.toml --grid privacy.noise_multiplier=0,1 "
             "--grid strategy.name=fedavg,fedprox --seeds 0,1,2"),
            cmd_sweep, experiment=True, flags=(
                flag("--grid", action="append", default=[], metavar="KEY=V1,V2",
                     help="an axis of the grid (repeatable; a key given twice gets the values of both)"),
                flag("--seeds", metavar="S1,S2", help="seeds axis, e.g. 0,1,2"),
                flag("--target-epsilons", metavar="E1,E2",
                     help="target sample-level epsilons axis (0 = non-private), e.g. 0,1,3,8"),
                flag("--jobs", type=_count(1), default=1, help="cells run in parallel processes (default 1)"),
                flag("--max-cells", type=_count(0), default=0, help="stop after this many new cells (0 = all)"))),
    Command("deploy", "run on a Flower SuperLink and SuperNodes",
            "Deploy fedsim's ServerApp and ClientApp on Flower's deployment runtime.",
            ("fedsim deploy local configs/quickstart.toml --nodes 20", "fedsim deploy certs certs/"),
            subcommands=(
                Command("local", "a SuperLink and N SuperNodes on this machine",
                        "Start a SuperLink and N SuperNodes as subprocesses, wait until all are online, run the "
                        "experiment through them with `flwr run`, write the usual outputs, stop everything (also "
                        "if fedsim is killed). Waiting for the nodes is bounded by runtime.discovery_timeout; a "
                        "failure names its cause and the logs in <run>/deploy/logs/.",
                        ("fedsim deploy local configs/quickstart.toml --nodes 20 --tls",
                         "fedsim deploy local --nodes 3 --dataset digits --rounds 2",
                         "fedsim deploy local configs/quickstart.toml --nodes 20 --auth "
                         "--set runtime.discovery_timeout=900",
                         "fedsim deploy local --nodes 3 --dataset digits --rounds 2 --secagg",
                         "fedsim deploy local --nodes 5 --dataset digits --secagg "
                         "--set privacy.user_noise_multiplier=1 --set privacy.user_clipping=client"),
                        cmd_deploy_local, experiment=True, flags=(
                            flag("--nodes", type=_count(1), required=True, help="SuperNodes to start; sets "
                                 "federation.num_clients unless --num-clients is given"),
                            flag("--tls", action="store_true", help="generate a CA and serve the SuperLink over TLS"),
                            flag("--auth", action="store_true", help="SuperNode authentication (implies --tls): "
                                 "each node registers its own EC key"),
                            flag("--secagg", action="store_true", help="Flower's SecAgg+ secure aggregation "
                                 "(privacy.secure_aggregation = true): the server learns only the sum of the updates; "
                                 "docs/privacy.md"),
                            flag("--host", default="127.0.0.1",
                                 help="interface to bind (default loopback; anything else exposes the ports)"),
                            flag("--timeout", type=_seconds, default=1800.0,
                                 help="seconds before the run is abandoned"))),
                Command("certs", "a self-signed CA and server certificate",
                        "Write ca.crt, server.pem and server.key (EC P-256) for local TLS testing. Existing "
                        "files are kept unless --overwrite.",
                        ("fedsim deploy certs certs/ --hosts 127.0.0.1,localhost",
                         "fedsim deploy certs certs/ --overwrite"),
                        cmd_deploy_certs, flags=(
                            flag("dir", help="output directory (created if missing)"),
                            flag("--hosts", default="127.0.0.1,localhost", help="names the certificate is valid for"),
                            flag("--overwrite", action="store_true",
                                 help="replace existing ca.crt, server.pem and server.key (refused otherwise)"))),
            )),
    Command("cache", "show or clear the on-disk cache of datasets and partitions",
            "fedsim keeps every dataset it loads and every partition it computes on disk, so that the next "
            "run of the same data starts without rebuilding them (nor importing flwr-datasets, Hugging Face "
            "datasets and pandas). An entry is found by content: the data config, the number of clients, the "
            "seed, a data file's bytes and the code that built it, so a changed file or an upgraded library "
            "makes a new entry and a stale one is never read. The directory is $FEDSIM_CACHE_DIR, else "
            "$XDG_CACHE_HOME/fedsim, else ~/.cache/fedsim; FEDSIM_CACHE_DIR=off turns the cache off. "
            "Clearing it (or rm -rf of the directory) only costs the next run the rebuild.",
            ("fedsim cache info", "fedsim cache clear"),
            subcommands=(
                Command("info", "where the cache is, its entries and size",
                        "Print the cache directory, its number of entries per kind and their size.",
                        ("fedsim cache info",), cmd_cache_info),
                Command("clear", "delete every entry",
                        "Delete every entry of the cache directory; the next run rebuilds what it needs.",
                        ("fedsim cache clear",), cmd_cache_clear),
            )),
    Command("report", "privacy-utility table from runs",
            "Aggregate run directories (over seeds) into a privacy-utility table.",
            ("fedsim report sweeps/privacy-utility --format md --plot pu.png",
             "fedsim report sweeps/privacy-utility --plot pu.pdf --log-epsilon",
             "fedsim report sweeps/my-alpha-sweep --group-by data.alpha --plot alpha.png",
             "fedsim report sweeps/fedsvd --pivot strategy --paired-against fedavg-lora",
             "fedsim report sweeps/fedld-heterogeneity --pivot strategy --unpaired",
             "fedsim report sweeps/privacy-utility --median-client"),
            cmd_report, flags=(
                flag("path", help="a run directory or a sweep directory"),
                flag("--format", default="md", choices=("md", "csv", "latex", "json"), help="table format"),
                flag("--output", metavar="FILE", help="write the table here instead of stdout"),
                flag("--plot", metavar="FILE.png",
                     help="final metric against epsilon, one line per strategy and --group-by value, with 95%% CI "
                          "bands and dashed non-private references (.png, .pdf, .svg, ...)"),
                flag("--log-epsilon", action="store_true", help="--plot with a logarithmic epsilon axis"),
                flag("--median-client", action="store_true",
                     help="show each run's median client's sample-level epsilon beside its largest"),
                flag("--group-by", default="", metavar="KEYS",
                     help="extra config keys that split rows, e.g. data.alpha,data.dataset"),
                flag("--best-per", default="", metavar="KEYS", help="keep only the best row per group, e.g. "
                     "strategy.bags.label_epsilon (keys in --group-by)"),
                flag("--where", action="append", default=[], metavar="KEY=VALUE",
                     help="only runs whose config has this value, e.g. data.dataset=diabetes (repeatable)"),
                flag("--pivot", default="", metavar="COLUMN",
                     help="one column per value of COLUMN (e.g. strategy); paired by default: every column but "
                          "the first (or --paired-against) holds \"V − first\", the paired difference over the "
                          "seeds both have"),
                flag("--paired-against", default="", metavar="VALUE",
                     help="the reference of the paired comparison: a value of --pivot's column, or without "
                          "--pivot a strategy (default: the first); differences are mean +- 95%% t-interval of "
                          "the per-seed differences"),
                flag("--unpaired", action="store_true",
                     help="no paired differences: every cell its own mean +- ci95 (comparisons whose runs share "
                          "seeds are paired by default, unpaired where none is shared, as the caption says)"))),
)


def _epilog(examples: tuple[str, ...]) -> str:
    return ("example:" if len(examples) == 1 else "examples:") + "".join(f"\n  {e}" for e in examples)


def _add_command(sub: argparse._SubParsersAction, command: Command) -> None:
    p = sub.add_parser(command.name, help=command.help, formatter_class=_formatter,
                       description=command.description, epilog=_epilog(command.examples))
    if command.experiment:
        p.add_argument("config", nargs="?", help="experiment TOML (default: built-in defaults)")
        group = p.add_argument_group("experiment overrides (each sets one config key)")
        for name, key in RUN_FLAGS.items():
            metavar, text = FLAG_HELP.get(name, ("V", key))
            group.add_argument(name, dest=key, metavar=metavar, help=text)
        for f in EXPERIMENT_FLAGS:
            p.add_argument(*f.names, **f.options)
    for f in command.flags:
        p.add_argument(*f.names, **f.options)
    if command.subcommands:
        inner = p.add_subparsers(dest=f"{command.name}_command", required=True, parser_class=Parser)
        for subcommand in command.subcommands:
            _add_command(inner, subcommand)
    else:
        p.set_defaults(func=command.func)


def build_parser() -> argparse.ArgumentParser:
    """The command line, built from `COMMANDS` (and `RUN_FLAGS`, the Python API's keywords)."""
    parser = Parser(prog="fedsim", formatter_class=_formatter,
                    description="Federated, privacy-aware training simulator on Flower and Opacus.",
                    epilog=_epilog(("fedsim run configs/quickstart.toml --rounds 5 --noise-multiplier 1.0",)))
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for command in COMMANDS:
        _add_command(sub, command)
    return parser


def _kept_after_interrupt(run_dir: str | None) -> str:
    """What an interrupted run left, as it is on disk: a promise of a checkpoint only if there is one."""
    from fedsim.checkpoint import checkpoint_path
    from fedsim.results import read_summary

    if not run_dir:
        return "the run had not started; nothing was written"
    done = (read_summary(run_dir) or {}).get("rounds_completed") or 0
    if checkpoint_path(run_dir).is_file():
        return (f"{done} finished round(s) and the last checkpoint are kept in {run_dir} "
                f"(continue with fedsim run --resume {run_dir})")
    if done:
        return f"{done} finished round(s) are kept in {run_dir}; no checkpoint was written (output.checkpoint_every)"
    return "before the first round finished; there is nothing to resume"


def main(argv: list[str] | None = None) -> int:
    import signal
    import threading

    # A run started in the background by a non-interactive shell inherits SIGINT ignored; fedsim
    # stops cleanly on Ctrl-C (status "interrupted", checkpoint kept), so it always listens.
    if threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "verbose", False))
    if sys.stderr.isatty():  # a terminal shows the progress bars: warnings go around them
        show_warnings_around_progress_bars()
    try:
        return args.func(args)
    except FedsimError as exc:  # one line, whatever the message holds (a key or path with a newline)
        sys.stderr.write("error: " + " ".join(str(exc).splitlines()) + "\n")
        return exc.exit_code
    except OSError as exc:  # unwritable, missing or full: one line, exit 1
        where = f": {exc.filename}" if exc.filename else ""
        sys.stderr.write(f"error: {exc.strerror or exc}{where}\n")
        return 1
    except ClientFailure as exc:
        sys.stderr.write(f"error: {exc}\n")
        if exc.client_traceback:
            sys.stderr.write("client traceback:\n" + exc.client_traceback)
        return 1
    except KeyboardInterrupt as exc:
        terminated = getattr(sys.modules.get("fedsim.run"), "Terminated", ())
        if args.command == "sweep":
            sys.stderr.write("interrupted: finished cells are kept, and the interrupted ones keep their last "
                             "checkpoint (run the same fedsim sweep again to continue)\n")
        else:
            sys.stderr.write(f"interrupted: {_kept_after_interrupt(getattr(args, 'run_dir', None))}\n")
        return 143 if isinstance(exc, terminated) else 130


if __name__ == "__main__":
    raise SystemExit(main())
