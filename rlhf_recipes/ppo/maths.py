"""PPO's maths as pure functions: masked moments, the per-token KL penalty and rewards, GAE,
the clipped policy and value losses, and the two KL-coefficient controllers.

The formulas and their floating-point order are those of TRL 0.11.4's classic PPOTrainer
(Ziegler et al. 2019's recipe), written here from the algorithm: tests/test_parity.py holds
a whole step against TRL 0.11.4 itself. Shapes: b rows (sequences), T positions, V the vocabulary;
a mask is 1 where a position predicts a response token.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """x, mask: (b, T) -> the mean of x where mask is 1: a scalar, or (b,) or (T,) along `dim`."""
    if dim is None:
        return (x * mask).sum() / mask.sum()
    return (x * mask).sum(dim=dim) / mask.sum(dim=dim)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """x, mask: (b, T) -> scalar: the variance of x where mask is 1, with Bessel's correction (NaN
    for a single scored token, as in TRL: the step's finiteness check then skips the batch)."""
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n == 0:
            raise ValueError("a masked variance over no scored token: every response needs at least one")
        variance = variance * (n / (n - 1))
    return variance


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x, mask: (b, T) -> (b, T): x scaled to unit variance over the masked positions, and
    centred unless shift_mean is False (rewards keep their mean)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


def gather_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits: (..., V), labels: (...) -> (...): each label's log-probability."""
    return torch.gather(F.log_softmax(logits, dim=-1), -1, labels.unsqueeze(-1)).squeeze(-1)


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """logits: (..., V) -> (...): each distribution's entropy, logsumexp(z) - sum(softmax(z) z)."""
    return torch.logsumexp(logits, dim=-1) - torch.sum(F.softmax(logits, dim=-1) * logits, dim=-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """The per-token KL estimate between the policy and the reference at the sampled tokens.

    kl, abs, mse: logprobs, ref_logprobs (b, T) -> (b, T), from the sampled token's log-ratio r:
    r, |r| and r^2 / 2. full: (b, T, V) log-distributions -> (b, T), the exact KL(policy || ref).
    """
    if kind == "kl":
        return logprobs - ref_logprobs
    if kind == "abs":
        return (logprobs - ref_logprobs).abs()
    if kind == "mse":
        return 0.5 * (logprobs - ref_logprobs).square()
    if kind == "full":
        return F.kl_div(ref_logprobs, logprobs, log_target=True, reduction="none").sum(-1)
    raise ValueError(f"unknown KL penalty {kind!r}: use kl, abs, mse or full")


def last_positions(mask: torch.Tensor) -> torch.Tensor:
    """mask: (b, T), every row with a nonzero -> (b,): the index of each row's last nonzero."""
    return mask.shape[1] - 1 - mask.flip(1).argmax(dim=1)


def token_rewards(scores: torch.Tensor, kls: torch.Tensor, mask: torch.Tensor,
                  kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reward PPO maximises, per token: -kl_coef * KL everywhere, plus the sequence's score
    at its last response token.

    scores: (b,), kls: (b, T), mask: (b, T) -> (rewards, non_score_rewards), each (b, T).
    """
    if not bool(mask.any(dim=1).all()):
        raise ValueError("a response has no scored token: every response needs at least one")
    non_score = -kl_coef * kls
    rewards = non_score.clone()
    rewards[torch.arange(len(rewards), device=rewards.device), last_positions(mask)] += scores
    return rewards, non_score


def advantages_and_returns(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
                           lam: float, whiten_rewards: bool = False) -> tuple[torch.Tensor, ...]:
    """Generalised advantage estimation (Schulman et al. 2016) over the response tokens.

    values, rewards, mask: (b, T) -> (values, advantages, returns), each (b, T): the values
    masked, the advantages whitened over the masked positions, returns = advantages + values
    before whitening (the value head's regression target).
    """
    values, rewards = values * mask, rewards * mask
    if whiten_rewards:
        rewards = masked_whiten(rewards, mask, shift_mean=False)
    running, backwards = 0.0, []
    for t in reversed(range(rewards.shape[-1])):
        next_value = values[:, t + 1] if t < rewards.shape[-1] - 1 else 0.0
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = delta + gamma * lam * running
        backwards.append(running)
    advantages = torch.stack(backwards[::-1]).transpose(0, 1)
    returns = advantages + values
    return values, masked_whiten(advantages, mask).detach(), returns


@dataclasses.dataclass(frozen=True)
class Losses:
    """One minibatch's PPO losses (scalars) and the statistics TRL logged for them."""

    policy: torch.Tensor
    value: torch.Tensor
    """vf_coef times the clipped value loss: the term added to the policy loss."""
    stats: dict[str, torch.Tensor]


def ppo_losses(old_logprobs: torch.Tensor, old_values: torch.Tensor, entropies: torch.Tensor,
               values: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
               returns: torch.Tensor, cliprange: float, cliprange_value: float, vf_coef: float,
               ratio_threshold: float, entropy_coef: float = 0.0) -> Losses:
    """The clipped surrogate policy loss and the clipped value loss of one minibatch.

    Every argument but the numbers: (b, T); entropies are the policy's per-token entropies.
    entropy_coef > 0 adds a bonus for their mean to the policy loss (not in TRL: logged as
    loss/entropy), which keeps the policy from collapsing onto a few phrasings. A minibatch whose
    mean probability ratio exceeds ratio_threshold has gone too far from the rollout's policy to
    trust: its losses become 0 (TRL's guard).
    """
    clipped_values = torch.max(torch.min(values, old_values + cliprange_value), old_values - cliprange_value)
    value_losses, clipped_value_losses = (values - returns) ** 2, (clipped_values - returns) ** 2
    vf_loss = 0.5 * masked_mean(torch.max(value_losses, clipped_value_losses), mask)
    vf_clipfrac = masked_mean(torch.gt(clipped_value_losses, value_losses).float(), mask)

    ratio = torch.exp(logprobs - old_logprobs)
    pg_losses = -advantages * ratio
    clipped_pg_losses = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    pg_loss = masked_mean(torch.max(pg_losses, clipped_pg_losses), mask)
    pg_clipfrac = masked_mean(torch.gt(clipped_pg_losses, pg_losses).float(), mask)
    loss = pg_loss + vf_coef * vf_loss
    mean_entropy = masked_mean(entropies, mask)
    bonus = -entropy_coef * mean_entropy
    if masked_mean(ratio, mask).item() > ratio_threshold:
        pg_loss, vf_loss, loss, bonus = pg_loss * 0.0, vf_loss * 0.0, loss * 0.0, bonus * 0.0

    stats = {
        "loss/policy": pg_loss, "loss/value": vf_loss, "loss/total": loss,
        "policy/entropy": mean_entropy,
        "policy/approxkl": 0.5 * masked_mean((logprobs - old_logprobs) ** 2, mask),
        "policy/policykl": masked_mean(old_logprobs - logprobs, mask),
        "policy/clipfrac": pg_clipfrac, "policy/advantages_mean": masked_mean(advantages, mask),
        "returns/mean": masked_mean(returns, mask), "returns/var": masked_var(returns, mask),
        "val/vpred": masked_mean(values, mask), "val/error": masked_mean((values - returns) ** 2, mask),
        "val/clipfrac": vf_clipfrac, "val/mean": masked_mean(old_values, mask),
        "val/var": masked_var(old_values, mask),
    }
    if entropy_coef:
        stats["loss/entropy"], stats["loss/total"] = bonus, loss + bonus
        pg_loss = pg_loss + bonus
    return Losses(pg_loss, vf_coef * vf_loss, {k: v.detach() for k, v in stats.items()})


class AdaptiveKL:
    """The KL coefficient steered toward a target KL per sequence (Ziegler et al. 2019): each
    step it is multiplied by 1 + clip(kl / target - 1, +-0.2) * n / horizon, n the step's
    samples. The arithmetic is float32, as TRL 0.11.4's was on its numpy statistics."""

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, kl: float, n: int) -> None:
        error = np.clip(np.float32(kl) / self.target - 1, -0.2, 0.2)
        self.value = float(self.value * (1 + error * n / self.horizon))


class FixedKL:
    """A KL coefficient that stays where it starts."""

    def __init__(self, init_kl_coef: float):
        self.value = init_kl_coef

    def update(self, kl: float, n: int) -> None:
        pass


@dataclasses.dataclass
class RunningMoments:
    """The running mean and standard deviation of every score seen (Chan et al.'s parallel
    update), for ppo.use_score_scaling; `update` takes one batch of all processes' scores."""

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    def update(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """mean, var: the batch's scalar mean and (biased) variance over its `count` scores."""
        mean, var = mean.float(), var.float()
        delta = mean - self.mean
        total = self.count + count
        summed = self.var * self.count + delta ** 2 * self.count * count / total + var * count
        self.mean += (delta * count / total).item()
        new_var = summed / total
        self.std = (new_var * total / (total - 1)).float().sqrt().item()
        self.var, self.count = new_var.item(), total


def scale_scores(scores: torch.Tensor, moments: RunningMoments, normalise: bool) -> torch.Tensor:
    """scores: (b,) -> (b,): divided by the running std (and centred on the running mean if
    normalise), the moments already updated with this batch."""
    scale = torch.tensor(moments.std, dtype=scores.dtype, device=scores.device) + torch.finfo(scores.dtype).eps
    if normalise:
        return (scores - torch.tensor(moments.mean, dtype=scores.dtype, device=scores.device)) / scale
    return scores / scale
