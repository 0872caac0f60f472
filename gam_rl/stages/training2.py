"""Training-2: turn a potential P into an autoregressive policy pi_theta ~ p = P / Z.

DPG family, one step each (x ~ sampler, weights without gradient):
  dpg_off  x ~ q:  theta += alpha (P(x)/q(x)) grad log pi(x)   (paper Algorithm 1; q starts
           as r and becomes a copy of pi only when CE(V, pi) < CE(V, q) at a check)
  dpg_on   x ~ pi: theta += alpha (P(x)/pi(x)) grad log pi(x)  (q = pi at every step)
  pg       x ~ pi: theta += alpha P(x) grad log pi(x)          (REINFORCE with reward P:
           RL as optimisation, which maximises E_pi[P] and collapses onto its mode)
Z is taken as 1 as in the paper (scaling P only rescales the step); `log_z` divides it out
when a value is known.

`proposal_batch` > `minibatch` draws more sequences than are backpropagated: the N-sample
weighted sum is thinned without bias to about `minibatch` items (estimators.thin_by_weight),
so the rare heavy samples are all kept while the backward pass stays minibatch-sized. With
proposal_batch = minibatch (the paper) nothing is thinned. While q is still r and P is the
GAM, P(x)/q(x) = exp(lambda . phi(x)) and r is not re-scored.

`replay` > 0 keeps the last `replay` weighted (thinned) samples in a buffer and takes each
update on a random minibatch of it, drawing a fresh proposal batch every `steps_per_draw`
updates. Every buffered x was drawn from some proposal q_k and carries w = P(x)/q_k(x), so
sum w grad log pi_theta(x) stays an unbiased DPG gradient at any theta: the expensive heavy
samples are reused instead of seen once. Off (0) by default and in the paper profile.

A check ("epoch") every `updates_per_epoch` updates measures CE(V, pi), decides the swap,
and feeds early stopping; the best pi is kept.

Distillation: exact samples of p_lambda by rejection sampling from r, plus D, into a fresh
policy by maximum likelihood (see gam_rl.stages.mle).
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from gam_rl.config import KL_GATE_MIN_ESS, NORMALISE, SWAP_GATES, dpg_size_problems
from gam_rl.estimators import effective_sample_size, rejection_log_bound, rejection_sample, thin_by_weight
from gam_rl.metrics import eval_mode
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import GAMPotential, Potential
from gam_rl.stages.common import KeepBest, ProgressLog, full_batch_loader, make_trainer
from gam_rl.stages.mle import train_mle
from gam_rl.tokens import pad_cat

log = logging.getLogger("gam_rl")

DPG_ALGORITHMS = ("dpg_off", "dpg_on", "pg")


@dataclass(frozen=True)
class DPGOptions:
    """One DPG schedule. The defaults are the paper's; every other value is a named option."""

    algorithm: str = "dpg_off"
    lr: float = 0.01
    minibatch: int = 500  # sequences backpropagated per update
    updates_per_epoch: int = 4000  # one swap / early-stopping check per "epoch"
    max_epochs: int = 100
    patience: int = 10
    clip: float | None = 0.25
    max_len: int = 100
    proposal_batch: int | None = None  # sequences drawn per fresh draw; None: = minibatch
    keep_per_draw: int | None = None  # items kept by unbiased thinning per draw; None: = minibatch
    replay: int = 0  # > 0: train on a buffer of the last `replay` weighted items
    steps_per_draw: int = 1  # with replay: updates per fresh draw
    normalise: str = "none"  # none: Z taken as 1 (paper) | running_z: w / Z-hat of every draw so far
    baseline: bool = False  # subtract Z pi(x)/q(x) from the weight (zero-mean control variate)
    swap_gate: str = "ce_valid"  # ce_valid: CE(V, pi) < CE(V, q) (paper) | kl_is: IS estimate on a draw

    def __post_init__(self):
        for name, value, allowed in (("algorithm", self.algorithm, DPG_ALGORITHMS),
                                     ("normalise", self.normalise, NORMALISE),
                                     ("swap_gate", self.swap_gate, SWAP_GATES)):
            if value not in allowed:
                raise ValueError(f"dpg.{name}={value!r}: choose one of {list(allowed)}")
        problems = dpg_size_problems(minibatch=self.minibatch, keep_per_draw=self.keep_per_draw,
                                     proposal_batch=self.proposal_batch, replay=self.replay, swap_gate=self.swap_gate)
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class WeightedDraw:
    """Thinned proposal samples with what every later update needs to re-weight them.

    coefficient of item i in the N-sample estimate: exp(log_w + log_ht), where
    log_w = log P(x) - log Z - log q(x) (pg: log P(x) - log Z) and
    log_ht = -log(keep probability) - log N (Horvitz-Thompson factor of the thinning)."""

    tokens: torch.Tensor
    log_w: torch.Tensor  # float64
    log_q: torch.Tensor  # float64, log q(x) of the proposal that drew x
    log_ht: torch.Tensor  # float64
    version: torch.Tensor  # long, which proposal drew x (increments at every swap)
    share: torch.Tensor  # float64, 1 / (items its draw contributed): summed over a buffer, the number of draws in it

    FIELDS = ("log_w", "log_q", "log_ht", "version", "share")  # per-item tensors besides tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, idx: torch.Tensor) -> WeightedDraw:
        return WeightedDraw(self.tokens[idx], *(getattr(self, k)[idx] for k in self.FIELDS))

    @staticmethod
    def cat(draws: list[WeightedDraw]) -> WeightedDraw:
        return WeightedDraw(pad_cat([d.tokens for d in draws]),
                            *(torch.cat([getattr(d, k) for d in draws]) for k in WeightedDraw.FIELDS))

    def tail(self, size: int) -> WeightedDraw:
        return self.index(torch.arange(max(0, len(self) - size), len(self), device=self.log_w.device))


class DPGModule(pl.LightningModule):
    def __init__(self, pi: LSTMPolicy, proposal: LSTMPolicy, potential: Potential, options: DPGOptions, *,
                 symbols_per_seq: int, ce_valid_proposal: float, log_z: float = 0.0, seed: int = 0,
                 target_ce_valid: float | None = None):
        super().__init__()
        o = self.options = options
        self.pi, self.algorithm, self.potential = pi, o.algorithm, potential
        # q is a frozen copy, never trained; kept out of the optimiser and of the best-pi snapshot
        self.q = copy.deepcopy(proposal).eval().requires_grad_(False) if o.algorithm == "dpg_off" else None
        self.symbols, self.log_z = symbols_per_seq, log_z
        self.proposal_batch = max(o.proposal_batch or o.minibatch, o.minibatch)
        self.keep_per_draw = o.keep_per_draw or o.minibatch
        self.steps_per_draw = max(1, o.steps_per_draw)
        if (o.baseline and o.algorithm != "pg" and self.keep_per_draw < self.proposal_batch
                and not isinstance(potential, GAMPotential)):
            # thinning keeps zero-weight items with probability 0, but the baseline term b pi/q is
            # nonzero on them: only a potential that is positive everywhere (the GAM) is safe
            raise ValueError("dpg.baseline=true with thinning needs a potential that is positive everywhere "
                             f"(the GAM), not {type(potential).__name__}: set dpg.keep_per_draw >= "
                             "dpg.proposal_batch or dpg.baseline=false")
        self._buffer: WeightedDraw | None = None  # replay buffer
        self._pending: WeightedDraw | None = None  # a draw scored by the swap gate, not yet trained on
        # P_lambda / r = exp(lambda . phi): valid while q is the untouched base model of the GAM
        self.q_is_base = o.algorithm == "dpg_off" and isinstance(potential, GAMPotential) and potential.r is proposal
        self.q_version = 0
        self.ce_valid_q = ce_valid_proposal
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._val_sum, self._val_count = 0.0, 0
        # running Z-hat = mean of every raw weight drawn so far (E_q[P/q] = Z for any q)
        self._log_w_sum, self._w_count = -math.inf, 0
        self.swaps: list[dict] = []
        self.samples_drawn = 0
        # first check where CE(V, pi) <= target_ce_valid: samples, updates and seconds spent until then
        self.target_ce_valid, self.reached_target = target_ce_valid, None
        self._started = time.perf_counter()

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    def configure_optimizers(self):
        return torch.optim.Adam(self.pi.parameters(), lr=self.options.lr)

    @property
    def log_z_running(self) -> float:
        # 0 (Z taken as 1) until some draw has a nonzero weight: log 0 would turn w / Z-hat into 0 / 0
        return self._log_w_sum - math.log(self._w_count) if math.isfinite(self._log_w_sum) else 0.0

    def _draw_weighted(self) -> WeightedDraw:
        """Sample the proposal, weight, thin without bias to ~keep_per_draw items."""
        if self._pending is not None:  # already drawn (and scored) by the swap gate
            draw, self._pending = self._pending, None
            return draw
        with torch.no_grad():
            sampler = self.q if self.algorithm == "dpg_off" else self.pi
            samples = sampler.sample(self.proposal_batch, self.options.max_len, self._gen())  # carries log q(x)
            self.samples_drawn += len(samples)
            log_q = samples.log_prob.double()
            # dpg: w = P(x) / (Z q(x)); pg: reward R = P(x) / Z
            if self.q_is_base:
                log_w = self.potential.log_tilt(samples.tokens).double() - self.log_z
            else:
                log_p = self.potential.log_potential(samples.tokens).double()
                log_w = log_p - self.log_z - (log_q if self.algorithm != "pg" else 0.0)
            if self.algorithm != "pg":
                # every draw counts in the running mean, zero weights included (E_q[P/q] = Z)
                self._w_count += len(log_w)
                if torch.isfinite(log_w).any():
                    if self.trainer.training:  # the swap gate draws during validation, where step logs are refused
                        self.log("dpg/ess", effective_sample_size(log_w), on_step=True, on_epoch=False)
                    self._log_w_sum = float(torch.logaddexp(torch.tensor(self._log_w_sum, dtype=torch.float64),
                                                            torch.logsumexp(log_w, 0)))
            keep, thinned = thin_by_weight(log_w, self.keep_per_draw, self._gen())
            # w_i / p_i / N = w_i exp(log_ht); zero-weight items (kept only when nothing is thinned) have p_i = 1
            kept_w = log_w[keep]
            log_ht = torch.where(torch.isfinite(kept_w), thinned - kept_w, 0.0) - math.log(len(log_w))
            version = torch.full((len(keep),), self.q_version, dtype=torch.long, device=log_w.device)
            share = torch.full((len(keep),), 1.0 / len(keep), dtype=torch.float64, device=log_w.device)
            return WeightedDraw(samples.tokens[keep], log_w[keep], log_q[keep], log_ht, version, share)

    def _replayed(self) -> WeightedDraw:
        """A random minibatch of the buffer, refreshed with a new draw every steps_per_draw updates."""
        if self._buffer is None or self.global_step % self.steps_per_draw == 0:
            draw = self._draw_weighted()
            self._buffer = draw if self._buffer is None else WeightedDraw.cat([self._buffer, draw])
            self._buffer = self._buffer.tail(self.options.replay)
        # each draw's items sum to that draw's N-sample estimate; a random minibatch of the
        # buffer, rescaled by (buffer items / minibatch) / (draws in buffer), estimates their average.
        # Draws in buffer = sum of the items' shares: a draw counts 1 whatever it contributed (thinning
        # keeps fewer items from a draw with few nonzero weights), a partly evicted one its fraction.
        pick = torch.randint(len(self._buffer), (self.options.minibatch,), device=self.device, generator=self._gen())
        batch = self._buffer.index(pick)
        draws = float(self._buffer.share.sum())
        scale = len(self._buffer) / (self.options.minibatch * draws)
        batch.log_ht = batch.log_ht + math.log(scale)
        return batch

    def _coefficients(self, batch: WeightedDraw, log_pi: torch.Tensor) -> torch.Tensor:
        """Per-item weight c_i of grad log pi(x_i) in the update (no gradient through c)."""
        log_norm = self.log_z_running if self.options.normalise == "running_z" else 0.0
        coef = torch.exp(batch.log_w + batch.log_ht - log_norm)
        if self.options.baseline and self.algorithm != "pg":
            # E_q[(pi(x)/q(x)) grad log pi(x)] = E_pi[grad log pi] = 0, so subtracting
            # b pi(x)/q(x) (b = Z-hat, or 1 once weights are normalised) keeps the gradient
            # unbiased and removes the part of w that pi already explains
            b = 1.0 if self.options.normalise == "running_z" else math.exp(self.log_z_running)
            coef = coef - b * torch.exp(log_pi.detach().double() - batch.log_q + batch.log_ht)
        return coef.float()

    def training_step(self, batch, batch_idx):
        draw = self._replayed() if self.options.replay else self._draw_weighted()
        log_pi = self.pi.log_prob(draw.tokens)
        # -(1/N) sum_i c_i log pi(x_i): the N-sample DPG estimate (thinned, or replayed)
        loss = -(self._coefficients(draw, log_pi) * log_pi).sum()
        self.log("dpg/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(draw))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val_sum += float(self.pi.log_prob(batch).sum())
        self._val_count += len(batch)

    def _kl_gain(self) -> tuple[float, float, float]:
        """KL(p || q) - KL(p || pi) = E_p[log pi(x) - log q(x)], by self-normalised IS on a
        fresh draw of q (then used for training, so the gate costs no extra samples);
        returns (estimate, its standard error, the draw's effective sample size)."""
        self._pending = None  # always a fresh draw of the current q (an older one may be of another q)
        draw = self._pending = self._draw_weighted()
        log_c = draw.log_w + draw.log_ht
        if not torch.isfinite(log_c).any():  # no sample of q in the support of P: nothing to compare on
            return 0.0, math.inf, 0.0
        with torch.no_grad(), eval_mode(self.pi):
            diff = self.pi.log_prob(draw.tokens).double() - draw.log_q
        weights = torch.softmax(log_c, 0)
        gain = float((weights * diff).sum())
        return gain, float(torch.sqrt((weights**2 * (diff - gain) ** 2).sum())), effective_sample_size(log_c)

    def on_validation_epoch_end(self):
        ce_pi = -self._val_sum / (self._val_count * self.symbols)  # CE(V, pi) in nats per symbol
        self._val_sum, self._val_count = 0.0, 0
        if self.algorithm == "dpg_off" and not self.trainer.sanity_checking:
            if self.options.swap_gate == "ce_valid":
                better, gain, gain_se, ess = ce_pi < self.ce_valid_q, None, None, None  # only to a better policy
            else:
                gain, gain_se, ess = self._kl_gain()
                # pi closer to p than q, beyond two standard errors, on enough effective samples
                # for the standard error itself to be trusted
                better = ess >= KL_GATE_MIN_ESS and gain > 2.0 * gain_se
                self.log("dpg/kl_gain", gain)
                self.log("dpg/kl_gate_ess", ess)
            if better:
                self._swap(ce_pi, gain, gain_se, ess)
        if self.target_ce_valid is not None and self.reached_target is None and ce_pi <= self.target_ce_valid:
            self.reached_target = {"samples": self.samples_drawn, "updates": int(self.global_step),
                                   "seconds": round(time.perf_counter() - self._started, 3), "ce_valid_pi": ce_pi}
            log.info("[dpg] CE(V, pi) %.4f <= target %.4f after %d samples", ce_pi, self.target_ce_valid,
                     self.samples_drawn)
        self.log("dpg/val_ce_pi", ce_pi)
        if self.q is not None:
            self.log("dpg/val_ce_q", self.ce_valid_q)
        if self._w_count:
            self.log("dpg/log_z_running", self.log_z_running)

    def _swap(self, ce_pi: float, gain: float | None, gain_se: float | None, ess: float | None) -> None:
        swap = {"step": int(self.global_step), "epoch": int(self.current_epoch), "gate": self.options.swap_gate,
                "ce_valid_pi": ce_pi, "ce_valid_q": self.ce_valid_q, "kl_gain": gain, "kl_gain_se": gain_se,
                "kl_gate_ess": ess}
        self.swaps.append(swap)
        log.info("[dpg] step %d: q <- pi (CE(V, pi) %.4f, CE(V, q) %.4f%s)", swap["step"], ce_pi, self.ce_valid_q,
                 "" if gain is None else f", KL gain {gain:.4f} +- {gain_se:.4f}")
        self.q.load_state_dict(self.pi.state_dict())
        self.q_is_base = False
        self.q_version += 1
        self.ce_valid_q = ce_pi
        self.log("dpg/swap", 1.0)


class _Updates(torch.utils.data.Dataset):
    """`count` empty items: one DPG update each (the samples are drawn inside the step)."""

    def __init__(self, count: int):
        self.count = count

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int) -> int:
        return i


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


def train_dpg(pi: LSTMPolicy, proposal: LSTMPolicy, potential: Potential, valid: torch.Tensor,
              options: DPGOptions, *, symbols_per_seq: int, ce_valid_proposal: float, log_z: float = 0.0,
              seed: int = 0, target_ce_valid: float | None = None, logger=None, accelerator: str = "cpu",
              log_every: int = 1) -> DPGResult:
    """Train `pi` in place towards p = P / Z; on return it holds the best-CE(V) weights."""
    module = DPGModule(pi, proposal, potential, options, symbols_per_seq=symbols_per_seq,
                       ce_valid_proposal=ce_valid_proposal, log_z=log_z, seed=seed,
                       target_ce_valid=target_ce_valid)
    keep = KeepBest("dpg/val_ce_pi", "pi")
    keys = ["dpg/val_ce_pi"] + (["dpg/val_ce_q"] if options.algorithm == "dpg_off" else [])
    callbacks = [EarlyStopping("dpg/val_ce_pi", patience=options.patience, mode="min", check_finite=False), keep,
                 ProgressLog(options.algorithm, keys, every=log_every)]
    trainer = make_trainer(options.max_epochs, callbacks, logger, accelerator, gradient_clip_val=options.clip)
    updates = torch.utils.data.DataLoader(_Updates(options.updates_per_epoch), batch_size=1)
    trainer.fit(module, updates, full_batch_loader(valid, 1000, shuffle=False))
    pi.eval()
    return DPGResult(keep.best, trainer.current_epoch, keep.best_epoch, int(trainer.global_step),
                     module.samples_drawn, module.swaps, module.log_z_running if module._w_count else None,
                     module.reached_target)


@dataclass
class DistillResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    proposals: int
    acceptance_rate: float
    decay_epochs: list[int]


def train_distill(pi: LSTMPolicy, gam: GAMPotential, train_extra: torch.Tensor, valid_extra: torch.Tensor, *,
                  size: int, valid_size: int, max_len: int, proposal_batch: int, max_proposals: int, lr: float,
                  batch_size: int, max_epochs: int, patience: int, clip: float, symbols_per_seq: int, seed: int = 0,
                  logger=None, accelerator: str = "cpu", log_every: int = 1, lr_decays: int = 0,
                  lr_decay_factor: float = 0.5) -> DistillResult:
    """Rejection-sample size + valid_size exact draws of p_lambda from r (proposal cost
    1 / acceptance rate each), then fit `pi` by MLE on draws + train_extra (D), validated on
    the other draws + valid_extra (V)."""
    generator = torch.Generator(device=gam.r.device).manual_seed(seed)
    rs = rejection_sample(gam.r, gam.features, gam.features.names, gam.lam, rejection_log_bound(gam.lam),
                          size + valid_size, max_len, proposal_batch, max_proposals, generator, progress="distill-rs")
    log.info("[distill] acceptance rate %.3e (%d proposals for %d samples)", rs.acceptance_rate, rs.proposals,
             len(rs.tokens))
    train = pad_cat([rs.tokens[:size], train_extra])
    valid = pad_cat([rs.tokens[size:], valid_extra])
    fit = train_mle(pi, train, valid, symbols_per_seq=symbols_per_seq, lr=lr, batch_size=batch_size,
                    max_epochs=max_epochs, patience=patience, clip=clip, prefix="distill", logger=logger,
                    accelerator=accelerator, seed=seed + 1, log_every=log_every, lr_decays=lr_decays,
                    lr_decay_factor=lr_decay_factor)
    return DistillResult(fit.best_val_ce, fit.epochs, fit.best_epoch, rs.proposals, rs.acceptance_rate,
                         fit.decay_epochs)
