"""subtb: GFlowNet sub-trajectory balance (Madan et al. 2023) on the token MDP of P_lambda, as used to
fine-tune language models towards an unnormalised target (Hu et al., ICLR 2024).

The token MDP is a tree (every prefix has one parent), so a GFlowNet's backward policy is 1 and its
flow through a prefix s is F(s) = Z(s), the mass of P over the completions of s. Written with r's
prefix probability taken out, log F(s) = log r(s) + V(s) (V the soft value of methods/twist.py; at
the empty prefix log F = V = log Z). Sub-trajectory balance asks, for every stretch s_t -> s_u of a
trajectory (t < u <= L, L its length, s_L the complete string):

    log F(s_t) + sum_{k=t}^{u-1} log pi(a_k | s_k) = log F(s_u),   i.e.

    delta(t, u) = V(s_t) + sum_{k=t}^{u-1} [log pi(a_k | s_k) - log r(a_k | s_k)] - V(s_u) = 0,

with V(s_L) = log P(x) - log r(x) = lambda . phi(x), exact (the reward). With B_t = V(s_t) - c_t and
c_t = sum_{k<t} [log pi - log r]_k, delta(t, u) = B_t - B_u: every pair from one prefix sum. The loss
is the lambda-weighted mean over all pairs of a trajectory, sum_{t<u} w^(u-t) delta^2 / sum w^(u-t)
(w = subtb_lambda), averaged over trajectories: draws of q or pi and rows of D (any trajectory
satisfies the balance, so training is off-policy). Its zero is pi = p_lambda and V = V*.

pcl is the same residual with V tied to pi's logits (V = logsumexp of Q) and only the pairs (t, L)
(horizon 0) or (t, t + d): subtb learns the log-flow V(s) as its own model (a head on pi's LSTM, or
a separate LSTM started from r) and balances every sub-trajectory.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import loop_module
from gam_rl.methods.registry import Method, register
from gam_rl.methods.twist_loop import TrajectoryLoopConfig, TwistModule, fit_twist
from gam_rl.tokens import PAD


def subtb_loss(values: torch.Tensor, log_pi: torch.Tensor, log_r: torch.Tensor, terminal: torch.Tensor,
               mask: torch.Tensor, weight: float) -> torch.Tensor:
    """Sub-trajectory balance over every pair t < u <= L of each row (module docstring), weighted
    weight^(u - t) and normalised per row, then averaged over rows. values, log_pi, log_r: (B, T) at the
    steps (mask); terminal: (B,) lambda . phi(x) = log P(x) - log r(x)."""
    B, T = mask.shape
    lengths = mask.sum(1)
    steps = torch.arange(T + 1, device=mask.device)
    # c_t = sum_{k<t} (log pi - log r)_k for t = 0 .. T
    c = torch.cat([log_pi.new_zeros(B, 1), (log_pi - log_r).masked_fill(~mask, 0.0).cumsum(1)], 1)
    # W_t = V(s_t) for t < L, the exact reward at t = L
    w_full = torch.cat([values, values.new_zeros(B, 1)], 1)
    w_full = torch.where(steps.unsqueeze(0) == lengths.unsqueeze(1), terminal.to(values.dtype).unsqueeze(1), w_full)
    b = w_full - c  # B_t; delta(t, u) = B_t - B_u
    delta = b.unsqueeze(2) - b.unsqueeze(1)  # (B, t, u)
    gap = (steps.unsqueeze(0) - steps.unsqueeze(1)).to(values.dtype)  # u - t
    inside = steps.view(1, -1, 1) <= lengths.view(-1, 1, 1)
    pairs = (gap > 0).unsqueeze(0) & inside & inside.transpose(1, 2)  # t < u <= L
    pair_weight = torch.where(pairs, torch.pow(torch.as_tensor(weight, dtype=values.dtype), gap.clamp(min=0)), 0.0)
    per_row = (pair_weight * delta.pow(2)).sum((1, 2)) / pair_weight.sum((1, 2)).clamp(min=1e-30)
    return per_row.mean()


@dataclass
class SubTBConfig(TrajectoryLoopConfig):
    """`method` section of subtb (conf/method/subtb.yaml): the twist loop's keys, a log-flow model and the
    pair weighting."""

    algorithm: str = setting("subtb", choices=("subtb",))
    critic: str = setting("separate", choices=("head", "separate"))  # the log-flow model V(s)
    subtb_lambda: float = setting(0.9, gt=0, le=1)  # pair (t, u) weighted lambda^(u - t); 1: every pair alike
    on_policy: bool = True  # true: x ~ pi at every update (no swaps); false: x ~ q with dpg_off's swap gate


class SubTBModule(TwistModule):
    def update(self, draw: WeightedDraw) -> None:
        tokens = self.trajectories(draw)  # the draw, and rows of D: they satisfy the same balance
        mask = tokens != PAD
        log_r, terminal = self.rewards(tokens)
        states = self.pi.token_states(tokens)
        loss = subtb_loss(self.critic(tokens, states), self.pi.token_log_probs(tokens, states), log_r, terminal, mask,
                          self.cfg.subtb_lambda)
        self.log("dpg/subtb_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(tokens))
        self.step(loss)


def train_subtb(cfg: SubTBConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(SubTBModule, cfg, inputs)
    return fit_twist(module, inputs)


register(Method("subtb", SubTBConfig, train_subtb,
                "GFlowNet sub-trajectory balance: a learned log-flow per prefix, every sub-trajectory balanced"))
