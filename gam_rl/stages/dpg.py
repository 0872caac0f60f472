"""Training-2 by distributional policy gradient: pi_theta -> p = P / Z for any potential P.

    dpg_off  x ~ q:  theta += alpha (P(x)/q(x)) grad log pi(x)   (paper Algorithm 1; q starts as
             r and becomes a copy of pi only when a swap gate says pi is the better proposal)
    dpg_on   x ~ pi: theta += alpha (P(x)/pi(x)) grad log pi(x)  (q = pi at every update)
    pg       x ~ pi: theta += alpha P(x) grad log pi(x)          (REINFORCE with reward P: RL as
             optimisation, which maximises E_pi[P] and collapses onto its mode)
    fdpg     x ~ q (or pi): theta -= alpha (pi(x)/q(x)) f'(pi(x)/p(x)) grad log pi(x), descent on an
             f-divergence D_f(pi || p) (stages/fdpg.py); divergence=kl is dpg_off's update, and
             on-policy rkl with a baseline is KL-control (method=kl_control)

The update is `dpg_loss`; the draws it trains on (weights, thinning, replay, running Z) are
stages/draws.py; a check ("epoch") every `updates_per_epoch` updates measures CE(V, pi), runs
the swap gate and feeds the plateau rule (stages/common.py), and the best pi is kept.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gam_rl.config_fields import MISSING, setting
from gam_rl.estimators import effective_sample_size, snis_moment_gap
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import Potential, Tilt, tilt_of
from gam_rl.stages.common import KeepBestPlateau, Plateau, StageProgress, make_trainer, token_loader
from gam_rl.stages.draws import ProposalDraws, WeightedDraw
from gam_rl.stages.fdpg import DIVERGENCES, fdpg_loss

log = logging.getLogger("gam_rl")

ALGORITHMS = ("dpg_off", "dpg_on", "pg")
ON_POLICY = ("dpg_on", "pg")  # sample pi itself (fdpg: its on_policy key)
TARGETS = ("gam", "true")  # gam: P = P_lambda | true: P = the true process (paper Supp. A.3)
INITS = ("fresh", "r")  # fresh: a new LSTM (the paper) | r: pi starts as a copy of r
NORMALISE = ("none", "running_z")  # none: Z taken as 1 (the paper) | running_z: w / running Z-hat
KL_GATE_MIN_ESS = 30.0  # swap_gate=kl_is: fewer effective samples than this never swap


def dpg_loss(log_pi: torch.Tensor, draw: WeightedDraw, *, log_norm: float = 0.0, reward: bool = False,
             baseline: float | None = None) -> torch.Tensor:
    """One update of Algorithm 1 (DPG_off, Parshakova et al. 2019) as a loss for autograd:

        theta <- theta + alpha sum_i c_i grad log pi_theta(x_i),   x_i ~ q,
        c_i = h_i P(x_i) / (Z q(x_i)),   h_i = 1/N for a plain draw of N (thinning, replay: draws.py)

    sum_i c_i grad log pi estimates E_q[(P / (Z q)) grad log pi] = E_p[grad log pi] = -grad CE(p, pi).
    The loss is -sum_i c_i log pi(x_i), with no gradient through c.
      log_norm  log Z-hat (normalise=running_z), or 0: Z taken as 1 (the paper; it only scales the step)
      reward    pg: c_i = h_i P(x_i) pi(x_i) / (Z q(x_i)), i.e. E_pi[(P/Z) grad log pi] (REINFORCE with
                reward P/Z) from a draw of q; pi/q = 1 when q is the current pi
      baseline  b: c_i -= h_i b pi(x_i) / q(x_i). E_q[(pi/q) grad log pi] = E_pi[grad log pi] = 0, so the
                expected update is unchanged and the part of w that pi already explains is removed
                (under thinning, items kept for their weight carry the baseline term at random: more
                variance, not bias, as long as P > 0 wherever q > 0)
    """
    log_c = draw.log_w + draw.log_h - log_norm  # log c_i, with log w_i = log P(x_i) - log q(x_i)
    if reward:
        log_c = log_c + log_pi.detach().double()  # P pi / q
    coef = torch.exp(log_c)
    if baseline is not None:
        coef = coef - baseline * torch.exp(log_pi.detach().double() - draw.log_q + draw.log_h)
    return -(coef.float() * log_pi).sum()


def ce_valid_gate(module: DPGModule, ce_pi: float) -> dict | None:
    """The paper's gate: q <- pi when CE(V, pi) < CE(V, q) (only ever to a better policy)."""
    return {} if ce_pi < module.ce_valid_q else None


def kl_is_gate(module: DPGModule, ce_pi: float) -> dict | None:
    """q <- pi when KL(p || q) - KL(p || pi) = E_p[log pi(x) - log q(x)] > 2 standard errors, by
    self-normalised IS on a fresh draw of q (the next update trains on it: no extra samples),
    on an effective sample size of at least KL_GATE_MIN_ESS (else its s.e. is not trusted)."""
    draw = module.draws.peek()
    log_c = draw.log_w + draw.log_h
    if not torch.isfinite(log_c).any():  # no sample of q in the support of P: nothing to compare on
        gain, gain_se, ess = 0.0, math.inf, 0.0
    else:
        with eval_mode(module.checked):
            diff = module.checked.log_prob(draw.tokens).double() - draw.log_q
        weights = torch.softmax(log_c, 0)
        gain = float((weights * diff).sum())
        gain_se, ess = float(torch.sqrt((weights**2 * (diff - gain) ** 2).sum())), effective_sample_size(log_c)
    module.log("dpg/kl_gain", gain)
    module.log("dpg/kl_gate_ess", ess)
    better = ess >= KL_GATE_MIN_ESS and gain > 2.0 * gain_se
    return {"kl_gain": gain, "kl_gain_se": gain_se, "kl_gate_ess": ess} if better else None


SWAP_GATES = {"ce_valid": ce_valid_gate, "kl_is": kl_is_gate}


@dataclass
class DPGConfig:
    """`method` section of the DPG family (conf/method/dpg_off.yaml, dpg_on, pg, dpg_true): the
    paper's schedule by default; every other value is a named option (docs/methods.md)."""

    name: str = setting(MISSING)  # names the run folder and results.json's `method`
    algorithm: str = setting("dpg_off", choices=ALGORITHMS)
    target: str = setting("gam", choices=TARGETS)
    init: str = setting("fresh", choices=INITS)
    lr: float = setting(0.01, gt=0)  # Adam
    minibatch: int = setting(500, ge=1)  # items backpropagated per update
    proposal_batch: int | None = setting(None, ge=1)  # samples per fresh draw; None: = minibatch (the paper)
    keep_per_draw: int | None = setting(None, ge=1)  # items kept by unbiased thinning; None: = minibatch
    replay: int = setting(0, ge=0)  # > 0: train on a buffer of the last `replay` items (0: the paper)
    steps_per_draw: int = setting(1, ge=1)  # with replay: updates per fresh draw
    normalise: str = setting("none", choices=NORMALISE)
    baseline: bool = False  # subtract Z-hat pi(x)/q(x) from each weight (zero-mean control variate)
    swap_gate: str = setting("ce_valid", choices=SWAP_GATES)  # dpg_off: ce_valid (the paper) | kl_is
    updates_per_epoch: int = setting(4000, ge=1)  # one check (CE(V), swap gate, plateau) per "epoch"
    max_epochs: int = setting(100, ge=1)
    patience: int = setting(10, ge=1)  # on CE(V, pi)
    clip: float | None = setting(0.25, gt=0)  # grad-norm clip; None: none
    target_margin: float = setting(0.01, gt=0)  # results record when CE(V, pi) first reaches (1 + margin) CE(V, p)
    # adaptive draw size: each fresh draw sized for this many effective samples (draws.py), between
    # min_proposal_batch (None: max(minibatch, keep_per_draw)) and proposal_batch; None: always proposal_batch
    ess_per_draw: int | None = setting(None, ge=1)
    min_proposal_batch: int | None = setting(None, ge=1)
    # ... and a draw shrinks only once its ESS / N is at least this (q close enough to p for the ESS to tell)
    shrink_at_ess_fraction: float = setting(0.5, gt=0, le=1)
    # stop at the first check where CE(V, pi) - CE(V, p_lambda) <= this many standard errors of that
    # difference (paired over V, with log Z-hat's); None: the plateau rule alone (the paper)
    stop_within_noise: float | None = setting(None, gt=0)
    # ... and only if pi puts the tilt lambda . phi(x) where p_lambda does: at such a check, draw this many
    # samples of pi and require |E_p[lambda . phi] - E_pi[lambda . phi]| - stop_tilt_z s.e. <=
    # stop_tilt_tolerance nats (weighted by P/pi: TiltCheck); None: the CE test alone
    stop_tilt_samples: int | None = setting(None, ge=100)
    stop_tilt_z: float = setting(2.0, ge=0)
    stop_tilt_tolerance: float = setting(0.3, ge=0)
    # init=r: pi's starting weights are the plateau's check 0 (their CE(V) is CE(V, r)), so pi is r
    # unless a check beats it, and patience counts from the start; false: check 1 is the first candidate
    keep_start: bool = False
    lr_warmup: int = setting(0, ge=0)  # updates over which the lr rises linearly to `lr`; 0: none (the paper)
    # > 0: after `patience` checks without a better CE(V, pi), restart from the best weights (or r, with
    # keep_start) at lr x lr_decay_factor, at most lr_decays times, then stop (0: stop at once, the paper)
    lr_decays: int = setting(0, ge=0)
    lr_decay_factor: float = setting(0.5, gt=0, lt=1)
    # average the iterates: the pi that is checked, swapped into q, kept and returned is the exponential
    # moving average of the trained weights, theta_avg <- d theta_avg + (1 - d) theta after every update,
    # starting from pi's initial weights; None: the trained weights themselves (the paper)
    ema_decay: float | None = setting(None, gt=0, lt=1)

    def thins(self) -> bool:
        """Whether a draw keeps fewer items than it samples."""
        kept, drawn = self.keep_per_draw or self.minibatch, self.proposal_batch or self.minibatch
        return kept < max(drawn, self.minibatch)

    def problems(self) -> list[str]:
        """Values that are fine alone but not together."""
        kept, drawn = self.keep_per_draw or self.minibatch, self.proposal_batch or self.minibatch
        out = []
        if self.replay and self.replay < max(self.minibatch, kept):
            out.append(f"method.replay={self.replay}: must be 0 or >= method.keep_per_draw ({kept}) and >= "
                       f"method.minibatch ({self.minibatch}): the buffer holds at least one whole draw")
        if self.swap_gate == "kl_is" and min(kept, drawn) < KL_GATE_MIN_ESS:
            out.append(f"method.swap_gate='kl_is' with {min(kept, drawn)} items per draw: the gate swaps only on an "
                       f"effective sample size >= {KL_GATE_MIN_ESS:.0f}; raise method.keep_per_draw / "
                       "method.minibatch")
        if self.ess_per_draw is not None and (self.proposal_batch or self.minibatch) <= self.minibatch:
            out.append(f"method.ess_per_draw={self.ess_per_draw}: an adaptive draw size needs room to move; set "
                       f"method.proposal_batch (the largest draw) above method.minibatch ({self.minibatch})")
        if self.min_proposal_batch is not None and self.min_proposal_batch > (self.proposal_batch or self.minibatch):
            out.append(f"method.min_proposal_batch={self.min_proposal_batch}: above method.proposal_batch "
                       f"({self.proposal_batch or self.minibatch})")
        if self.stop_within_noise is not None and self.target == "true":
            out.append(f"method.stop_within_noise={self.stop_within_noise} with method.target='true': the stop "
                       "compares pi with p_lambda on V; set method.stop_within_noise=null (the cpu profile sets it "
                       "for dpg_off at |D| <= 1000)")
        if self.stop_tilt_samples is not None and self.stop_within_noise is None:
            out.append(f"method.stop_tilt_samples={self.stop_tilt_samples} without method.stop_within_noise: the "
                       "tilt test is part of the stop within noise; set method.stop_within_noise (e.g. 1) or "
                       "method.stop_tilt_samples=null")
        if self.lr_decays and self.lr_warmup:
            out.append(f"method.lr_decays={self.lr_decays} with method.lr_warmup={self.lr_warmup}: the warm-up's "
                       "schedule sets the lr at every update and would undo a decay; set one of them to 0")
        if self.ema_decay is not None and self.lr_decays:
            out.append(f"method.ema_decay={self.ema_decay} with method.lr_decays={self.lr_decays}: a restart would "
                       "put back the averaged weights, not the trained ones; set one of them off")
        if self.keep_start and self.init != "r":
            out.append(f"method.keep_start=true with method.init={self.init!r}: only a pi that starts as r has a known "
                       "CE(V) to keep; set method.init=r or method.keep_start=false")
        if self.baseline and self.algorithm == "pg":
            out.append("method.baseline=true: the pi/q baseline is a control variate of the importance-weighted "
                       "DPG update, not of pg's reward")
        if self.baseline and self.target == "true" and self.thins():
            out.append("method.baseline=true with thinning (method.keep_per_draw < method.proposal_batch) and "
                       "method.target='true': thinning drops the zero-weight samples that the baseline term "
                       "needs, which biases the gradient; turn one of them off")
        return out


@dataclass
class FDPGConfig(DPGConfig):
    """`method` section of f-DPG (conf/method/fdpg.yaml, kl_control.yaml): DPGConfig's draws and
    schedule, a divergence, and where the draws come from."""

    algorithm: str = setting("fdpg", choices=("fdpg",))
    divergence: str = setting("kl", choices=DIVERGENCES)  # kl | rkl | js | tv: D_f(pi || p) (stages/fdpg.py)
    on_policy: bool = False  # true: x ~ pi at every update (no swaps); false: x ~ q with dpg_off's swap gate
    baseline: bool = False  # subtract the draw's self-normalised mean of f'(pi/p) (stages/fdpg.py, fdpg_loss)
    normalise: str = setting("running_z", choices=NORMALISE)  # p = P / Z-hat: every divergence but kl needs Z

    def problems(self) -> list[str]:
        out = super().problems()
        if self.divergence != "kl" and self.normalise != "running_z":
            out.append(f"method.normalise={self.normalise!r} with method.divergence={self.divergence!r}: f'(pi/p) "
                       "needs p = P / Z, so Z-hat; use method.normalise=running_z (only kl ignores Z)")
        if DIVERGENCES[self.divergence].full_support and self.target == "true":
            out.append(f"method.divergence={self.divergence!r} with method.target='true': KL(pi || p) is infinite "
                       "while pi puts mass off the true process's support; use kl, js or tv")
        if self.target == "true" and self.thins() and self.divergence != "kl":
            out.append(f"method.divergence={self.divergence!r} with method.target='true' and thinning "
                       "(method.keep_per_draw < method.proposal_batch): thinning by P/q drops the samples with "
                       "P = 0, whose f-DPG coefficient is not 0; turn thinning off")
        return out


def on_policy(cfg: DPGConfig) -> bool:
    """Whether the draws come from pi itself (dpg_on, pg, fdpg with on_policy) rather than q."""
    return cfg.algorithm in ON_POLICY or getattr(cfg, "on_policy", False)


class TiltCheck:
    """The stop within noise's second test: does pi put the log-linear term where p_lambda does? The
    tilt t(x) = lambda . phi(x) = log P_lambda(x) - log r(x) is what DPG adds to r; from `samples`
    fresh draws x_i ~ pi (their own generator: DPG's draws are untouched), weighted by P(x_i)/pi(x_i),
    estimators.snis_moment_gap gives E_p[t] - E_pi[t] (nats per sequence) and its s.e., and the test
    passes when that gap is not shown to exceed the tolerance: |gap| - z s.e. <= tolerance. The
    record also has every feature's own gap E_p[phi_k] - E_pi[phi_k] and s.e.

    Why: CE(V, pi) - CE(V, p_lambda) carries log Z-hat's s.e., which at small |D| (Z-hat from r with an
    ESS of a few hundred) lets the CE test accept a pi whose motif frequency is still well below
    p_lambda's; the tilt needs no Z. Weighted by lambda, a feature that barely shapes P_lambda (a
    distractor with lambda near 0, whose frequency DPG's pi can miss by 0.04 for 20 checks) does not
    hold the stop, and the motif, with |lambda| about 10, does."""

    def __init__(self, target: Potential, tilt: Tilt, *, samples: int, z: float, tolerance: float,
                 max_len: int, seed: int, device):
        self.target, self.tilt, self.samples, self.max_len = target, tilt, samples, max_len
        self.z, self.tolerance = z, tolerance
        self.generator = torch.Generator(device=device).manual_seed(seed)

    def __call__(self, pi: LSTMPolicy) -> dict:
        features = self.tilt.features
        with torch.no_grad():
            draw = pi.sample(self.samples, self.max_len, self.generator)
            log_w = self.target.log_weight(pi, draw)  # log P(x) - log pi(x)
            phi = features(draw.tokens).double()
            t = phi @ self.tilt.lam.to(phi)  # lambda . phi(x), nats
            gap = snis_moment_gap(log_w, torch.cat([t.unsqueeze(1), phi], dim=1))
        tilt_gap, tilt_se = float(gap.gap[0]), float(gap.se[0])
        excess = abs(tilt_gap) - self.z * tilt_se  # how far the gap is shown to be from 0
        return {"passed": excess <= self.tolerance, "tilt_gap": tilt_gap, "tilt_se": tilt_se, "excess": excess,
                "ess": gap.ess, "gap": dict(zip(features.names, gap.gap[1:].tolist(), strict=True)),
                "se": dict(zip(features.names, gap.se[1:].tolist(), strict=True))}


class DPGModule(pl.LightningModule):
    def __init__(self, pi: LSTMPolicy, draws: ProposalDraws, cfg: DPGConfig, *, symbols_per_seq: int,
                 ce_valid_proposal: float, target_ce_valid: float | None = None,
                 valid_log_p: torch.Tensor | None = None, log_z_se: float = 0.0,
                 tilt_check: TiltCheck | None = None):
        super().__init__()
        self.pi, self.draws, self.cfg, self.symbols = pi, draws, cfg, symbols_per_seq
        # `checked`: the policy that the checks measure, the swap gate copies into q and the plateau keeps:
        # pi itself, or (cfg.ema_decay) the moving average of pi's weights, from pi's starting weights on
        self.average = None
        if cfg.ema_decay is not None:
            self.average = AveragedModel(pi, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay)).requires_grad_(False)
            self.average.update_parameters(pi)  # the first update copies: theta_avg = theta_0
        self.checked = pi if self.average is None else self.average.module
        self.gate = None if on_policy(cfg) else SWAP_GATES[cfg.swap_gate]
        self.ce_valid_q = ce_valid_proposal
        self._val_log_pi: list[torch.Tensor] = []
        # log p_lambda(x) = log P(x) - log Z-hat of each sequence of V (in the loader's order) and log Z-hat's
        # standard error: the noise of CE(V, pi) - CE(V, p_lambda), for cfg.stop_within_noise
        self.valid_log_p, self.log_z_se = valid_log_p, log_z_se
        self.stopped_within_noise: dict | None = None
        # cfg.stop_tilt_samples: the stop's tilt test, and the checks where it held the stop back
        self.tilt_check, self.tilt_holds = tilt_check, []
        self.plateau: Plateau | None = None  # fit_checked's plateau rule: the best check so far
        self.swaps: list[dict] = []
        # first check where CE(V, pi) <= target_ce_valid: samples, updates and seconds spent until then
        self.target_ce_valid, self.reached_target = target_ce_valid, None
        self._started = time.perf_counter()

    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.pi.parameters(), lr=self.cfg.lr)
        if not self.cfg.lr_warmup:
            return optimizer
        # lr_k = lr min(1, (k + 1) / warmup): Adam's first steps move every parameter by about lr whatever
        # the gradient's size, which throws a pi that starts close to p (init=r at large |D|) away from it
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / self.cfg.lr_warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def training_step(self, draw: WeightedDraw, batch_idx):
        log_pi = self.pi.log_prob(draw.tokens)
        log_norm = self.draws.running_z.log_z if self.cfg.normalise == "running_z" else 0.0
        if self.cfg.algorithm == "fdpg":
            # on-policy too, pi/q is computed: Lightning fetches the next draw before this update, so a
            # draw of pi is one update old (as for pg)
            loss = fdpg_loss(log_pi, draw, self.cfg.divergence, log_z=log_norm, baseline=self.cfg.baseline)
            name = "dpg/fdpg_loss"  # sum_i c_i log pi(x_i), descent on D_f: not dpg/loss's scale or sign
        else:
            # b = Z-hat in the weights' units: Z-hat unnormalised, 1 once the weights are divided by Z-hat
            baseline = math.exp(self.draws.running_z.log_z - log_norm) if self.cfg.baseline else None
            loss = dpg_loss(log_pi, draw, log_norm=log_norm, reward=self.cfg.algorithm == "pg", baseline=baseline)
            name = "dpg/loss"
        self.log(name, loss.detach(), on_step=True, on_epoch=False, batch_size=len(draw))
        self.log("dpg/ess", self.draws.last_ess, on_step=True, on_epoch=False, batch_size=len(draw))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.average is not None:  # theta_avg <- d theta_avg + (1 - d) theta, after the optimiser's step
            self.average.update_parameters(self.pi)

    def validation_step(self, batch, batch_idx):
        self._val_log_pi.append(self.checked.log_prob(batch).double())

    def gap_to_target(self, log_pi: torch.Tensor) -> tuple[float, float]:
        """CE(V, pi) - CE(V, p_lambda) per symbol = mean_V(log p - log pi) / symbols, and its standard error:
        the paired s.e. over V, sqrt(var(log p - log pi) / |V|), with log Z-hat's s.e. (the same for every
        x, so it adds in quadrature), divided by symbols."""
        diff = self.valid_log_p.to(log_pi) - log_pi
        se_paired = float(diff.std()) / math.sqrt(len(diff)) if len(diff) > 1 else math.inf
        return float(diff.mean()) / self.symbols, math.hypot(se_paired, self.log_z_se) / self.symbols

    def on_validation_epoch_end(self):
        log_pi, self._val_log_pi = torch.cat(self._val_log_pi), []
        ce_pi = -float(log_pi.sum()) / (len(log_pi) * self.symbols)  # CE(V, pi) in nats per symbol
        if self.gate is not None:
            swap = self.gate(self, ce_pi)
            if swap is not None:
                self._swap(ce_pi, swap)
        if self.target_ce_valid is not None and self.reached_target is None and ce_pi <= self.target_ce_valid:
            self.reached_target = {"samples": self.draws.samples_drawn, "updates": int(self.global_step),
                                   "seconds": round(time.perf_counter() - self._started, 3), "ce_valid_pi": ce_pi}
            log.info("[dpg] CE(V, pi) %.4f <= target %.4f after %d samples", ce_pi, self.target_ce_valid,
                     self.draws.samples_drawn)
        if self.valid_log_p is not None:
            gap, gap_se = self.gap_to_target(log_pi)
            self.log("dpg/val_gap", gap)
            self.log("dpg/val_gap_se", gap_se)
            k = self.cfg.stop_within_noise
            # only at a new best check: the pi that the stop measures is the pi that the stage returns
            new_best = self.plateau is None or ce_pi < self.plateau.best
            if k is not None and gap <= k * gap_se and new_best and not self.trainer.sanity_checking:
                tilt = self._tilt_agrees()
                if tilt is None or tilt["passed"]:
                    self.stopped_within_noise = {"samples": self.draws.samples_drawn, "updates": int(self.global_step),
                                                 "gap": gap, "gap_se": gap_se, "ce_valid_pi": ce_pi, "tilt": tilt}
                    log.info("[dpg] CE(V, pi) - CE(V, p_lambda) = %.5f <= %g x its s.e. %.5f: stop", gap, k, gap_se)
                    self.trainer.should_stop = True
        self.log("dpg/val_ce_pi", ce_pi)
        self.log("dpg/draw_size", float(self.draws.last_draw_size))
        if self.gate is not None:
            self.log("dpg/val_ce_q", self.ce_valid_q)
        self.log("dpg/log_z_running", self.draws.running_z.log_z)
        self.log("dpg/draws", float(self.draws.samples_drawn))  # proposals drawn so far: the x-axis of the curves

    def _tilt_agrees(self) -> dict | None:
        """The tilt test on the checked pi (None: not configured); a failed one is kept in tilt_holds."""
        if self.tilt_check is None:
            return None
        check = self.tilt_check
        tilt = check(self.checked)
        self.log("dpg/tilt_gap", tilt["tilt_gap"])
        if not tilt["passed"]:
            self.tilt_holds.append({"epoch": int(self.current_epoch), **tilt})
            log.info("[dpg] CE(V, pi) is within noise of p_lambda, but E_p - E_pi[lambda . phi] = %.3f +- %.3f nats "
                     "is more than %g s.e. + %g from 0: no stop", tilt["tilt_gap"], tilt["tilt_se"], check.z,
                     check.tolerance)
        return tilt

    def _swap(self, ce_pi: float, details: dict) -> None:
        swap = {"step": int(self.global_step), "epoch": int(self.current_epoch), "gate": self.cfg.swap_gate,
                "ce_valid_pi": ce_pi, "ce_valid_q": self.ce_valid_q, "kl_gain": None, "kl_gain_se": None,
                "kl_gate_ess": None, **details}
        self.swaps.append(swap)
        log.info("[dpg] step %d: q <- pi (CE(V, pi) %.4f, CE(V, q) %.4f%s)", swap["step"], ce_pi, self.ce_valid_q,
                 "" if swap["kl_gain"] is None else f", KL gain {swap['kl_gain']:.4f} +- {swap['kl_gain_se']:.4f}")
        if self.swaps[:-1]:  # q is already our frozen copy of pi
            self.draws.proposal.load_state_dict(self.checked.state_dict())
        else:  # q was the proposal we were given (r): from now on a frozen copy of pi
            self.draws.proposal = copy.deepcopy(self.checked).eval().requires_grad_(False)
        self.ce_valid_q = ce_pi
        self.log("dpg/swap", 1.0)


@dataclass
class DPGResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    updates: int
    samples: int
    swaps: list[dict] = field(default_factory=list)
    log_z_running: float | None = None
    reached_target: dict | None = None  # {samples, updates, seconds, ce_valid_pi} at the first check under target
    # {samples, updates, gap, gap_se, ce_valid_pi, tilt}: where the noise stop hit
    stopped_within_noise: dict | None = None
    tilt_holds: list[dict] = field(default_factory=list)  # checks where the tilt test held the noise stop back
    decay_epochs: list[int] = field(default_factory=list)  # checks (0-based) after which the lr was decayed
    extra: dict = field(default_factory=dict)  # a method's own results (the twist methods: twist_*)
    values: Callable | None = None  # the twist methods: tokens -> learned V(s_t) (not a result: not in results())

    def results(self) -> dict:
        return {"ce_valid_pi": self.best_val_ce, "t2_epochs": self.epochs, "t2_best_epoch": self.best_epoch,
                "t2_updates": self.updates, "swaps": self.swaps, "swap_count": len(self.swaps),
                "dpg_log_z_running": self.log_z_running, "dpg_reached_target": self.reached_target,
                "dpg_stopped_within_noise": self.stopped_within_noise, "dpg_tilt_holds": self.tilt_holds,
                "t2_lr_decay_epochs": self.decay_epochs,
                **self.extra}


def proposal_draws(pi: LSTMPolicy, proposal: LSTMPolicy, target: Potential, cfg: DPGConfig, *, max_len: int,
                   seed: int, keep_per_draw: int | None = None) -> ProposalDraws:
    """A Training-2 stage's draws: of pi itself (on-policy methods) or of `proposal`, weighted for
    `target`; keep_per_draw overrides cfg.keep_per_draw."""
    return ProposalDraws(pi if on_policy(cfg) else proposal.eval(), target,
                         minibatch=cfg.minibatch, proposal_batch=cfg.proposal_batch,
                         keep_per_draw=keep_per_draw or cfg.keep_per_draw, replay=cfg.replay,
                         steps_per_draw=cfg.steps_per_draw, updates_per_epoch=cfg.updates_per_epoch, max_len=max_len,
                         generator=torch.Generator(device=pi.device).manual_seed(seed), ess_per_draw=cfg.ess_per_draw,
                         min_proposal_batch=cfg.min_proposal_batch,
                         shrink_at_ess_fraction=cfg.shrink_at_ess_fraction)


def fit_checked(module: DPGModule, valid: torch.Tensor, *, callbacks: list | None, logger, accelerator: str,
                extra_keys: tuple[str, ...] = (), steps_per_check: int | None = None, keep: str = "checked",
                clip: float | None = None, start_ce: float | None = None) -> DPGResult:
    """Fit a DPG-family module: a check of CE(V, pi) every cfg.updates_per_epoch draws, the plateau rule
    keeping the best check's `module.<keep>` (`checked`: pi or its average; or pi with its critic),
    progress in optimiser steps (steps_per_check per check, at most), Lightning's grad-norm clip at `clip`.
    start_ce: CE(V) of the starting weights, which are then check 0 (best_epoch -1): kept unless a check
    is better."""
    cfg, draws = module.cfg, module.draws
    # a CE(V, pi) that is not finite (pg's collapse) is a check without progress, not a reason to stop
    plateau = Plateau(cfg.patience, cfg.lr_decays, cfg.lr_decay_factor, stop_on_nonfinite=False)
    keep_best = KeepBestPlateau("dpg/val_ce_pi", keep, plateau)
    module.plateau = plateau
    if start_ce is not None:
        keep_best.start_from(module, start_ce)
    keys = ["dpg/val_ce_pi", *extra_keys] + (["dpg/val_ce_q"] if module.gate is not None else [])
    # extra callbacks (e.g. exact.ExactCurve) first: they see the weights just checked, before a restore
    callbacks = list(callbacks or []) + [keep_best,
                 StageProgress(cfg.algorithm, keys, plateau, steps_per_check or cfg.updates_per_epoch, cfg.max_epochs,
                               unit="updates", monitor="dpg/val_ce_pi")]
    trainer = make_trainer(cfg.max_epochs, callbacks, logger, accelerator, gradient_clip_val=clip)
    trainer.fit(module, torch.utils.data.DataLoader(draws, batch_size=None), token_loader(valid, 1000, shuffle=False))
    if module.checked is not module.pi:  # the kept average is the stage's pi
        module.pi.load_state_dict(module.checked.state_dict())
    module.pi.eval()
    return DPGResult(plateau.best, trainer.current_epoch, plateau.best_epoch, int(trainer.global_step),
                     draws.samples_drawn, module.swaps, draws.running_z.log_z if draws.running_z.count else None,
                     module.reached_target, module.stopped_within_noise, module.tilt_holds, plateau.decay_epochs)


def train_dpg(pi: LSTMPolicy, proposal: LSTMPolicy, target: Potential, valid: torch.Tensor, cfg: DPGConfig, *,
              max_len: int, symbols_per_seq: int, ce_valid_proposal: float, seed: int = 0,
              target_ce_valid: float | None = None, valid_log_p: torch.Tensor | None = None, log_z_se: float = 0.0,
              logger=None, accelerator: str = "cpu", callbacks: list | None = None) -> DPGResult:
    """Train `pi` in place towards p = P / Z from draws of `proposal` (dpg_off) or of pi itself
    (dpg_on, pg); on return pi holds the best-CE(V) weights. valid_log_p: log p_lambda of every
    sequence of `valid` (with log_z_se, log Z-hat's s.e.), for the gap to p_lambda and cfg.stop_within_noise
    (and cfg.stop_tilt_samples: then `target` is a GAM, whose exp(lambda . phi) factor the test reads)."""
    draws = proposal_draws(pi, proposal, target, cfg, max_len=max_len, seed=seed)
    tilt_check = None
    if cfg.stop_within_noise is not None and cfg.stop_tilt_samples is not None and valid_log_p is not None:
        tilt = tilt_of(target)
        if tilt is None:
            raise ValueError(f"method.stop_tilt_samples={cfg.stop_tilt_samples}: the tilt test needs a GAM "
                             "target r exp(lambda . phi), and this target has no exp(lambda . phi) factor")
        tilt_check = TiltCheck(target, tilt, samples=cfg.stop_tilt_samples, z=cfg.stop_tilt_z,
                               tolerance=cfg.stop_tilt_tolerance, max_len=max_len, seed=seed + 1, device=pi.device)
    module = DPGModule(pi, draws, cfg, symbols_per_seq=symbols_per_seq, ce_valid_proposal=ce_valid_proposal,
                       target_ce_valid=target_ce_valid, valid_log_p=valid_log_p, log_z_se=log_z_se,
                       tilt_check=tilt_check)
    # keep_start: pi = r so far, and CE(V, r) is the proposal's CE(V), already measured
    start_ce = ce_valid_proposal if cfg.keep_start else None
    return fit_checked(module, valid, callbacks=callbacks, logger=logger, accelerator=accelerator, clip=cfg.clip,
                       start_ce=start_ce)
