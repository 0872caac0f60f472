"""DPG (Parshakova et al. 2019): pi_theta -> p = P / Z by descent on CE(p, pi), from draws of q.

    dpg_off  x ~ q:  theta += alpha (P(x)/q(x)) grad log pi(x)   (paper Algorithm 1; q starts as
             r and becomes a copy of pi only when a swap gate says pi is the better proposal)
    dpg_on   x ~ pi: theta += alpha (P(x)/pi(x)) grad log pi(x)  (q = pi at every update)

The update is `dpg_loss`; the draws, checks, swaps and stops are the shared loop's (methods/loop.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import NORMALISE, AveragedLoopConfig, LoopModule, fit_loop, loop_module
from gam_rl.methods.registry import Method, register

ALGORITHMS = ("dpg_off", "dpg_on")


def dpg_loss(log_pi: torch.Tensor, draw: WeightedDraw, *, log_norm: float = 0.0,
             baseline: float | None = None, weight_log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """One update of Algorithm 1 (DPG_off, Parshakova et al. 2019) as a loss for autograd:

        theta <- theta + alpha sum_i c_i grad log pi_theta(x_i),   x_i ~ q,
        c_i = h_i P(x_i) / (Z q(x_i)),   h_i = 1/N for a plain draw of N (thinning, replay: draws.py)

    sum_i c_i grad log pi estimates E_q[(P / (Z q)) grad log pi] = E_p[grad log pi] = -grad CE(p, pi).
    The loss is -sum_i c_i log pi(x_i), with no gradient through c.
      log_norm  log Z-hat (normalise=running_z), or 0: Z taken as 1 (the paper; it only scales the step)
      baseline  b: c_i -= h_i b pi(x_i) / q(x_i). E_q[(pi/q) grad log pi] = E_pi[grad log pi] = 0, so the
                expected update is unchanged and the part of w that pi already explains is removed
                (under thinning, items kept for their weight carry the baseline term at random: more
                variance, not bias, as long as P > 0 wherever q > 0)
      weight_log_pi  pi's log-probabilities for the baseline's pi/q, without dropout (None: log_pi itself)
    """
    coef = torch.exp(draw.log_w + draw.log_h - log_norm)  # c_i, with log w_i = log P(x_i) - log q(x_i)
    if baseline is not None:
        weights = (log_pi if weight_log_pi is None else weight_log_pi).detach().double()
        coef = coef - baseline * torch.exp(weights - draw.log_q + draw.log_h)
    return -(coef.float() * log_pi).sum()


@dataclass
class DPGConfig(AveragedLoopConfig):
    """`method` section of dpg_off and dpg_on (conf/method/dpg_off.yaml, dpg_on, dpg_true): the paper's
    schedule by default; every other value is a named option (docs/methods.md)."""

    algorithm: str = setting("dpg_off", choices=ALGORITHMS)
    normalise: str = setting("none", choices=NORMALISE)
    baseline: bool = False  # subtract Z-hat pi(x)/q(x) from each weight (zero-mean control variate)

    def samples_pi(self) -> bool:
        return self.algorithm == "dpg_on"

    def problems(self) -> list[str]:
        out = super().problems()
        if self.baseline and self.target == "true" and self.thins():
            out.append("method.baseline=true with thinning (method.keep_per_draw < method.proposal_batch) and "
                       "method.target='true': thinning drops the zero-weight samples that the baseline term "
                       "needs, which biases the gradient; turn one of them off")
        return out


class DPGModule(LoopModule):
    def loss(self, draw: WeightedDraw) -> torch.Tensor:
        log_norm = self.log_norm()
        # b = Z-hat in the weights' units: Z-hat unnormalised, 1 once the weights are divided by Z-hat
        baseline = math.exp(self.draws.running_z.log_z - log_norm) if self.cfg.baseline else None
        log_pi = self.pi.log_prob(draw.tokens)
        weights = self.weight_log_prob(draw.tokens, log_pi) if baseline is not None else None
        return dpg_loss(log_pi, draw, log_norm=log_norm, baseline=baseline, weight_log_pi=weights)


def train_dpg(cfg: DPGConfig, inputs: Training2Inputs) -> Training2Result:
    """Train inputs.pi in place towards p = P / Z from draws of r and pi's copies (dpg_off) or of pi
    itself (dpg_on); on return pi holds the best-CE(V) weights."""
    module = loop_module(DPGModule, cfg, inputs)
    return fit_loop(module, inputs, clip=cfg.clip)


for _name, _summary in (("dpg_off", "DPG off-policy: x ~ q, q <- pi when pi is better on V (the paper)"),
                        ("dpg_on", "DPG on-policy: x ~ pi at every update")):
    register(Method(_name, DPGConfig, train_dpg, _summary))
