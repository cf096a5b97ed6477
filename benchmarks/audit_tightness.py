"""How tight each one-run audit analysis is on an idealised white-box audit: canaries whose scores
are exactly the Gaussian mechanism at a known epsilon.

Each of m canaries is included with probability 1/2 and scored N(mu * included, 1), mu the
Gaussian mechanism that is exactly (epsilon, delta)-DP; no training run can leak more than
this, so the medians printed are the most each analysis can certify at these m, delta and
beta. Guess counts are searched with a union bound (fedsim.privacy.audit.audit_bounds).

    python benchmarks/audit_tightness.py [--canaries 1000] [--runs 20]
"""

from __future__ import annotations

import argparse

import numpy as np

from fedsim.privacy.audit import ALL_ANALYSES, audit_bounds, gdp_mu

# guess counts searched, as fractions of the canaries (split evenly between "in" and "out")
FRACTIONS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--beta", type=float, default=0.05)
    args = parser.parse_args()
    m = args.canaries
    grid = sorted({max(1, round(f * m)) for f in FRACTIONS})
    print(f"canaries={m} delta={args.delta} beta={args.beta} runs={args.runs} guesses searched={grid}")
    print("epsilon  mu      " + "  ".join(f"{name:>17}" for name in ALL_ANALYSES))
    for eps in (1.0, 2.0, 4.0, 8.0):
        mu = gdp_mu(eps, args.delta)
        rng = np.random.default_rng(int(eps * 1000))
        found = {name: [] for name in ALL_ANALYSES}
        for _ in range(args.runs):
            included = rng.random(m) < 0.5
            scores = rng.normal(size=m) + mu * included
            out = audit_bounds(scores, included, delta=args.delta, beta=args.beta, guesses=grid,
                               analyses=ALL_ANALYSES)
            for name in ALL_ANALYSES:
                found[name].append(out["epsilon_lower"][name])
        cells = [f"{np.median(v):5.2f} ({np.median(v) / eps:4.2f}x)" for v in found.values()]
        print(f"{eps:7.1f}  {mu:6.3f}  " + "  ".join(f"{c:>17}" for c in cells))


if __name__ == "__main__":
    main()
