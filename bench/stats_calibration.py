"""False-positive rate and power of `stats.paired_comparison` over a grid of simulated regimes.

The simulator is the one `tests/test_stats.py` checks in CI (a fresh test set and fresh seeds per study, known
truth); this bench runs it with more studies and more regimes than CI can afford, and prints one JSON line each.
Usage:
    python bench/stats_calibration.py --studies 1000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import test_stats as sim  # the CI simulator, imported from the tests folder

# (name, test images, seed shift sd, AUC gain as the simulator's separation gain)
REGIMES = (
    ("a: seed-dominated", 600, 0.35, 0.0),
    ("b: test-dominated", 150, 0.0, 0.0),
    ("both moderate", 300, 0.15, 0.0),
    ("small seed variance", 300, 0.05, 0.0),
    ("power: true ΔAUC 0.05", 300, 0.05, 0.26),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=1000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[3, 5])
    args = parser.parse_args()
    for n_seeds in args.seeds:
        sim.N_SEEDS = n_seeds
        for name, n_test, seed_sd, gain in REGIMES:
            started = time.perf_counter()
            rate = sim._rejection_rate(n_test=n_test, seed_sd=seed_sd, gain=gain, studies=args.studies)
            record = {"regime": name, "seeds": n_seeds, "n_test": n_test, "seed_sd": seed_sd, "gain": gain,
                      "rejection_rate": rate, "studies": args.studies,
                      "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
            print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
