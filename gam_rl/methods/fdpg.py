"""f-DPG (Go et al. 2023): pi_theta -> p = P / Z by minimising an f-divergence D_f(pi || p).

    D_f(pi || p) = E_p[f(pi/p)],   grad D_f = E_p[f'(pi/p) (pi/p) grad log pi]
                                            = E_q[(pi/q) f'(pi/p) grad log pi]     for any proposal q.

The update is that last expectation over the same weighted draws as DPG (methods/draws.py and the
shared loop, methods/loop.py: proposal swaps, thinning, replay, running Z-hat for p = P / Z-hat).
Each divergence is one f' (and its f, used by the exact tests and the docs):

    kl   KL(p || pi)   f = -log t             f' = -1/t       c = -(p/q): DPG's update, exactly
    rkl  KL(pi || p)   f = t log t            f' = 1 + log t  on-policy with a baseline: KL-control
    js   JS(pi, p)     f = (t log(2t/(1+t)) + log(2/(1+t))) / 2         f' = log(2t/(1+t)) / 2
    tv   TV(pi, p)     f = |t - 1| / 2        f' = sign(t - 1) / 2

t = pi(x)/p(x) is computed as log t, which is +inf where P(x) = 0 (f' of kl, js and tv stay finite
there; rkl is infinite, so it needs a target with full support).

Z-hat (`normalise`): the running one (the mean of every weight drawn so far), or the draw's own,
sum_i h_i w_i / sum_i h_i pi(x_i)/q(x_i) (draw_log_z). tv's f' reads Z only through the threshold
pi Z-hat = P: a running Z-hat off by more than the spread of log(pi/p) over the draw puts every item
on one side, and the update is 0 with the baseline (a stall, counted in fdpg_stalled_updates); the
draw's own Z-hat cannot (draw_log_z says why).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import NORMALISE, AveragedLoopConfig, LoopModule, fit_loop, loop_module
from gam_rl.methods.registry import Method, register

log = logging.getLogger("gam_rl")

NORMALISE_FDPG = NORMALISE + ("draw_z",)  # none | running_z | draw_z: the draw's own Z-hat (draw_log_z)
STALL_WARNING = 0.5  # warn when more than this fraction of the updates stalled (fdpg_stalled_updates)
GAP_WARNING = 0.1  # tv: warn when the draws' own log Z-hat is this many nats (and 3 s.e.) from the running one


@dataclass(frozen=True)
class Divergence:
    f: Callable[[torch.Tensor], torch.Tensor]  # f(t) from log t
    fprime: Callable[[torch.Tensor], torch.Tensor]  # f'(t) from log t
    full_support: bool  # infinite unless p > 0 wherever pi > 0


def _js_f(log_t: torch.Tensor) -> torch.Tensor:
    # log(2t/(1+t)) = log 2 - softplus(-log t);  log(2/(1+t)) = log 2 - softplus(log t)
    t = log_t.exp()
    return 0.5 * (t * (math.log(2.0) - F.softplus(-log_t)) + math.log(2.0) - F.softplus(log_t))


DIVERGENCES: dict[str, Divergence] = {
    "kl": Divergence(lambda log_t: -log_t, lambda log_t: -torch.exp(-log_t), False),
    "rkl": Divergence(lambda log_t: log_t.exp() * log_t, lambda log_t: 1.0 + log_t, True),
    "js": Divergence(_js_f, lambda log_t: 0.5 * (math.log(2.0) - F.softplus(-log_t)), False),
    "tv": Divergence(lambda log_t: 0.5 * (log_t.exp() - 1.0).abs(), lambda log_t: 0.5 * torch.sign(log_t), False),
}


def draw_log_z(log_pi: torch.Tensor, log_q: torch.Tensor, log_w: torch.Tensor, log_h: torch.Tensor) -> torch.Tensor:
    """log of the draw's own Z-hat (normalise=draw_z), along the last dimension (kept, to broadcast over a
    batch of draws): Z-hat = sum_i h_i w_i / sum_i rho_i, rho_i = h_i pi(x_i)/q(x_i), the ratio of the
    draw's estimates of Z = E_q[P/q] and of 1 = E_q[pi/q] (consistent; biased by O(1/N)). On pi's own draw
    without thinning, sum_i rho_i = 1: the mean weight, as ppo_dpg's draw_z.
    Why it cannot stall tv: with t_i = pi(x_i) Z-hat / P(x_i), rho_i / t_i = h_i w_i / Z-hat, so
    sum_i rho_i (1 - 1/t_i) = sum_i rho_i - sum_i h_i w_i / Z-hat = 0, a sum of rho_i > 0 times (1 - 1/t_i):
    unless every t_i = 1, some t_i > 1 and some t_i < 1, so sign(t - 1) is never the same for every item.
    A draw whose weights are all 0 gives log Z-hat 0 (Z taken as 1: every t_i is +inf anyway)."""
    log_z = (torch.logsumexp(log_w + log_h, -1, keepdim=True)
             - torch.logsumexp(log_pi - log_q + log_h, -1, keepdim=True))
    return torch.where(torch.isfinite(log_z), log_z, 0.0)


def fdpg_fprime(log_pi: torch.Tensor, log_q: torch.Tensor, log_w: torch.Tensor, divergence: str, *,
                log_z: float | torch.Tensor = 0.0) -> torch.Tensor:
    """f'(pi(x_i)/p(x_i)) of every item, p = P / Z-hat, log P = log w + log q (float64)."""
    log_p = log_w + log_q - log_z  # log p(x) = log P(x) - log Z-hat
    return DIVERGENCES[divergence].fprime(log_pi - log_p)  # f'(t), log t = log pi/p (+inf where P = 0)


def stalled(fprime: torch.Tensor) -> bool:
    """Whether one draw's update carries no signal: f' is the same for every item (tv: every sign the same),
    so the baseline removes all of it (the update is exactly 0) and without the baseline only the constant
    part is left, sum_i rho_i f' grad log pi(x_i), zero in expectation. A draw of one item never stalls."""
    return len(fprime) > 1 and bool((fprime == fprime[0]).all())


def fdpg_coefficients(log_pi: torch.Tensor, log_q: torch.Tensor, log_w: torch.Tensor, log_h: torch.Tensor,
                      divergence: str, *, log_z: float | torch.Tensor = 0.0, baseline: bool = False,
                      fprime: torch.Tensor | None = None) -> torch.Tensor:
    """The per-item coefficients of one f-DPG update (float64, along the last dimension: one draw, or a
    batch of draws (D, N) for the exact tests):

        c_i = h_i (pi(x_i)/q(x_i)) f'(pi(x_i)/p(x_i)),   p = P / Z-hat,   log P = log w + log q,

    so that sum_i c_i grad log pi(x_i) estimates grad D_f(pi || p) (h_i: the item's share of its draw).
    log_z: log Z-hat, a number or one per draw ((D, 1): draw_log_z).
    log_pi is pi's log-probability *without dropout* (the caller's eval-mode pass): a dropout pass here
    would make the update the gradient of E_mask[D_f(pi_mask || p)], not of D_f(pi || p).
      baseline  f'_i -= b_{-i}, the leave-one-out mean of f' over the rest of the draw,
                b_{-i} = sum_{j != i} rho_j f'_j / sum_{j != i} rho_j,  rho_j = h_j pi(x_j)/q(x_j).
                For i.i.d. draws b_{-i} is independent of x_i, so E[rho_i b_{-i} grad log pi(x_i)] =
                E[b_{-i}] h E_pi[grad log pi] = 0: the expected update is exactly the plain one, on-policy
                and off (a mean over the whole draw, item i included, is correlated with item i: a
                bias of order 1/ESS). A draw of one item has no rest: b = 0. Thinning and replay make
                the items' shares depend on each other: there the baseline is unbiased only to O(1/N).
    fprime: f' of every item when the caller has it already (fdpg_fprime of the same arguments).
    """
    if fprime is None:
        fprime = fdpg_fprime(log_pi, log_q, log_w, divergence, log_z=log_z)
    rho = torch.exp(log_pi - log_q + log_h)  # h_i pi(x_i)/q(x_i)
    if baseline:
        rest = rho.sum(-1, keepdim=True) - rho  # sum_{j != i} rho_j
        rest_f = (rho * fprime).sum(-1, keepdim=True) - rho * fprime
        fprime = fprime - torch.where(rest > 0, rest_f / rest.clamp(min=1e-300), 0.0)
    return rho * fprime


def fdpg_loss(log_pi: torch.Tensor, draw: WeightedDraw, divergence: str, *, log_z: float | torch.Tensor = 0.0,
              baseline: bool = False, weight_log_pi: torch.Tensor | None = None,
              fprime: torch.Tensor | None = None) -> torch.Tensor:
    """One f-DPG update as a loss for autograd: sum_i c_i log pi(x_i) (fdpg_coefficients), whose gradient
    estimates grad D_f(pi || p), with no gradient through c. For kl, c_i = -h_i P(x_i)/(Z-hat q(x_i)):
    minus DPG's coefficient. weight_log_pi: pi's log-probabilities for the coefficients, without
    dropout (None: log_pi itself, detached; right when pi has no dropout). fprime: as fdpg_coefficients."""
    weights = (log_pi if weight_log_pi is None else weight_log_pi).detach().double()
    coef = fdpg_coefficients(weights, draw.log_q, draw.log_w, draw.log_h, divergence, log_z=log_z, baseline=baseline,
                             fprime=fprime)
    return (coef.float() * log_pi).sum()


def f_divergence(divergence: str, log_pi: torch.Tensor, log_p: torch.Tensor) -> torch.Tensor:
    """D_f(pi || p) = sum_x p(x) f(pi(x)/p(x)) over an enumerated space (differentiable in log_pi);
    where p = 0, the limit p f(pi/p) -> pi f'(inf) (0 for kl, pi log 2 / 2 for js, pi / 2 for tv)."""
    div = DIVERGENCES[divergence]
    support = torch.isfinite(log_p)
    inside = (log_p[support].exp() * div.f(log_pi[support] - log_p[support])).sum()
    outside_slope = {"kl": 0.0, "js": 0.5 * math.log(2.0), "tv": 0.5, "rkl": math.inf}[divergence]
    outside = log_pi[~support].exp().sum() * outside_slope if (~support).any() else 0.0
    return inside + outside


@dataclass
class FDPGConfig(AveragedLoopConfig):
    """`method` section of f-DPG (conf/method/fdpg.yaml, fdpg_rkl, fdpg_js, fdpg_tv, kl_control.yaml): the
    loop's draws and schedule, a divergence, and where the draws come from."""

    algorithm: str = setting("fdpg", choices=("fdpg",))
    divergence: str = setting("kl", choices=DIVERGENCES)  # kl | rkl | js | tv: D_f(pi || p)
    on_policy: bool = False  # true: x ~ pi at every update (no swaps); false: x ~ q with dpg_off's swap gate
    baseline: bool = False  # subtract the leave-one-out mean of f'(pi/p) over the draw (fdpg_coefficients)
    # p = P / Z-hat, every divergence but kl needs Z: running_z (the mean of every weight so far) | draw_z
    # (the draw's own, draw_log_z: tv never stalls on it) | none (Z taken as 1: kl only)
    normalise: str = setting("running_z", choices=NORMALISE_FDPG)

    def samples_pi(self) -> bool:
        return self.on_policy

    def problems(self) -> list[str]:
        out = super().problems()
        if self.divergence != "kl" and self.normalise == "none":
            out.append(f"method.normalise={self.normalise!r} with method.divergence={self.divergence!r}: f'(pi/p) "
                       "needs p = P / Z, so Z-hat; use method.normalise=running_z or draw_z (only kl ignores Z)")
        if DIVERGENCES[self.divergence].full_support and self.target == "true":
            out.append(f"method.divergence={self.divergence!r} with method.target='true': KL(pi || p) is infinite "
                       "while pi puts mass off the true process's support; use kl, js or tv")
        if self.target == "true" and self.thins() and self.divergence != "kl":
            out.append(f"method.divergence={self.divergence!r} with method.target='true' and thinning "
                       "(method.keep_per_draw < method.proposal_batch): thinning by P/q drops the samples with "
                       "P = 0, whose f-DPG coefficient is not 0; turn thinning off")
        return out


class FDPGModule(LoopModule):
    """f-DPG's update, with two records of how far Z-hat let it see: the stalled updates (f' the same for
    every item: no signal) and, with the running Z-hat, the gap log Z-hat(draw) - log Z-hat(running)
    between each draw's own Z-hat (draw_log_z) and the running one the update divided by."""

    loss_name = "dpg/fdpg_loss"  # sum_i c_i log pi(x_i), descent on D_f: not dpg/loss's scale or sign

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.updates_seen, self.updates_stalled = 0, 0  # fdpg_stalled_updates = stalled / seen
        self.gaps: list[float] = []  # normalise=running_z: log Z-hat(draw) - log Z-hat(running), per update

    def loss(self, draw: WeightedDraw) -> torch.Tensor:
        log_pi = self.pi.log_prob(draw.tokens)  # the training pass (dropout): the gradient
        weight_log_pi = self.weight_log_prob(draw.tokens, log_pi)  # without dropout: the coefficients
        weights, cfg = weight_log_pi.detach().double(), self.cfg
        own = draw_log_z(weights, draw.log_q, draw.log_w, draw.log_h)
        log_z = own if cfg.normalise == "draw_z" else self.log_norm()
        if cfg.normalise == "running_z":
            self.gaps.append(float(own) - log_z)
            self.log("dpg/fdpg_log_z_gap", self.gaps[-1], on_step=True, on_epoch=False, batch_size=len(draw))
        fprime = fdpg_fprime(weights, draw.log_q, draw.log_w, cfg.divergence, log_z=log_z)  # once: stall and update
        stall = stalled(fprime)
        self.updates_seen += 1
        self.updates_stalled += stall
        self.log("dpg/fdpg_stalled", float(stall), on_step=True, on_epoch=False, batch_size=len(draw))
        return fdpg_loss(log_pi, draw, cfg.divergence, log_z=log_z, baseline=cfg.baseline,
                         weight_log_pi=weight_log_pi, fprime=fprime)

    def stalled_fraction(self) -> float | None:
        return self.updates_stalled / self.updates_seen if self.updates_seen else None

    def gap(self) -> tuple[float | None, float | None]:
        """The mean and s.d. over the updates of log Z-hat(draw) - log Z-hat(running) (None: not running_z)."""
        if not self.gaps:
            return None, None
        gaps = torch.tensor(self.gaps, dtype=torch.float64)
        return float(gaps.mean()), float(gaps.std()) if len(gaps) > 1 else 0.0

    def on_train_end(self):
        cfg, fraction = self.cfg, self.stalled_fraction()
        if fraction is not None and fraction > STALL_WARNING:
            log.warning("[fdpg] %d of %d updates (%.0f%%) stalled: f'(pi/p) was the same for every item of the draw, "
                        "so the update carried no signal (%s with normalise=%s%s); pi barely learns. tv needs Z-hat "
                        "to better than the spread of log(pi/p): try method.normalise=draw_z (docs/methods.md)",
                        self.updates_stalled, self.updates_seen, 100 * fraction, cfg.divergence, cfg.normalise,
                        ", the baseline removes all of it" if cfg.baseline else "")
        gap, gap_sd = self.gap()  # warned about when it is more than GAP_WARNING and 3 s.e. from 0
        if (cfg.divergence == "tv" and gap is not None and abs(gap) > GAP_WARNING
                and abs(gap) > 3 * gap_sd / math.sqrt(len(self.gaps))):
            log.warning("[fdpg] the draws' own log Z-hat is %.3f nats %s the running one on average: tv's f' = "
                        "sign(pi Z-hat / P - 1) / 2 compares pi with p up to that factor, which on the toy cost 80%% "
                        "of the update's progress at 0.25 nats; try method.normalise=draw_z (docs/methods.md)",
                        abs(gap), "above" if gap > 0 else "below")

    def results(self) -> dict:
        gap, gap_sd = self.gap()
        return {"fdpg_stalled_updates": self.stalled_fraction(), "fdpg_log_z_gap": gap, "fdpg_log_z_gap_sd": gap_sd}


def train_fdpg(cfg: FDPGConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(FDPGModule, cfg, inputs)
    return fit_loop(module, inputs, clip=cfg.clip)


register(Method("fdpg", FDPGConfig, train_fdpg, "f-DPG: descent on D_f(pi || p) for f = kl, rkl, js or tv"))
