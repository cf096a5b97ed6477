"""White-box sample-level audits of fedsim's own DP-SGD at epsilon in {1, 2, 4, 8}: each
analysis' lower bound against the accountant's epsilon (the tightness table of docs/privacy.md).

The audited run is the one where a one-run audit is tightest: one client holding 20 synthetic
samples, a full batch each step (q = 1), ten rounds of one DP-SGD step, sigma calibrated to
each epsilon by the RDP accountant (privacy.target_epsilon). `fedsim.audit.run_audit` plants
the gradient canaries, trains with the chosen engine and scores them; the medians over seeds
are printed, each analysis' lower bound and its ratio to epsilon_upper.

    python benchmarks/audit_fedsim.py [--canaries 1000] [--seeds 3] [--engine vectorized]
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import warnings

import numpy as np

from fedsim.audit import run_audit
from fedsim.config import load_config

TIGHT = {"name": "audit-tightness", "data.dataset": "synthetic", "data.partitioner": "iid",
         "data.synthetic_samples": 40, "data.test_fraction": 0.5, "model.name": "mlp", "model.hidden": [128],
         "federation.num_clients": 1, "federation.clients_per_round": 1, "federation.rounds": 10,
         "client.batch_size": 64, "client.lr": 0.1, "privacy.max_grad_norm": 1.0, "privacy.delta": 1e-5}
ANALYSES = ("steinke", "fdp", "gaussian")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--engine", choices=("vectorized", "opacus"), default="vectorized")
    parser.add_argument("--epsilons", default="1,2,4,8")
    args = parser.parse_args()
    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    print(f"canaries={args.canaries} seeds={args.seeds} engine={args.engine} delta=1e-05 beta=0.05 "
          f"q=1 steps=10 (median over seeds; ratio = lower / upper)")
    print("epsilon  sigma   upper   " + "  ".join(f"{name:>15}" for name in ANALYSES))
    with tempfile.TemporaryDirectory() as tmp:
        for eps in (float(e) for e in args.epsilons.split(",")):
            found = {name: [] for name in ANALYSES}
            uppers, sigmas = [], []
            for seed in range(args.seeds):
                cfg = load_config(None, {**TIGHT, "seed": seed, "privacy.target_epsilon": eps,
                                         "runtime.engine": args.engine, "output.dir": f"{tmp}/run"})
                record = run_audit(cfg, canaries=args.canaries, overwrite=True)
                uppers.append(record["epsilon_upper"])
                sigmas.append(record["noise_multiplier"])
                for name in ANALYSES:
                    found[name].append(float(record["analyses"][name]["epsilon_lower"]))
            upper = float(np.median(uppers))
            cells = [f"{np.median(v):5.2f} ({np.median(v) / upper:4.2f}x)" for v in found.values()]
            print(f"{eps:7.1f}  {np.median(sigmas):5.3f}  {upper:5.2f}   " + "  ".join(f"{c:>15}" for c in cells),
                  flush=True)


if __name__ == "__main__":
    main()
