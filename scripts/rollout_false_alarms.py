#!/usr/bin/env python3
"""The false-alarm rate of the rollout halting rule (docs/rollout.md "Fleet server"), by simulation.

The rule: halt when a one-sided exact binomial test of "failure rate > R" over the rollout's n
ended attempts gives p < ALPHA / (n (n + 1)) (ALPHA = 0.01). The server tests again every time
it evaluates, as evidence arrives; spending ALPHA over n this way bounds the chance of ever
halting a release whose true rate is R by ALPHA, however many looks (the levels sum to ALPHA).
This script measures that chance for a release whose true failure rate is R/2 or R (halting it
is a false alarm), and the chance of halting one at 2R or 4R (a detection), over a rollout of N
attempts with the rule evaluated after every `look` newly ended attempts (1: after each one).

Each simulated rollout: N attempts end one after another, each failing with probability p
(independently); the rule is checked after attempts look, 2*look, ... and at the end, with the
critical counts k(n) = the fewest failures of n with P(X >= k | n, R) < ALPHA / (n (n + 1))
(scipy.stats.binom.sf, the tail binomtest uses), checked equal to rollout.halt_test (scipy.stats.
binomtest) for every n (halt_thresholds(check=True)).

  python scripts/rollout_false_alarms.py                 # the table in docs/rollout.md
  python scripts/rollout_false_alarms.py --trials 2000   # quicker
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mpota.fleet import rollout  # noqa: E402


def halt_thresholds(n_max: int, rate: float, alpha: float = rollout.ALPHA, check: bool = False) -> np.ndarray:
    """k[n] for n = 0..n_max: the rule halts on n ended attempts with f failures iff f >= k[n]
    (n_max + 1 where no count halts)."""
    from scipy import stats
    k = np.full(n_max + 1, n_max + 1)
    for i in range(1, n_max + 1):
        ks = np.arange(i + 1)
        p = stats.binom.sf(ks - 1, i, rate)  # P(X >= k)
        hit = np.nonzero(p < rollout.alpha_at(i, alpha))[0]
        if hit.size:
            k[i] = hit[0]
    if check:  # the same decisions as rollout.halt_test (scipy.stats.binomtest)
        for i in range(1, n_max + 1, max(1, n_max // 50)):
            if k[i] <= i:
                f = int(k[i])
                assert rollout.halt_test(f, i - f, rate, alpha)["halt"], (i, f)
                if f > 1:
                    assert not rollout.halt_test(f - 1, i - f + 1, rate, alpha)["halt"], (i, f)
    return k


def false_alarm_rate(p_true: float, rate: float, attempts: int, look: int | None, trials: int,
                     seed: int = 1, thresholds=None) -> float:
    """The share of simulated rollouts halted at some look. look None: one test, at the end."""
    rng = np.random.default_rng(seed)
    k = halt_thresholds(attempts, rate) if thresholds is None else thresholds
    looks = np.array([attempts]) if look is None else np.unique(np.r_[np.arange(look, attempts + 1, look), attempts])
    halted = 0
    for start in range(0, trials, 5000):
        m = min(5000, trials - start)
        fails = np.cumsum(rng.random((m, attempts)) < p_true, axis=1, dtype=np.int32)
        halted += int(np.any(fails[:, looks - 1] >= k[looks], axis=1).sum())
    return halted / trials


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--trials", type=int, default=20000, help="simulated rollouts per cell (default 20000)")
    ap.add_argument("--attempts", type=int, default=1000, help="attempts in a rollout (default 1000: a fleet of "
                                                               "1000 devices that all try)")
    ap.add_argument("--rates", default="0.05,0.02", help="max failure rates R to try (default 0.05,0.02)")
    a = ap.parse_args()
    t0 = time.perf_counter()
    print(f"halting rule: one-sided exact binomial test on n ended attempts, p < {rollout.ALPHA}/(n(n+1)); "
          f"{a.trials} simulated rollouts of {a.attempts} attempts per cell; share of rollouts halted (a false "
          f"alarm where the true rate is at most R, a detection above it)")
    print(f"  {'R':>5} {'true rate':>9} {'one test':>9} {'every 100':>10} {'every 10':>9} {'every one':>10}")
    for r in (float(x) for x in a.rates.split(",")):
        k = halt_thresholds(a.attempts, r, check=True)
        for p in (r / 2, r, 2 * r, 4 * r):
            cells = [false_alarm_rate(p, r, a.attempts, look, a.trials, thresholds=k) for look in (None, 100, 10, 1)]
            print(f"  {r:>5.0%} {p:>9.1%} " + " ".join(f"{c:>9.2%}" for c in cells))
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
