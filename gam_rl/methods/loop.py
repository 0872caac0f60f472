"""The Training-2 loop shared by the DPG family and the twist learners, written once.

Every method of the family trains pi_theta towards p = P / Z from weighted draws (methods/draws.py)
and differs only in its update: the loop draws x ~ q (or x ~ pi itself: on-policy), hands the draw
to the method's `loss` (or, for methods that step by hand, `training_step`), and every
`updates_per_epoch` updates runs a check:

    CE(V, pi)      measured on V, the plateau rule's value (stages/common.py): the best check is kept
    swap gate      off-policy: q <- pi when pi is the better proposal (ce_valid: the paper; kl_is)
    target line    the first check where CE(V, pi) <= (1 + target_margin) CE(V, p_lambda) is recorded
    noise stop     optional: stop once CE(V, pi) - CE(V, p_lambda) is within noise (and the tilt test)

A method is a LoopModule subclass (its update) and a LoopConfig subclass (its own keys) in its own
file, registered in methods/registry.py; `fit_loop` runs it and returns the common Training2Result.
Draws are taken inside the training step, from the policy as it is at that update: an on-policy
draw is never one update stale, and no hook rewrites a dataloader's state (the loader only counts
the updates of a check).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from gam_rl.config_fields import MISSING, setting
from gam_rl.estimators import effective_sample_size, snis_moment_gap
from gam_rl.exact import ExactCurve
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import ProposalDraws, WeightedDraw
from gam_rl.planting import MotifPlanting
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import Potential, Tilt, tilt_of
from gam_rl.stages.common import KeepBestPlateau, Plateau, StageProgress, make_trainer, token_loader

log = logging.getLogger("gam_rl")

TARGETS = ("gam", "true")  # gam: P = P_lambda | true: P = the true process (paper Supp. A.3)
INITS = ("fresh", "r")  # fresh: a new LSTM (the paper) | r: pi starts as a copy of r
NORMALISE = ("none", "running_z")  # none: Z taken as 1 (the paper) | running_z: w / running Z-hat
KL_GATE_MIN_ESS = 30.0  # swap_gate=kl_is: fewer effective samples than this never swap


def ce_valid_gate(module: LoopModule, ce_pi: float) -> dict | None:
    """The paper's gate: q <- pi when CE(V, pi) < CE(V, q) (only ever to a better policy)."""
    return {} if ce_pi < module.ce_valid_q else None


def kl_is_gate(module: LoopModule, ce_pi: float) -> dict | None:
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
class MethodConfig:
    """The keys of every Training-2 method's `method` section."""

    name: str = setting(MISSING)  # names the run folder, results.json's `method` and the report's row
    algorithm: str = setting(MISSING)  # the registered method (methods/registry.py)
    init: str = setting("fresh", choices=INITS)  # fresh: a new LSTM (the paper) | r: pi starts as a copy of r
    target_margin: float = setting(0.01, gt=0)  # results record when CE(V, pi) first reaches (1 + margin) CE(V, p)

    def problems(self) -> list[str]:
        """Values that are fine alone but not together (none here)."""
        return []


@dataclass
class LoopConfig(MethodConfig):
    """The loop's keys, shared by every method built on it: draws, checks, the swap gate, the
    plateau rule and the stops (docs/methods.md). A method's config adds its own keys only."""

    target: str = setting("gam", choices=TARGETS)
    lr: float = setting(0.01, gt=0)  # Adam
    minibatch: int = setting(500, ge=1)  # items backpropagated per update
    proposal_batch: int | None = setting(None, ge=1)  # samples per fresh draw; None: = minibatch (the paper)
    keep_per_draw: int | None = setting(None, ge=1)  # items kept by unbiased thinning; None: = minibatch
    replay: int = setting(0, ge=0)  # > 0: train on a buffer of the last `replay` items (0: the paper)
    steps_per_draw: int = setting(1, ge=1)  # with replay: updates per fresh draw
    swap_gate: str = setting("ce_valid", choices=SWAP_GATES)  # off-policy: ce_valid (the paper) | kl_is
    updates_per_epoch: int = setting(4000, ge=1)  # one check (CE(V), swap gate, plateau) per "epoch"
    max_epochs: int = setting(100, ge=1)
    patience: int = setting(10, ge=1)  # on CE(V, pi)
    clip: float | None = setting(0.25, gt=0)  # grad-norm clip; None: none
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
    # init=r: pi's starting weights (their CE(V) is CE(V, r)) are the plateau's first best, so the patience
    # counts from the start; false: from check 1. (The pipeline returns the start whenever no check beats it.)
    keep_start: bool = False
    lr_warmup: int = setting(0, ge=0)  # updates over which the lr rises linearly to `lr`; 0: none (the paper)
    # > 0: after `patience` checks without a better CE(V, pi), restart from the best weights (or r, with
    # keep_start) at lr x lr_decay_factor, at most lr_decays times, then stop (0: stop at once, the paper)
    lr_decays: int = setting(0, ge=0)
    lr_decay_factor: float = setting(0.5, gt=0, lt=1)
    # the caps of a tuning trial (conf/hparams_search/): stop at the first check at or past this many draws
    # (None: no cap), and stop at the first check on the target line (false: the selection runs on)
    max_draws: float | None = setting(None, gt=0)
    stop_at_target: bool = False
    # > 0: a share of every fresh draw comes from r with the motif's bits planted at a random start (planting.py):
    # q = s q_plant + (1 - s) q, q the loop's own proposal; 0: q alone (the paper). Off-policy, whole-string q only
    plant_motif: float = setting(0.0, ge=0, lt=1)

    def samples_pi(self) -> bool:
        """Whether the draws come from pi itself rather than from q (a method's config says)."""
        return False

    def reads_symbol_log_q(self) -> bool:
        """Whether the update reads the proposal's per-symbol log q(x_t | x_<t) (a method's config says)."""
        return False

    def drawn(self) -> int:
        """Samples per fresh draw."""
        return max(self.proposal_batch or self.minibatch, self.minibatch)

    def kept(self) -> int:
        """Items a fresh draw keeps (thinning below `drawn`)."""
        return self.keep_per_draw or self.minibatch

    def thins(self) -> bool:
        """Whether a draw keeps fewer items than it samples."""
        return self.kept() < self.drawn()

    def problems(self) -> list[str]:
        """Values that are fine alone but not together."""
        kept, drawn = self.kept(), self.proposal_batch or self.minibatch
        out = super().problems()
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
        if self.plant_motif and self.samples_pi():
            out.append(f"method.plant_motif={self.plant_motif}: this method draws from pi itself (on-policy), so there "
                       "is no proposal to mix the planted draws into; set method.plant_motif=0")
        if self.plant_motif and self.reads_symbol_log_q():
            out.append(f"method.plant_motif={self.plant_motif}: {self.algorithm} reads the proposal's per-symbol "
                       "log q(x_t | x_<t), which the planted mixture has only for whole strings; set "
                       "method.plant_motif=0")
        if self.lr_decays and self.lr_warmup:
            out.append(f"method.lr_decays={self.lr_decays} with method.lr_warmup={self.lr_warmup}: the warm-up's "
                       "schedule sets the lr at every update and would undo a decay; set one of them to 0")
        if self.keep_start and self.init != "r":
            out.append(f"method.keep_start=true with method.init={self.init!r}: only a pi that starts as r has a known "
                       "CE(V) to keep; set method.init=r or method.keep_start=false")
        return out


@dataclass
class AveragedLoopConfig(LoopConfig):
    """LoopConfig with iterate averaging, for the methods whose kept state is pi alone (dpg, pg, f-DPG)."""

    # average the iterates: the pi that is checked, swapped into q, kept and returned is the exponential
    # moving average of the trained weights, theta_avg <- d theta_avg + (1 - d) theta after every update,
    # starting from pi's initial weights; None: the trained weights themselves (the paper)
    ema_decay: float | None = setting(None, gt=0, lt=1)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.ema_decay is not None and self.lr_decays:
            out.append(f"method.ema_decay={self.ema_decay} with method.lr_decays={self.lr_decays}: a restart would "
                       "put back the averaged weights, not the trained ones; set one of them off")
        return out


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



class LoopModule(pl.LightningModule):
    """The loop of one method: its draws, the checked policy, the swap gate and the stops. A method
    subclasses it and writes its update: `loss(draw)` (one optimiser step per update, automatic
    optimisation), or `training_step` with `automatic_optimization = False` when it steps by hand."""

    loss_name = "dpg/loss"  # the logged name of `loss`

    def __init__(self, pi: LSTMPolicy, draws: ProposalDraws, cfg: LoopConfig, inputs: Training2Inputs,
                 target: Potential, *, target_ce_valid: float | None, valid_log_p: torch.Tensor | None,
                 tilt_check: TiltCheck | None = None):
        super().__init__()
        self.pi, self.draws, self.cfg, self.symbols = pi, draws, cfg, inputs.symbols
        self.target = target
        # `checked`: the policy that the checks measure, the swap gate copies into q and the plateau keeps:
        # pi itself, or (cfg.ema_decay) the moving average of pi's weights, from pi's starting weights on
        self.average = None
        ema_decay = getattr(cfg, "ema_decay", None)
        if ema_decay is not None:
            self.average = AveragedModel(pi, multi_avg_fn=get_ema_multi_avg_fn(ema_decay)).requires_grad_(False)
            self.average.update_parameters(pi)  # the first update copies: theta_avg = theta_0
        self.checked = pi if self.average is None else self.average.module
        self.gate = None if cfg.samples_pi() else SWAP_GATES[cfg.swap_gate]
        self.ce_valid_q = inputs.ce_valid_r  # the first proposal is r
        self._val_log_pi: list[torch.Tensor] = []
        # log p_lambda(x) = log P(x) - log Z-hat of each sequence of V (in the loader's order) and log Z-hat's
        # standard error: the noise of CE(V, pi) - CE(V, p_lambda), for cfg.stop_within_noise
        self.valid_log_p, self.log_z_se = valid_log_p, inputs.log_z_se
        self.stopped_within_noise: dict | None = None
        self.stopped_by: str | None = None  # a tuning trial's cap that stopped the loop: target | max_draws
        # cfg.stop_tilt_samples: the stop's tilt test, and the checks where it held the stop back
        self.tilt_check, self.tilt_holds = tilt_check, []
        self.plateau: Plateau | None = None  # fit_loop's plateau rule: the best check so far
        self.swaps: list[dict] = []
        self.curve: list[dict] = []  # one entry per check: draws and CE(V, pi)
        # first check where CE(V, pi) <= target_ce_valid: samples, updates and seconds spent until then
        self.target_ce_valid, self.reached_target = target_ce_valid, None
        self._started = time.perf_counter()

    # ---- the update --------------------------------------------------------------------------
    def configure_optimizers(self):
        optimizer = torch.optim.Adam(self.optimised_groups())
        if not self.cfg.lr_warmup:
            return optimizer
        # lr_k = lr min(1, (k + 1) / warmup): Adam's first steps move every parameter by about lr whatever
        # the gradient's size, which throws a pi that starts close to p (init=r at large |D|) away from it
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: min(1.0, (k + 1) / self.cfg.lr_warmup))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": warmup, "interval": "step"}}

    def optimised_groups(self) -> list[dict]:
        """Adam's parameter groups: pi at cfg.lr (a method with more trained parts adds its own)."""
        return [{"params": list(self.pi.parameters()), "lr": self.cfg.lr}]

    def log_norm(self) -> float:
        """log Z-hat when the method divides its weights by the running Z-hat (cfg.normalise), else 0."""
        return self.draws.running_z.log_z if getattr(self.cfg, "normalise", "none") == "running_z" else 0.0

    def loss(self, draw: WeightedDraw) -> torch.Tensor:
        """The method's update on one draw, as a loss for autograd (automatic optimisation)."""
        raise NotImplementedError

    def weight_log_prob(self, tokens: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
        """log pi(x) for an update's coefficients (no gradient): pi without dropout. The gradient flows through
        the training pass's log_pi; a dropout pass inside a coefficient (pi/q, f'(pi/p), pg's reward) would
        make the update the gradient of an average over dropout masks, not of the divergence of pi itself."""
        if self.pi.dropout_p == 0:
            return log_pi.detach()
        with eval_mode(self.pi):
            return self.pi.log_prob(tokens)

    def capped(self) -> bool:
        """method.max_draws drawn: the rest of the check's updates do nothing (training_step returns None), so
        the check, and the stop (check_caps), come at most one draw past the cap."""
        return self.cfg.max_draws is not None and self.draws.samples_drawn >= self.cfg.max_draws

    def training_step(self, batch, batch_idx):
        if self.capped():
            return None
        draw = self.draws.next_batch()  # of q, or of pi as it is now (on-policy)
        loss = self.loss(draw)
        self.log(self.loss_name, loss.detach(), on_step=True, on_epoch=False, batch_size=len(draw))
        self.log("dpg/ess", self.draws.last_ess, on_step=True, on_epoch=False, batch_size=len(draw))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        if self.average is not None:  # theta_avg <- d theta_avg + (1 - d) theta, after the optimiser's step
            self.average.update_parameters(self.pi)

    # ---- the checks --------------------------------------------------------------------------
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
        self.curve.append({"draws": self.draws.samples_drawn, "updates": int(self.global_step), "ce_valid_pi": ce_pi})
        self.check_swap(ce_pi)
        self.check_target_line(ce_pi)
        self.check_caps()
        if self.valid_log_p is not None:
            self.check_noise_stop(ce_pi, log_pi)
        self.log("dpg/val_ce_pi", ce_pi)
        self.log("dpg/draw_size", float(self.draws.last_draw_size))
        if self.gate is not None:
            self.log("dpg/val_ce_q", self.ce_valid_q)
        self.log("dpg/log_z_running", self.draws.running_z.log_z)
        self.log("dpg/draws", float(self.draws.samples_drawn))  # proposals drawn so far: the x-axis of the curves

    def check_swap(self, ce_pi: float) -> None:
        """Off-policy: q <- pi when the swap gate says pi is the better proposal."""
        if self.gate is None:
            return
        swap = self.gate(self, ce_pi)
        if swap is not None:
            self._swap(ce_pi, swap)

    def check_target_line(self, ce_pi: float) -> None:
        """Record the first check where CE(V, pi) <= the target line."""
        if self.target_ce_valid is None or self.reached_target is not None or ce_pi > self.target_ce_valid:
            return
        self.reached_target = {"samples": self.draws.samples_drawn, "updates": int(self.global_step),
                               "seconds": round(time.perf_counter() - self._started, 3), "ce_valid_pi": ce_pi}
        log.info("[%s] CE(V, pi) %.4f <= target %.4f after %d samples", self.cfg.algorithm, ce_pi,
                 self.target_ce_valid, self.draws.samples_drawn)

    def check_caps(self) -> None:
        """A tuning trial's stops: on the target line (cfg.stop_at_target), or once cfg.max_draws are drawn."""
        if self.stopped_by is not None:
            return
        if self.cfg.stop_at_target and self.reached_target is not None:
            self.stopped_by = "target"
        elif self.capped():
            self.stopped_by = "max_draws"
        if self.stopped_by is not None:
            log.info("[%s] stop: %s after %d samples", self.cfg.algorithm,
                     "the target line is reached" if self.stopped_by == "target" else
                     f"method.max_draws={self.cfg.max_draws:g} drawn", self.draws.samples_drawn)
            self.trainer.should_stop = True

    def check_noise_stop(self, ce_pi: float, log_pi: torch.Tensor) -> None:
        """Log the gap to p_lambda; with cfg.stop_within_noise, stop at a new best check within noise of it."""
        gap, gap_se = self.gap_to_target(log_pi)
        self.log("dpg/val_gap", gap)
        self.log("dpg/val_gap_se", gap_se)
        k = self.cfg.stop_within_noise
        # only at a new best check: the pi that the stop measures is the pi that the stage returns
        new_best = self.plateau is None or ce_pi < self.plateau.best
        if k is None or gap > k * gap_se or not new_best or self.trainer.sanity_checking:
            return
        tilt = self._tilt_agrees()
        if tilt is None or tilt["passed"]:
            self.stopped_within_noise = {"samples": self.draws.samples_drawn, "updates": int(self.global_step),
                                         "gap": gap, "gap_se": gap_se, "ce_valid_pi": ce_pi, "tilt": tilt}
            log.info("[%s] CE(V, pi) - CE(V, p_lambda) = %.5f <= %g x its s.e. %.5f: stop", self.cfg.algorithm, gap,
                     k, gap_se)
            self.trainer.should_stop = True

    def _tilt_agrees(self) -> dict | None:
        """The tilt test on the checked pi (None: not configured); a failed one is kept in tilt_holds."""
        if self.tilt_check is None:
            return None
        check = self.tilt_check
        tilt = check(self.checked)
        self.log("dpg/tilt_gap", tilt["tilt_gap"])
        if not tilt["passed"]:
            self.tilt_holds.append({"epoch": int(self.current_epoch), **tilt})
            log.info("[%s] CE(V, pi) is within noise of p_lambda, but E_p - E_pi[lambda . phi] = %.3f +- %.3f nats "
                     "is more than %g s.e. + %g from 0: no stop", self.cfg.algorithm, tilt["tilt_gap"],
                     tilt["tilt_se"], check.z, check.tolerance)
        return tilt

    def _swap(self, ce_pi: float, details: dict) -> None:
        swap = {"step": int(self.global_step), "epoch": int(self.current_epoch), "gate": self.cfg.swap_gate,
                "ce_valid_pi": ce_pi, "ce_valid_q": self.ce_valid_q, "kl_gain": None, "kl_gain_se": None,
                "kl_gate_ess": None, **details}
        self.swaps.append(swap)
        log.info("[%s] step %d: q <- pi (CE(V, pi) %.4f, CE(V, q) %.4f%s)", self.cfg.algorithm, swap["step"], ce_pi,
                 self.ce_valid_q,
                 "" if swap["kl_gain"] is None else f", KL gain {swap['kl_gain']:.4f} +- {swap['kl_gain_se']:.4f}")
        if self.swaps[:-1]:  # q is already our frozen copy of pi
            self.draws.proposal.load_state_dict(self.checked.state_dict())
        else:  # q was the proposal we were given (r): from now on a frozen copy of pi
            self.draws.proposal = copy.deepcopy(self.checked).eval().requires_grad_(False)
        self.ce_valid_q = ce_pi
        self.log("dpg/swap", 1.0)

    def results(self) -> dict:
        """The method's own results.json keys beyond the loop's (a subclass adds to them)."""
        return {}


def proposal_draws(cfg: LoopConfig, inputs: Training2Inputs, target: Potential) -> ProposalDraws:
    """A method's draws: of pi itself (on-policy) or of r, then of pi's copies at swaps, weighted for
    `target`, each fresh draw thinned to cfg.kept() items."""
    planting = None
    if cfg.plant_motif:
        if inputs.motif is None:
            raise ValueError(f"method.plant_motif={cfg.plant_motif}: this run's inputs carry no motif to plant")
        planting = MotifPlanting(inputs.r.eval(), inputs.motif, inputs.symbols - 1)
    return ProposalDraws(inputs.pi if cfg.samples_pi() else inputs.r.eval(), target,
                         minibatch=cfg.minibatch, proposal_batch=cfg.proposal_batch,
                         keep_per_draw=cfg.kept(), replay=cfg.replay,
                         steps_per_draw=cfg.steps_per_draw, max_len=inputs.max_len,
                         generator=torch.Generator(device=inputs.pi.device).manual_seed(inputs.seed),
                         ess_per_draw=cfg.ess_per_draw, min_proposal_batch=cfg.min_proposal_batch,
                         shrink_at_ess_fraction=cfg.shrink_at_ess_fraction, planting=planting,
                         plant_share=cfg.plant_motif)


def loop_parts(cfg: LoopConfig, inputs: Training2Inputs) -> dict:
    """What LoopModule takes besides pi, the draws, cfg and inputs: the target potential, the target line,
    log p_lambda on V (for the gap and the noise stop) and the stop's tilt test."""
    target = inputs.potential(cfg.target)
    on_gam = cfg.target == "gam"
    valid_log_p = inputs.valid_log_p() if on_gam else None
    tilt_check = None
    if cfg.stop_within_noise is not None and cfg.stop_tilt_samples is not None and valid_log_p is not None:
        tilt = tilt_of(target)
        if tilt is None:
            raise ValueError(f"method.stop_tilt_samples={cfg.stop_tilt_samples}: the tilt test needs a GAM "
                             "target r exp(lambda . phi), and this target has no exp(lambda . phi) factor")
        tilt_check = TiltCheck(target, tilt, samples=cfg.stop_tilt_samples, z=cfg.stop_tilt_z,
                               tolerance=cfg.stop_tilt_tolerance, max_len=inputs.max_len, seed=inputs.seed + 1,
                               device=inputs.pi.device)
    return {"target": target, "target_ce_valid": inputs.target_ce_valid(cfg.target_margin) if on_gam else None,
            "valid_log_p": valid_log_p, "tilt_check": tilt_check}


def loop_module(cls: type, cfg: LoopConfig, inputs: Training2Inputs, **extra) -> LoopModule:
    """A method's module on the loop: `cls` (its LoopModule subclass) with its draws and the loop's parts (the
    target potential, the target line, log p_lambda on V, the stop's tilt test); `extra`: the method's own."""
    parts = loop_parts(cfg, inputs)
    return cls(inputs.pi, proposal_draws(cfg, inputs, parts["target"]), cfg, inputs, **parts, **extra)


def fit_loop(module: LoopModule, inputs: Training2Inputs, *, extra_keys: tuple[str, ...] = (),
             steps_per_check: int | None = None, keep: str = "checked", clip: float | None = None,
             learned_log_z=None, exact_extras=None) -> Training2Result:
    """Fit a loop module: a check of CE(V, pi) every cfg.updates_per_epoch updates, the plateau rule
    keeping the best check's `module.<keep>` (`checked`: pi or its average; or pi with what else the
    method trains), progress in optimiser steps (steps_per_check per check, at most), Lightning's
    grad-norm clip at `clip`. cfg.keep_start (pi starts as r): the starting weights, with CE(V, r),
    are the plateau's first best (the patience counts from them). learned_log_z, exact_extras:
    callables of the module after the fit, for the result."""
    cfg, draws = module.cfg, module.draws
    started = time.perf_counter()
    # a CE(V, pi) that is not finite (pg's collapse) is a check without progress, not a reason to stop
    plateau = Plateau(cfg.patience, cfg.lr_decays, cfg.lr_decay_factor, stop_on_nonfinite=False)
    keep_best = KeepBestPlateau("dpg/val_ce_pi", keep, plateau)
    module.plateau = plateau
    if cfg.keep_start:  # pi = r so far, and CE(V, r) is already measured
        keep_best.start_from(module, inputs.ce_valid_r)
    keys = ["dpg/val_ce_pi", *extra_keys] + (["dpg/val_ce_q"] if module.gate is not None else [])
    exact = [] if inputs.exact is None else [ExactCurve(inputs.exact, "dpg", attr="checked",
                                                        with_true=cfg.target == "true")]
    # extra callbacks (e.g. exact.ExactCurve) first: they see the weights just checked, before a restore
    callbacks = [*exact, *inputs.callbacks, keep_best,
                 StageProgress(cfg.algorithm, keys, plateau, steps_per_check or cfg.updates_per_epoch, cfg.max_epochs,
                               unit="updates", monitor="dpg/val_ce_pi")]
    trainer = make_trainer(cfg.max_epochs, callbacks, inputs.logger, inputs.accelerator, gradient_clip_val=clip)
    # the training loader only counts a check's updates (the module draws); V in its order (valid_log_p's)
    updates = torch.utils.data.DataLoader(range(cfg.updates_per_epoch), batch_size=None)
    trainer.fit(module, updates, token_loader(inputs.valid, 1000, shuffle=False))
    if module.checked is not module.pi:  # the kept average is the stage's pi
        module.pi.load_state_dict(module.checked.state_dict())
    module.pi.eval()
    # checks count from 1 (0: the start, kept), as in the log; the plateau counts from 0 (-1: the start)
    results = {"target": cfg.target, "t2_epochs": trainer.current_epoch, "t2_best_epoch": plateau.best_epoch + 1,
               "t2_updates": int(trainer.global_step), "swaps": module.swaps, "swap_count": len(module.swaps),
               "dpg_log_z_running": draws.running_z.log_z if draws.running_z.count else None,
               "dpg_stopped_within_noise": module.stopped_within_noise, "t2_stopped_by": module.stopped_by,
               "dpg_tilt_holds": module.tilt_holds,
               "t2_lr_decay_epochs": [e + 1 for e in plateau.decay_epochs], **module.results()}
    return Training2Result(pi=module.pi, draws=draws.samples_drawn, seconds=round(time.perf_counter() - started, 3),
                           ce_valid_pi=plateau.best, target_ce_valid=module.target_ce_valid,
                           reached_target=module.reached_target, curve=module.curve,
                           results=results, exact_extras=exact_extras,
                           learned_log_z=None if learned_log_z is None else learned_log_z())
