"""Learning the twist: the token MDP of a GAM, its soft values and the losses built on them.

The token MDP: state s_t = (BOS, x_1 .. x_{t-1}), action a_t = x_t in {0, 1, EOS}, reward
log r(a_t | s_t) at every step and log P(x) - log r(x) (= lambda . phi(x) for P_lambda) at the end
(after EOS, or after max_len symbols). At temperature 1 its soft value is

    V*(s) = log sum_{x extends s} r(x | s) exp(lambda . phi(x)) = log Z(s) - log r(s),

Z(s) the sum of P over the completions of s, so V*(empty prefix) = log Z, and its soft-optimal
policy is the twisted r, which is p itself:

    pi*(a | s) = r(a | s) exp(V*(s a) - V*(s)),      V*(s) = logsumexp_a [log r(a | s) + V*(s a)].

    pcl      one LSTM whose logits are Q(s, a): V = logsumexp Q, pi = softmax Q, trained on path
             consistency (below) on any trajectories (q's, pi's, replayed, D's)
    ac_dpg   a critic V(s) regressed on Monte-Carlo targets; the actor moves pi(.|s) towards the
             critic's pi*(.|s) at every visited state (per-token DPG)
    ppo_dpg  on-policy DPG through PPO's clipped per-token ratio, several epochs per draw

Each method is its own file (methods/pcl.py, ac_dpg.py, ppo_dpg.py, subtb.py), on the shared
twist loop (methods/twist_loop.py). Every function takes a padded (B, T) batch of trajectories;
`mask` marks the steps (t < length) and a value "at t = length" is the terminal reward.
Vectorised: no loop over rows or steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

CRITIC_TARGETS = ("mc", "td")  # the critic's targets: whole suffixes (critic_targets) | one step on (td_targets)
EXP_FIT_MAX = 50.0  # critic_loss: beyond y - V = 50 the exp loss goes on linearly (float64 e^709 overflows)
CRITIC_FITS = ("exp", "square")  # critic_loss: V -> log E[e^y] (= V* for any q) | V -> E[y] (Jensen-biased)


def suffix_sums(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """S_t = sum_{k >= t} values_k over the steps of each row (0 beyond its end)."""
    return values.masked_fill(~mask, 0.0).flip(1).cumsum(1).flip(1)


def next_values(values: torch.Tensor, terminal: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """V(s_{t+1}) at every step: the value one step on, the terminal reward after the last step."""
    shifted = torch.cat([values[:, 1:], values.new_zeros(len(values), 1)], dim=1)
    last = mask & ~torch.cat([mask[:, 1:], mask.new_zeros(len(mask), 1)], dim=1)
    return torch.where(last, terminal.to(values.dtype).unsqueeze(1), shifted).masked_fill(~mask, 0.0)


def pcl_consistency(values: torch.Tensor, log_pi: torch.Tensor, log_r: torch.Tensor, terminal: torch.Tensor,
                    mask: torch.Tensor, horizon: int = 0) -> torch.Tensor:
    """Path consistency at temperature 1 (Nachum et al. 2017), one path from every state s_t:

        C(t) = V(s_e) + sum_{k=t}^{e-1} [log r(a_k | s_k) - log pi(a_k | s_k)] - V(s_t),   e = min(t + d, length)

    (d = horizon; 0: e = length, where V(s_e) is the terminal reward). The soft Bellman equation,
    V*(s_k) = log r(a_k | s_k) - log pi*(a_k | s_k) + V*(s_{k+1}) for every action, telescopes over
    the path, so C = 0 on every path of every trajectory iff V = V* and pi = pi*. (B, T), 0 off mask."""
    B, T = mask.shape
    lengths = mask.sum(1, keepdim=True)
    steps = torch.arange(T + 1, device=mask.device).unsqueeze(0)
    # V(s_t) for t = 0 .. T, the terminal reward from t = length on
    v_full = torch.where(steps < lengths, torch.cat([values, values.new_zeros(B, 1)], 1),
                         terminal.to(values.dtype).unsqueeze(1))
    cum = torch.cat([values.new_zeros(B, 1), (log_r - log_pi).masked_fill(~mask, 0.0).cumsum(1)], 1)  # sum_{k<t}
    end = lengths.expand(B, T) if horizon == 0 else torch.minimum(steps[:, :T] + horizon, lengths)
    c = v_full.gather(1, end) + cum.gather(1, end) - cum[:, :T] - v_full[:, :T]
    return c.masked_fill(~mask, 0.0)


def critic_targets(log_r: torch.Tensor, log_q: torch.Tensor, terminal: torch.Tensor,
                   mask: torch.Tensor) -> torch.Tensor:
    """y_t = log P(x) - log r(x_<t) - log q(x_>=t | s_t) = terminal + sum_{k >= t} [log r_k - log q_k]:
    a one-sample estimate of V*(s_t) for x ~ q, since E_q[P(x) / q(x_>=t | s_t) | s_t] = Z(s_t). Its log is
    biased low by Jensen's gap, which vanishes as q -> pi* (then y_t = V*(s_t) for every draw)."""
    return (terminal.to(log_r.dtype).unsqueeze(1) + suffix_sums(log_r - log_q, mask)).masked_fill(~mask, 0.0)


def td_targets(values: torch.Tensor, log_r: torch.Tensor, log_q: torch.Tensor, terminal: torch.Tensor,
               mask: torch.Tensor) -> torch.Tensor:
    """y_t = log r(a_t | s_t) - log q(a_t | s_t) + V(s_{t+1}) (V: the critic's own, no gradient): one step of
    the soft Bellman equation, E_{a ~ q}[(r/q)(a | s) e^{V*(s a)}] = e^{V*(s)}, so with critic_fit=exp its
    fixed point is V* for any q, with the noise of one step instead of a whole suffix."""
    return (log_r - log_q + next_values(values.detach(), terminal, mask)).masked_fill(~mask, 0.0)


def critic_loss(values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor, fit: str) -> torch.Tensor:
    """Mean over the steps of the critic's loss on its Monte-Carlo targets y:

        square  1/2 (V - y)^2              minimised at V(s) = E_q[y | s]: V* - Jensen's gap (0 only if q = pi*)
        exp     e^(y - V) - (y - V) - 1     (>= 0) minimised where E_q[e^(y - V) | s] = 1: V(s) = log E_q[e^y | s]
                                           = log (Z(s) / r(s)) = V*(s) for any proposal q (unbiased)"""
    diff = (targets - values)[mask]
    if fit == "square":
        return 0.5 * diff.pow(2).mean()
    return exp_fit(diff.double()).mean().to(values.dtype)


def exp_fit(d: torch.Tensor, cap: float = EXP_FIT_MAX) -> torch.Tensor:
    """f(d) = e^d - d - 1 (d = y - V), continued linearly beyond d = cap with the slope it has there:

        f(d) = f(cap) + (e^cap - 1)(d - cap)   for d > cap,

    so a target far above V (a heavy off-policy target: sum(log r - log q) over ~60 symbols) still pulls
    V up, by the largest gradient e^cap - 1 with the right sign, instead of none (a clamp's zero
    gradient would leave V low, against V* for any proposal). Convex and continuously differentiable;
    where no target passes the cap it is the exp loss itself, whose minimiser is log E[e^y] = V*."""
    inside = d.clamp(max=cap)
    f = torch.expm1(inside) - inside
    return torch.where(d > cap, f + math.expm1(cap) * (d - cap), f)


def twisted_log_prob(values: torch.Tensor, log_r: torch.Tensor, terminal: torch.Tensor,
                     mask: torch.Tensor) -> torch.Tensor:
    """log pi*(a_t | s_t) = log r(a_t | s_t) + V(s_{t+1}) - V(s_t), from values V (the critic's)."""
    return (log_r + next_values(values, terminal, mask) - values).masked_fill(~mask, 0.0)


@dataclass
class PPOStep:
    loss: torch.Tensor
    approx_kl: float  # per symbol, mean of (rho - 1) - log rho (Schulman's k3: >= 0; unbiased for draws of pi_old)
    clip_fraction: float  # steps whose ratio left [1 - clip, 1 + clip]


def ppo_surrogate(log_pi: torch.Tensor, log_old: torch.Tensor, advantage: torch.Tensor, mask: torch.Tensor,
                  clip: float) -> PPOStep:
    """PPO's clipped surrogate, per token: maximise sum_t min(rho_t A_t, clip(rho_t, 1 -+ clip) A_t),
    rho_t = pi(a_t | s_t) / pi_old(a_t | s_t). At pi = pi_old its gradient is sum_t A_t grad log pi(a_t | s_t):
    with A_t = P(x)/(Z q(x)) - pi_old(x)/q(x) for every t, DPG's update with its baseline. The loss sums over
    steps and averages over rows (DPG's scale)."""
    log_rho = (log_pi - log_old).masked_fill(~mask, 0.0)
    rho = log_rho.exp()
    objective = torch.minimum(rho * advantage, rho.clamp(1.0 - clip, 1.0 + clip) * advantage)
    with torch.no_grad():
        approx_kl = float(((rho - 1.0) - log_rho)[mask].mean())
        clipped = float(((rho - 1.0).abs() > clip)[mask].float().mean())
    return PPOStep(-objective.masked_fill(~mask, 0.0).sum() / len(mask), approx_kl, clipped)
