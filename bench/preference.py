"""How well the preference ranking (pipeline/ranking.py) does on simulated voters.

    python bench/preference.py [--studies 200] [--races 30]

Voters follow Davidson's model (Bradley-Terry with ties) with known strengths: 5 cells, log-strengths
0, 0.4, 0.8, 1.2, 1.6, tie propensity nu = 0.5. Prints
  * the recovered order (Kendall tau with the truth) at 300 uniform votes;
  * the share of the 95 % bootstrap intervals that hold the true (centred) strength;
  * votes until the top cell is separated (``ranking.top_separated``, checked every 10 votes),
    with pairs chosen uniformly and by ``ranking.next_pair``, side by side, and how often the
    separated cell was the wrong one.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from pipeline import ranking as R  # noqa: E402

THETA = np.array([0.0, 0.4, 0.8, 1.2, 1.6])
NU = 0.5
CELLS = [f"cell{i}" for i in range(len(THETA))]


def uniform_votes(n, rng):
    out = []
    for _ in range(n):
        i, j = (int(v) for v in rng.choice(len(THETA), 2, replace=False))
        out.append((CELLS[i], CELLS[j], R.simulate_vote(THETA, NU, i, j, rng)))
    return out


def race(active: bool, seed: int, cap: int = 4000) -> tuple[int, bool]:
    rng = np.random.default_rng(seed)
    votes: list = []
    while len(votes) < cap:
        for _ in range(10):
            if active:
                i, j = R.next_pair(R.count_votes(CELLS, votes), rng)
            else:
                i, j = (int(v) for v in rng.choice(len(THETA), 2, replace=False))
            votes.append((CELLS[i], CELLS[j], R.simulate_vote(THETA, NU, i, j, rng)))
        c = R.count_votes(CELLS, votes)
        if R.top_separated(c):
            theta, _ = R.pair_doubt(c)
            return len(votes), int(np.argmax(theta)) == int(np.argmax(THETA))
    return cap, False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=200, help="simulated studies of 300 votes (tau, coverage)")
    ap.add_argument("--races", type=int, default=30, help="simulated races to a separated top cell, per strategy")
    args = ap.parse_args()
    truth = THETA - THETA.mean()
    t = time.perf_counter()
    taus, covered = [], 0
    for s in range(args.studies):
        r = R.rank(R.count_votes(CELLS, uniform_votes(300, np.random.default_rng(5000 + s))), 1000, s)
        taus.append(R.kendall_tau(r.strength, THETA))
        covered += int(np.sum((r.low <= truth) & (truth <= r.high)))
    print(f"{args.studies} studies of 300 uniform votes over 5 cells ({time.perf_counter() - t:.0f} s):")
    print(f"  Kendall tau with the true order: mean {np.mean(taus):.3f}, min {min(taus):.2f}")
    print(f"  95 % bootstrap intervals holding the true strength: {covered} of {5 * args.studies} "
          f"({covered / (5 * args.studies):.1%})")
    res = {}
    for active in (False, True):
        t = time.perf_counter()
        res[active] = [race(active, s) for s in range(args.races)]
        n = [v for v, _ in res[active]]
        wrong = sum(not ok for _, ok in res[active])
        print(f"  {'next_pair (active)' if active else 'uniform pairs':<19} votes until the top is separated: "
              f"mean {np.mean(n):6.1f}, median {np.median(n):6.1f}; wrong top cell in {wrong} of {args.races} "
              f"({time.perf_counter() - t:.0f} s)")
    ratio = np.mean([v for v, _ in res[False]]) / np.mean([v for v, _ in res[True]])
    print(f"  uniform / active votes: {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
