"""The maths of evaluation, as pure functions: log-probs, KL, entropy, distinct-n, intervals.

Plain functions rather than `evaluate` metric modules: the KL and entropy need model
logits, not texts, and every figure here is needed per sample (for paired differences,
win rates and histograms), whereas `evaluate` modules return aggregates and, offline,
would have to ship as local scripts. See the README.
"""
from __future__ import annotations

import math
import statistics
from typing import Sequence

import numpy as np
import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at each position. logits (B, T, V), targets (B, T) -> (B, T)."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each position's distribution. logits (B, T, V) -> (B, T)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum over the masked positions of each row. x, mask (B, T) -> (B,)."""
    return (x * mask).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked positions of each row (0 for an empty row). x, mask (B, T) -> (B,)."""
    return masked_sum(x, mask) / mask.sum(-1).clamp(min=1)


def sequence_kl(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sampled sequence KL(policy || reference): sum over response tokens of log pi - log pi_ref.

    logp, ref_logp: (B, T) log-probs of the sampled tokens under each model; mask (B, T)
    marks response tokens. -> (B,). Unbiased on the policy's own samples.
    """
    return masked_sum(logp - ref_logp, mask)


def distinct_n(responses: Sequence[Sequence[int]], n: int) -> float:
    """Distinct n-grams / all n-grams over `responses` (token ids); nan if there are none.

    On one response it measures repetition; on a whole set, collapse onto a few outputs.
    """
    grams = [tuple(r[i:i + n]) for r in responses for i in range(len(r) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def t_quantile(p: float, dof: int) -> float:
    """Student-t quantile (Cornish-Fisher expansion around the normal; within 1% for dof >= 3)."""
    z = statistics.NormalDist().inv_cdf(p)
    if dof <= 0:
        return float("nan")
    g1 = (z ** 3 + z) / 4
    g2 = (5 * z ** 5 + 16 * z ** 3 + 3 * z) / 96
    g3 = (3 * z ** 7 + 19 * z ** 5 + 17 * z ** 3 - 15 * z) / 384
    return z + g1 / dof + g2 / dof ** 2 + g3 / dof ** 3


def summarize(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, sample std and a t confidence interval of the mean, over the finite values.

    values (N,) -> {"mean", "std", "ci95": [lo, hi], "n"}; the interval narrows as 1/sqrt(n).
    """
    x = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    n = len(x)
    if n == 0:
        return {"mean": float("nan"), "std": float("nan"), "ci95": [float("nan")] * 2, "n": 0}
    mean = float(x.mean())
    std = float(x.std(ddof=1)) if n > 1 else 0.0
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": mean, "std": std, "ci95": [mean - half, mean + half], "n": n}


def win_rate(policy: Sequence[float], reference: Sequence[float]) -> dict:
    """Share of prompts where the policy's reward beats the reference's (ties count half), with its CI.

    policy, reference: (N,) rewards on the same N prompts -> summarize() of the per-prompt wins.
    """
    wins = [1.0 if p > r else 0.5 if p == r else 0.0 for p, r in zip(policy, reference)]
    return summarize(wins)


def best_of_n_kl(n: int) -> float:
    """The analytic KL(best-of-n || reference) of best-of-n sampling: log n - (n - 1) / n nats
    (Stiennon et al. 2020; an upper bound, reached when the reward has no ties)."""
    return math.log(n) - (n - 1) / n


def expected_best_of(rewards: np.ndarray, n: int, values: np.ndarray | None = None) -> np.ndarray:
    """Per prompt, the expected `values` (default: the reward) of the highest-reward sample among n
    drawn without replacement from the m samples there are: the unbiased estimate from all of them.

    rewards, values (P, m) -> (P,). Sorted by reward, the i-th smallest (1-based) is the best of a
    random n-subset with probability C(i-1, n-1) / C(m, n).
    """
    p, m = rewards.shape
    if not 1 <= n <= m:
        raise ValueError(f"best-of-{n} needs 1 <= n <= {m} samples per prompt")
    order = np.argsort(rewards, axis=1, kind="stable")
    ranked = np.take_along_axis(rewards if values is None else values, order, axis=1)
    weights = np.array([math.comb(i - 1, n - 1) for i in range(1, m + 1)], dtype=float) / math.comb(m, n)
    return ranked @ weights
