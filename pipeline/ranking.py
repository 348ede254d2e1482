"""Rank runs (a study's cells) from pairwise preference votes.

The model is Davidson's extension of Bradley-Terry to ties (R. R. Davidson, "On extending the
Bradley-Terry model to accommodate ties in paired comparison experiments", JASA 1970): cell ``i``
has a strength ``exp(theta_i)`` and, for a pair ``(i, j)``,

    P(i wins) = e^a / D,   P(j wins) = e^b / D,   P(tie) = nu * e^((a + b) / 2) / D,
    D = e^a + e^b + nu * e^((a + b) / 2),          a = theta_i, b = theta_j.

A "both bad" vote says neither sample is preferred: it counts as a tie (and is reported apart).
The model is an exponential family in ``(theta, log nu)``, so the negative log-likelihood is convex
and Newton's method converges in a few steps; a weak Gaussian prior (sd ``PRIOR_SD``) keeps the
fit finite when a cell has only wins or the comparisons do not connect every cell. Strengths are
reported centred (mean zero: only differences are identified), on the natural-log scale, where a
difference of 1 means odds of e : 1 in a decisive vote.

Intervals are percentile bootstrap intervals over votes: the votes are resampled with replacement
(a multinomial draw of the pair/outcome counts), every replicate is refitted, all replicates at
once (the Newton steps are batched over replicates).
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Sequence

import numpy as np

PRIOR_SD = 4.0          # on each centred log-strength and on log(nu): weak next to tens of votes
OUTCOMES = ("left", "right", "tie", "both_bad")


@dataclasses.dataclass(frozen=True)
class Counts:
    """Votes folded into counts: ``n[p] = (i wins, j wins, ties)`` for pair ``pairs[p] = (i, j)``,
    ``i < j`` (cell indices into ``cells``); ``both_bad[p]`` is the part of the ties that were
    "both bad"."""

    cells: tuple[str, ...]
    pairs: np.ndarray         # (P, 2) int
    n: np.ndarray             # (P, 3) float
    both_bad: np.ndarray      # (P,) float

    @property
    def total(self) -> int:
        return int(self.n.sum())


def count_votes(cells: Sequence[str], votes: Iterable[tuple[str, str, str]]) -> Counts:
    """``votes``: ``(left cell, right cell, choice)`` with choice one of ``OUTCOMES``. Votes naming a
    cell not in ``cells``, or a cell against itself, are refused (ValueError): a ranking that
    silently dropped them would rank something else than what was voted on."""
    cells = tuple(cells)
    if len(set(cells)) != len(cells) or len(cells) < 2:
        raise ValueError(f"ranking needs at least two distinct cells, got {list(cells)}")
    index = {c: k for k, c in enumerate(cells)}
    pairs = np.array(list(itertools.combinations(range(len(cells)), 2)), dtype=np.int64)
    pair_of = {(int(i), int(j)): p for p, (i, j) in enumerate(pairs)}
    n = np.zeros((len(pairs), 3))
    both_bad = np.zeros(len(pairs))
    for left, right, choice in votes:
        if left not in index or right not in index:
            raise ValueError(f"a vote names a cell that is not ranked: {left!r} vs {right!r}")
        if left == right:
            raise ValueError(f"a vote compares {left!r} with itself")
        if choice not in OUTCOMES:
            raise ValueError(f"unknown vote choice {choice!r}; expected one of {', '.join(OUTCOMES)}")
        i, j = index[left], index[right]
        p = pair_of[(min(i, j), max(i, j))]
        if choice in ("tie", "both_bad"):
            n[p, 2] += 1
            both_bad[p] += choice == "both_bad"
        else:
            winner = i if choice == "left" else j
            n[p, 0 if winner == min(i, j) else 1] += 1
    return Counts(cells, pairs, n, both_bad)


def _design(pairs: np.ndarray, k: int) -> np.ndarray:
    """(P, 3, k + 1): row 0 picks theta_i, row 1 theta_j, row 2 log nu; the tie outcome's
    sufficient statistic is (1/2, 1/2, 1) in those coordinates."""
    e = np.zeros((len(pairs), 3, k + 1))
    idx = np.arange(len(pairs))
    e[idx, 0, pairs[:, 0]] = 1.0
    e[idx, 1, pairs[:, 1]] = 1.0
    e[:, 2, k] = 1.0
    return e


# outcome -> sufficient statistic in (a, b, log nu): i wins, j wins, tie
_S = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 1.0]])


def fit(counts: np.ndarray, pairs: np.ndarray, k: int, iters: int = 50,
        tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Maximum a posteriori ``(theta, log nu)`` for each of B count tables ``counts`` (B, P, 3) at
    once, by Newton's method with step halving. Returns (x (B, k + 1), Hessian (B, k + 1, k + 1) of
    the negative log-posterior at x)."""
    counts = np.asarray(counts, dtype=float)
    if counts.ndim == 2:
        counts = counts[None]
    b = counts.shape[0]
    e = _design(pairs, k)                             # (P, 3, k+1)
    # the linear statistic of the data: sum over votes of s(outcome), in parameter coordinates
    stat = np.einsum("bpo,oc,pcj->bj", counts, _S, e)
    n = counts.sum(axis=2)                            # (B, P)
    prior = np.full(k + 1, 1.0 / PRIOR_SD ** 2)

    def objective(x):
        z = np.einsum("pcj,bj->bpc", e, x) @ _S.T     # (B, P, 3): the three outcomes' log-weights
        zmax = z.max(axis=2, keepdims=True)
        logd = (zmax[..., 0] + np.log(np.exp(z - zmax).sum(axis=2)))
        return -(stat * x).sum(axis=1) + (n * logd).sum(axis=1) + 0.5 * (prior * x * x).sum(axis=1), z

    x = np.zeros((b, k + 1))
    f, z = objective(x)
    for _ in range(iters):
        p = np.exp(z - z.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)             # (B, P, 3) outcome probabilities
        mu = p @ _S                                   # (B, P, 3) expected statistic
        cov = np.einsum("bpo,oc,od->bpcd", p, _S, _S) - mu[..., :, None] * mu[..., None, :]
        grad = -stat + np.einsum("bp,bpc,pcj->bj", n, mu, e) + prior * x
        hess = np.einsum("bp,pci,bpcd,pdj->bij", n, e, cov, e) + np.diag(prior)
        step = np.linalg.solve(hess, grad[..., None])[..., 0]
        t = np.ones(b)
        for _ in range(30):                           # halve until the objective does not rise
            x_new = x - t[:, None] * step
            f_new, z_new = objective(x_new)
            bad = f_new > f + 1e-12
            if not bad.any():
                break
            t = np.where(bad, t / 2, t)
        x, f, z = x_new, f_new, z_new
        if np.max(np.abs(t[:, None] * step)) < tol:
            break
    p = np.exp(z - z.max(axis=2, keepdims=True))
    p /= p.sum(axis=2, keepdims=True)
    mu = p @ _S
    cov = np.einsum("bpo,oc,od->bpcd", p, _S, _S) - mu[..., :, None] * mu[..., None, :]
    hess = np.einsum("bp,pci,bpcd,pdj->bij", n, e, cov, e) + np.diag(prior)
    return x, hess


def _centre(theta: np.ndarray) -> np.ndarray:
    return theta - theta.mean(axis=-1, keepdims=True)


def bootstrap(counts: Counts, replicates: int, seed: int) -> np.ndarray:
    """(replicates, k) centred strengths, each fitted to the votes resampled with replacement."""
    rng = np.random.default_rng(seed)
    flat = counts.n.ravel()
    total = int(flat.sum())
    k = len(counts.cells)
    if total == 0:
        return np.zeros((replicates, k))
    draws = rng.multinomial(total, flat / total, size=replicates).reshape(replicates, *counts.n.shape)
    x, _ = fit(draws, counts.pairs, k)
    return _centre(x[:, :k])


@dataclasses.dataclass
class Ranking:
    cells: tuple[str, ...]
    strength: np.ndarray           # centred log-strengths
    low: np.ndarray                # 95 % percentile bootstrap interval
    high: np.ndarray
    votes: np.ndarray              # votes each cell took part in
    tie_nu: float                  # Davidson's nu: the propensity to tie
    win_rate: np.ndarray           # (k, k): row's wins + half its ties over their votes (NaN: none)
    pair_votes: np.ndarray         # (k, k)
    both_bad: np.ndarray           # (k,) "both bad" votes each cell took part in
    total: int
    replicates: int
    top_separated: bool            # ``top_separated(counts)``

    @property
    def order(self) -> list[int]:
        return [int(i) for i in np.argsort(-self.strength, kind="stable")]

    def settled(self) -> int:
        """Cells whose interval overlaps no other cell's: their place in the order is settled."""
        k = len(self.cells)
        return sum(all(self.low[i] > self.high[j] or self.high[i] < self.low[j] for j in range(k) if j != i)
                   for i in range(k))

    def as_dict(self) -> dict:
        return {
            "model": "Davidson (Bradley-Terry with ties; both-bad votes count as ties)",
            "votes": self.total,
            "tie_nu": round(self.tie_nu, 4),
            "bootstrap_replicates": self.replicates,
            "top_separated": self.top_separated,
            "cells": [{"cell": self.cells[i], "rank": r + 1, "strength": round(float(self.strength[i]), 4),
                       "ci95": [round(float(self.low[i]), 4), round(float(self.high[i]), 4)],
                       "votes": int(self.votes[i]), "both_bad": int(self.both_bad[i])}
                      for r, i in enumerate(self.order)],
            "win_rate": {self.cells[i]: {self.cells[j]: (None if np.isnan(self.win_rate[i, j])
                                                        else round(float(self.win_rate[i, j]), 4))
                                         for j in range(len(self.cells)) if j != i}
                         for i in range(len(self.cells))},
        }


def rank(counts: Counts, replicates: int = 1000, seed: int = 0) -> Ranking:
    """The ranking of ``counts``: MAP strengths, bootstrap intervals, win rates and vote counts."""
    k = len(counts.cells)
    x, _ = fit(counts.n, counts.pairs, k)
    boot = bootstrap(counts, replicates, seed)
    low, high = np.percentile(boot, [2.5, 97.5], axis=0)
    win = np.full((k, k), np.nan)
    pv = np.zeros((k, k))
    votes = np.zeros(k)
    bb = np.zeros(k)
    for p, (i, j) in enumerate(counts.pairs):
        wi, wj, t = counts.n[p]
        tot = wi + wj + t
        pv[i, j] = pv[j, i] = tot
        votes[i] += tot
        votes[j] += tot
        bb[i] += counts.both_bad[p]
        bb[j] += counts.both_bad[p]
        if tot:
            win[i, j] = (wi + t / 2) / tot
            win[j, i] = (wj + t / 2) / tot
    return Ranking(counts.cells, _centre(x[0, :k]), low, high, votes, float(np.exp(x[0, k])), win, pv, bb,
                   counts.total, replicates, top_separated(counts))


def pair_doubt(counts: Counts) -> tuple[np.ndarray, np.ndarray]:
    """The fit's log-strengths and, for every pair, the probability that their order is the other
    way, from the fit's Gaussian (Laplace) approximation: the inverse Hessian of the
    negative log-posterior. Unlike the percentile bootstrap this stays wide when a cell has won the
    few votes it has (a bootstrap of 8 wins out of 8 is 8 wins every time)."""
    k = len(counts.cells)
    x, hess = fit(counts.n, counts.pairs, k)
    cov = np.linalg.inv(hess[0])[:k, :k]
    i, j = counts.pairs[:, 0], counts.pairs[:, 1]
    diff = x[0, i] - x[0, j]
    sd = np.sqrt(np.maximum(cov[i, i] + cov[j, j] - 2 * cov[i, j], 1e-12))
    return x[0, :k], _normal_cdf(-np.abs(diff) / sd)


def top_separated(counts: Counts, level: float = 0.95) -> bool:
    """The leading cell is ahead of every other cell, jointly at ``level``: under the Laplace
    approximation, P(the other is ahead) < (1 - level) / (k - 1) for each of the k - 1 others
    (Bonferroni). A page checks this after every vote, and each look is another chance of a false
    "separated"; the joint level keeps that rare (simulations: tests/test_ranking.py)."""
    if counts.total == 0:
        return False
    theta, doubt = pair_doubt(counts)
    leader = int(np.argmax(theta))
    mine = (counts.pairs[:, 0] == leader) | (counts.pairs[:, 1] == leader)
    return bool(np.all(doubt[mine] < (1 - level) / (len(counts.cells) - 1)))


def next_pair(counts: Counts, rng: np.random.Generator) -> tuple[int, int]:
    """The pair to show next, as cell indices.

    First every pair once (fewest votes first). Then the pair whose order is least certain
    (``pair_doubt``: cheap enough to redo at every vote). Until the top cell is separated
    (``top_separated``), only pairs with the current leader are considered: the leader against its
    likeliest challenger, the LUCB rule of best-arm identification (Kalyanakrishnan et al., "PAC
    subset selection in stochastic multi-armed bandits", ICML 2012); votes among the lower cells do
    not separate the top. Ties break at random, so two voters at once do not see the same pair."""
    per_pair = counts.n.sum(axis=1)
    if per_pair.min() < 1:
        choices = np.flatnonzero(per_pair == per_pair.min())
    else:
        theta, doubt = pair_doubt(counts)
        if not top_separated(counts):
            leader = int(np.argmax(theta))
            doubt = np.where((counts.pairs[:, 0] == leader) | (counts.pairs[:, 1] == leader), doubt, -1.0)
        choices = np.flatnonzero(doubt >= doubt.max() - 1e-12)
    p = int(rng.choice(choices))
    return int(counts.pairs[p, 0]), int(counts.pairs[p, 1])


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    from scipy.special import ndtr

    return ndtr(z)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-a between two score vectors (no ties expected)."""
    a, b = np.asarray(a), np.asarray(b)
    s = 0
    n = len(a)
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return float(s / (n * (n - 1) / 2))


def simulate_vote(theta: Sequence[float], nu: float, i: int, j: int, rng: np.random.Generator) -> str:
    """One voter under Davidson's model with true log-strengths ``theta``, shown cell ``i`` on the
    left and ``j`` on the right: "left", "right" or "tie" (tests and bench/preference.py)."""
    a, b = theta[i], theta[j]
    w = np.array([np.exp(a), np.exp(b), nu * np.exp((a + b) / 2)])
    return OUTCOMES[int(rng.choice(3, p=w / w.sum()))]
