"""FedLD's principal-gradient aggregation cost for a 1M-parameter model.

The SVD is of the m x m Gram matrix, so a round costs O(m^2 d + m^3): linear in the
model size d. This times it for m = 10 and m = 100 clients beside plain FedAvg
averaging (O(m d)) of the same updates, and for half and full d to show the linearity.

    python benchmarks/fedld_aggregation.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _machine import describe  # noqa: E402

from fedsim.strategies.fedld import principal_gradient_update  # noqa: E402

D = 1_000_000


def best_of(fn, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    print(f"machine: {describe()}")
    rng = np.random.default_rng(0)
    rows = {}
    for m in (10, 100):
        for d in (D // 2, D):
            g = rng.normal(size=(m, d)).astype(np.float32)
            fedld = best_of(lambda: principal_gradient_update(g, 0.8, "all"))
            fedavg = best_of(lambda: g.mean(axis=0))
            rows[(m, d)] = fedld
            print(f"m={m:>3} d={d:>9,}: FedLD {fedld * 1e3:8.1f} ms   FedAvg mean {fedavg * 1e3:6.1f} ms   "
                  f"ratio {fedld / fedavg:5.1f}x")
    for m in (10, 100):
        print(f"m={m}: time(d=1M) / time(d=0.5M) = {rows[(m, D)] / rows[(m, D // 2)]:.2f} (linear in d: 2.0)")
    print(f"time(m=100) / time(m=10) at d=1M = {rows[(100, D)] / rows[(10, D)]:.1f}")


if __name__ == "__main__":
    main()
