"""The `fedsim` command line.

Every flag maps to one config key and goes through the same validation as the TOML
file, so a bad value is refused with the key's name and allowed values. Bad input
prints one line and exits 2; a failing client exits 1 with its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

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


def _add_config_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="experiment TOML (default: built-in defaults)")
    group = p.add_argument_group("experiment overrides (each sets one config key)")
    for flag, key in RUN_FLAGS.items():
        metavar, text = FLAG_HELP.get(flag, ("V", key))
        group.add_argument(flag, dest=key, metavar=metavar, help=text)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override any key, e.g. --set strategy.fedprox.mu=0.1 (repeatable)")
    p.add_argument("--strict", action="store_true",
                   help="refuse keys that do nothing for this experiment (by default a warning names them)")
    p.add_argument("-v", "--verbose", action="store_true", help="show fedsim's and Flower's logs")


def overrides_from(args: argparse.Namespace) -> dict:
    from fedsim.config import parse_assignment, parse_value

    out = {key: parse_value(getattr(args, key)) for key in RUN_FLAGS.values() if getattr(args, key, None) is not None}
    for item in args.set:
        key, value = parse_assignment(item)
        out[key] = value
    if "output.dir" in out:
        out["output.dir"] = str(out["output.dir"])
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
    cfg = load_config(run_dir / CONFIG_TOML, overrides)
    if not cfg.output.dir or Path(cfg.output.dir).resolve() != run_dir.resolve():
        cfg.output.dir = str(run_dir)  # the run directory was moved (or config.toml names a relative path)
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from fedsim.results import read_summary
    from fedsim.run import run_experiment

    if args.resume:
        out = run_experiment(_resume_config(args), progress=not args.no_progress, resume=True)
    else:
        out = run_experiment(_load(args), progress=not args.no_progress, overwrite=args.overwrite)
    summary = read_summary(out) or {}
    line = (f"{summary.get('metric_name')}: final {summary.get('final_metric'):.4f}, "
            f"best {summary.get('best_metric'):.4f}")
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


def cmd_partition(args: argparse.Namespace) -> int:
    from fedsim.partition import label_counts

    if args.plot:
        from fedsim.plots import check_plot_path

        check_plot_path(args.plot)  # a bad extension is refused before any work
    cfg = _load(args)
    counts = label_counts(cfg)
    width = max(3, len(str(counts.max())))
    header = "client  size  " + " ".join(f"{c:>{width}}" for c in range(counts.shape[1]))
    print(f"{cfg.data.dataset}: {counts.sum()} training samples over {len(counts)} clients "
          f"({cfg.data.partitioner}); label counts per client:")
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


def _csv_values(text: str | None) -> list | None:
    from fedsim.config import parse_value

    return [parse_value(v) for v in text.split(",")] if text else None


def cmd_sweep(args: argparse.Namespace) -> int:
    from fedsim.sweep import parse_axis, run_sweep

    grid = dict(parse_axis(text) for text in args.grid)
    try:
        cells = run_sweep(args.config, grid=grid, seeds=_csv_values(args.seeds),
                          target_epsilons=_csv_values(args.target_epsilons), overrides=overrides_from(args),
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

    check_paired(args.pivot, args.paired_against)
    if args.plot:
        from fedsim.plots import check_plot_path

        check_plot_path(args.plot)  # a bad extension is refused before any work
    where = [(key, value) for key, _, value in (item.partition("=") for item in args.where)]
    table = report(args.path, group_by=args.group_by, best_per=args.best_per, where=where,
                   median=args.median_client)
    for entry in table.attrs["skipped"]:
        sys.stderr.write(f"warning: skipped malformed run {entry}\n")
    shown = table
    if args.pivot:  # the plot keeps the long table: one row per setting
        shown = pivot_table(table, args.pivot, args.paired_against)
        shown.attrs.update(table.attrs)
        for note in shown.attrs.get("paired", {}).get("dropped", []):
            sys.stderr.write(f"warning: --paired-against: {note}\n")
    text = render(shown, args.format)
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
    cfg = _load(args, overrides)
    if not cfg.output.dir:
        cfg.output.dir = default_out_dir(cfg)
    cfg.output.dir = str(Path(cfg.output.dir).resolve())
    cfg = prepare(cfg)
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


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="fedsim", formatter_class=_formatter,
                    description="Federated, privacy-aware training simulator on Flower and Opacus.",
                    epilog="example:\n  fedsim run configs/quickstart.toml --rounds 5 --noise-multiplier 1.0")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

    p = sub.add_parser("run", help="run one experiment", formatter_class=_formatter,
                       description="Run one federated experiment and write rounds.csv, clients.csv, "
                                   "summary.json, config.toml, run.log and the trained model to its run "
                                   "directory, with a checkpoint every output.checkpoint_every rounds.\n"
                                   "Exit codes: 0 finished, 1 failed (a client, the disk), 2 bad input or "
                                   "a run directory in use, 130 Ctrl-C, 143 SIGTERM.",
                       epilog="examples:\n  fedsim run configs/quickstart.toml\n"
                              "  fedsim run configs/quickstart.toml --noise-multiplier 1.0 --rounds 20 "
                              "--strategy fedprox --set strategy.fedprox.mu=0.1\n"
                              "  fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
                              "--set privacy.user_clip_quantile=0.5 --set privacy.user_clip_count_noise=1\n"
                              "  fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
                              "--set privacy.user_mechanism=tree --set privacy.user_tree_restart=10\n"
                              "  fedsim run configs/quickstart.toml --set privacy.user_noise_multiplier=1 "
                              "--set privacy.noise_cohort_size=1000\n"
                              "  fedsim run --resume runs/quickstart-20261123-101500\n"
                              "  fedsim run configs/quickstart.toml --out runs/qs --overwrite\n"
                              "  fedsim run configs/quickstart.toml --set privacy.user_target_epsilon=3 "
                              "--set federation.sampling=poisson --accountant pld")
    _add_config_flags(p)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted or killed run in DIR from its checkpoint, with DIR/config.toml")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (by default a finished or started run is refused)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("audit", help="empirical lower bound on epsilon (one-run audit)", formatter_class=_formatter,
                       description="Run the experiment once with canaries (Steinke, Nasr & Jagielski 2023),\n"
                                   "each included with probability 1/2, scored on the trained model and guessed\n"
                                   "in or out. Prints epsilon_lower at confidence 1 - beta beside the\n"
                                   "accountant's epsilon_upper, and writes audit.json into the run directory.\n"
                                   "Takes the same flags and --set as `fedsim run`; see docs/privacy.md.",
                       epilog="examples:\n  fedsim audit configs/quickstart.toml --canaries 1000\n"
                              "  fedsim audit configs/quickstart.toml --level user "
                              "--set privacy.user_noise_multiplier=1 --set federation.sampling=poisson")
    _add_config_flags(p)
    p.add_argument("--level", choices=("sample", "user"), default="sample",
                   help="sample: gradient canaries inside DP-SGD; user: canary clients through the user-level layer")
    p.add_argument("--mode", choices=("whitebox", "blackbox"), default="whitebox",
                   help="whitebox: canaries are gradient directions (or clients' updates), scored by the model's "
                        "displacement; blackbox: canary examples (random-label outliers), scored by loss")
    p.add_argument("--canaries", type=_count(2), default=1000, metavar="M", help="number of canaries (default 1000)")
    p.add_argument("--beta", type=float, default=0.05, help="the bound holds with probability 1 - beta (default 0.05)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument("--overwrite", action="store_true", help="replace the run already in --out")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("partition", help="show how a config splits the data", formatter_class=_formatter,
                       description="Print per-client sizes and label counts; optionally plot them.",
                       epilog="example:\n  fedsim partition --dataset digits --partitioner dirichlet "
                              "--alpha 0.1 --num-clients 20 --plot labels.png")
    _add_config_flags(p)
    p.add_argument("--plot", metavar="FILE.png",
                   help="write stacked bars of each client's label counts (target deciles for regression; "
                        ".png, .pdf, .svg, ...)")
    p.set_defaults(func=cmd_partition)

    p = sub.add_parser("init", help="copy a shipped experiment to start from", formatter_class=_formatter,
                       description="Write a shipped example experiment (a TOML file) into DIR, to edit and run. "
                                   "Shipped experiments also run by name: fedsim run quickstart.",
                       epilog="examples:\n  fedsim init my-study\n  fedsim run my-study/quickstart.toml --rounds 5\n"
                              "  fedsim init . --example privacy-utility")
    p.add_argument("dir", nargs="?", default=".", help="directory to write into (default: here)")
    p.add_argument("--example", default="quickstart",
                   help="which shipped experiment (quickstart, privacy-utility, fedld-heterogeneity, fedsvd, "
                        "bags, ...)")
    p.set_defaults(func=cmd_init)

    p = sub.add_parser("datasets", help="list the built-in datasets", formatter_class=_formatter,
                       description="List the datasets that work offline.", epilog="example:\n  fedsim datasets")
    p.set_defaults(func=cmd_datasets)

    p = sub.add_parser("sweep", help="run a grid of experiments (resumable)", formatter_class=_formatter,
                       description="Run every cell of a grid; re-running skips finished cells. A cell is "
                                   "its values and its resolved config: a finished cell of another config "
                                   "is refused, never reused. A failing cell is reported and the others go "
                                   "on (exit 1). Two sweeps on one directory share the cells.",
                       epilog="example:\n  fedsim sweep configs/privacy-utility.toml --jobs 2\n"
                              "  fedsim sweep configs/quickstart.toml --grid privacy.noise_multiplier=0,1 "
                              "--grid strategy.name=fedavg,fedprox --seeds 0,1,2")
    _add_config_flags(p)
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid (repeatable)")
    p.add_argument("--seeds", metavar="S1,S2", help="seeds axis, e.g. 0,1,2")
    p.add_argument("--target-epsilons", metavar="E1,E2",
                   help="target sample-level epsilons axis (0 = non-private), e.g. 0,1,3,8")
    p.add_argument("--jobs", type=_count(1), default=1, help="cells run in parallel processes (default 1)")
    p.add_argument("--max-cells", type=_count(0), default=0, help="stop after this many new cells (0 = all)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("deploy", help="run on a Flower SuperLink and SuperNodes", formatter_class=_formatter,
                       description="Deploy fedsim's ServerApp and ClientApp on Flower's deployment runtime.",
                       epilog="examples:\n  fedsim deploy local configs/quickstart.toml --nodes 20\n"
                              "  fedsim deploy certs certs/")
    deploy = p.add_subparsers(dest="deploy_command", required=True, parser_class=Parser)
    d = deploy.add_parser("local", help="a SuperLink and N SuperNodes on this machine", formatter_class=_formatter,
                          description="Start a SuperLink and N SuperNodes as subprocesses, wait until all are "
                                      "online, run the experiment through them with `flwr run`, write the usual "
                                      "outputs, stop everything (also if fedsim is killed). Waiting for the nodes "
                                      "is bounded by runtime.discovery_timeout; a failure names its cause and the "
                                      "logs in <run>/deploy/logs/.",
                          epilog="examples:\n  fedsim deploy local configs/quickstart.toml --nodes 20 --tls\n"
                                 "  fedsim deploy local --nodes 3 --dataset digits --rounds 2\n"
                                 "  fedsim deploy local configs/quickstart.toml --nodes 20 --auth "
                                 "--set runtime.discovery_timeout=900")
    _add_config_flags(d)
    d.add_argument("--nodes", type=_count(1), required=True,
                   help="SuperNodes to start; sets federation.num_clients unless --num-clients is given")
    d.add_argument("--tls", action="store_true", help="generate a CA and serve the SuperLink over TLS")
    d.add_argument("--auth", action="store_true",
                   help="SuperNode authentication (implies --tls): each node registers its own EC key")
    d.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default loopback; anything else exposes the ports)")
    d.add_argument("--timeout", type=_seconds, default=1800.0, help="seconds before the run is abandoned")
    d.set_defaults(func=cmd_deploy_local)
    d = deploy.add_parser("certs", help="a self-signed CA and server certificate", formatter_class=_formatter,
                          description="Write ca.crt, server.pem and server.key (EC P-256) for local TLS testing. "
                                      "Existing files are kept unless --overwrite.",
                          epilog="examples:\n  fedsim deploy certs certs/ --hosts 127.0.0.1,localhost\n"
                                 "  fedsim deploy certs certs/ --overwrite")
    d.add_argument("dir", help="output directory (created if missing)")
    d.add_argument("--hosts", default="127.0.0.1,localhost", help="names the certificate is valid for")
    d.add_argument("--overwrite", action="store_true",
                   help="replace existing ca.crt, server.pem and server.key (refused otherwise)")
    d.set_defaults(func=cmd_deploy_certs)

    p = sub.add_parser("report", help="privacy-utility table from runs", formatter_class=_formatter,
                       description="Aggregate run directories (over seeds) into a privacy-utility table.",
                       epilog="examples:\n  fedsim report sweeps/privacy-utility --format md --plot pu.png\n"
                              "  fedsim report sweeps/privacy-utility --plot pu.pdf --log-epsilon\n"
                              "  fedsim report sweeps/my-alpha-sweep --group-by data.alpha --plot alpha.png\n"
                              "  fedsim report sweeps/fedsvd --pivot strategy --paired-against fedavg-lora\n"
                              "  fedsim report sweeps/privacy-utility --median-client")
    p.add_argument("path", help="a run directory or a sweep directory")
    p.add_argument("--format", default="md", choices=("md", "csv", "latex", "json"), help="table format")
    p.add_argument("--output", metavar="FILE", help="write the table here instead of stdout")
    p.add_argument("--plot", metavar="FILE.png",
                   help="final metric against epsilon, one line per strategy and --group-by value, with "
                        "95%% CI bands and dashed non-private references (.png, .pdf, .svg, ...)")
    p.add_argument("--log-epsilon", action="store_true", help="--plot with a logarithmic epsilon axis")
    p.add_argument("--median-client", action="store_true",
                   help="show each run's median client's sample-level epsilon beside its largest")
    p.add_argument("--group-by", default="", metavar="KEYS",
                   help="extra config keys that split rows, e.g. data.alpha,data.dataset")
    p.add_argument("--best-per", default="", metavar="KEYS",
                   help="keep only the best row per group, e.g. strategy.bags.label_epsilon (keys in --group-by)")
    p.add_argument("--where", action="append", default=[], metavar="KEY=VALUE",
                   help="only runs whose config has this value, e.g. data.dataset=diabetes (repeatable)")
    p.add_argument("--pivot", default="", metavar="COLUMN",
                   help="one column per value of COLUMN (e.g. strategy) holding final +- ci95")
    p.add_argument("--paired-against", default="", metavar="VALUE",
                   help="with --pivot: the other columns become \"V − VALUE\", the paired difference from "
                        "VALUE over the seeds both have (mean +- 95%% t-interval of the per-seed differences)")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
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
            sys.stderr.write("interrupted: finished rounds and the last checkpoint are kept in the run directory "
                             "(continue with fedsim run --resume DIR)\n")
        return 143 if isinstance(exc, terminated) else 130


if __name__ == "__main__":
    raise SystemExit(main())
