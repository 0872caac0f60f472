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
from dataclasses import dataclass, field

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping

from gam_rl.estimators import effective_sample_size, rejection_log_bound, rejection_sample, thin_by_weight
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import GAMPotential, Potential
from gam_rl.stages.common import KeepBest, ProgressLog, full_batch_loader, make_trainer
from gam_rl.stages.mle import train_mle
from gam_rl.tokens import pad_cat

log = logging.getLogger("gam_rl")

DPG_ALGORITHMS = ("dpg_off", "dpg_on", "pg")


class DPGModule(pl.LightningModule):
    def __init__(self, pi: LSTMPolicy, proposal: LSTMPolicy, potential: Potential, *, algorithm: str,
                 lr: float, minibatch: int, max_len: int, symbols_per_seq: int, ce_valid_proposal: float,
                 log_z: float = 0.0, seed: int = 0, proposal_batch: int | None = None, replay: int = 0,
                 steps_per_draw: int = 1):
        super().__init__()
        if algorithm not in DPG_ALGORITHMS:
            raise ValueError(f"unknown DPG algorithm {algorithm!r}; choose one of {list(DPG_ALGORITHMS)}")
        self.pi, self.algorithm, self.potential = pi, algorithm, potential
        # q is a frozen copy, never trained; kept out of the optimiser and of the best-pi snapshot
        self.q = copy.deepcopy(proposal).eval().requires_grad_(False) if algorithm == "dpg_off" else None
        self.lr, self.minibatch, self.max_len, self.symbols, self.log_z = lr, minibatch, max_len, symbols_per_seq, log_z
        self.proposal_batch = max(proposal_batch or minibatch, minibatch)
        self.replay, self.steps_per_draw = replay, max(1, steps_per_draw)
        self._buffer_tokens: torch.Tensor | None = None  # replay buffer: sequences ...
        self._buffer_log_w: torch.Tensor | None = None  # ... and log(w / N) of the batch they came from
        # P_lambda / r = exp(lambda . phi): valid while q is the untouched base model of the GAM
        self.q_is_base = algorithm == "dpg_off" and isinstance(potential, GAMPotential) and potential.r is proposal
        self.ce_valid_q = ce_valid_proposal
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._val_sum, self._val_count = 0.0, 0
        self.swaps: list[dict] = []
        self.samples_drawn = 0

    def _gen(self) -> torch.Generator:
        if self._generator is None:
            self._generator = torch.Generator(device=self.device).manual_seed(self.seed)
        return self._generator

    def configure_optimizers(self):
        return torch.optim.Adam(self.pi.parameters(), lr=self.lr)

    def _draw_weighted(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Sample the proposal, weight, thin to ~minibatch; returns (tokens, log(w / N))."""
        with torch.no_grad():
            sampler = self.q if self.algorithm == "dpg_off" else self.pi
            samples = sampler.sample(self.proposal_batch, self.max_len, self._gen())  # carries log q(x)
            self.samples_drawn += len(samples)
            # dpg: w = P(x) / (Z q(x)); pg: reward R = P(x) / Z
            if self.q_is_base:
                log_w = self.potential.log_tilt(samples.tokens).double() - self.log_z
            else:
                log_p = self.potential.log_potential(samples.tokens).double()
                log_w = log_p - self.log_z - (samples.log_prob.double() if self.algorithm != "pg" else 0.0)
            if self.algorithm != "pg" and torch.isfinite(log_w).any():
                self.log("dpg/ess", effective_sample_size(log_w), on_step=True, on_epoch=False)
            keep, log_w = thin_by_weight(log_w, self.minibatch, self._gen())
            return samples.tokens[keep], log_w - math.log(self.proposal_batch)

    def _replayed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """A random minibatch of the buffer, refreshed with a new draw every steps_per_draw updates."""
        if self._buffer_tokens is None or self.global_step % self.steps_per_draw == 0:
            tokens, log_w = self._draw_weighted()
            if self._buffer_tokens is not None:
                tokens = pad_cat([self._buffer_tokens, tokens])
                log_w = torch.cat([self._buffer_log_w, log_w])
            self._buffer_tokens, self._buffer_log_w = tokens[-self.replay :], log_w[-self.replay :]
        # each draw adds about `minibatch` items, so a random minibatch of the buffer is, in
        # expectation, one draw's N-sample estimate averaged over the buffered draws
        pick = torch.randint(len(self._buffer_tokens), (self.minibatch,), device=self.device, generator=self._gen())
        return self._buffer_tokens[pick], self._buffer_log_w[pick]

    def training_step(self, batch, batch_idx):
        tokens, log_w = self._replayed() if self.replay else self._draw_weighted()
        weights = torch.exp(log_w).float()
        # -(1/N) sum_i w_i log pi(x_i): the N-sample DPG estimate (thinned, or replayed)
        loss = -(weights * self.pi.log_prob(tokens)).sum()
        self.log("dpg/loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(tokens))
        return loss

    def validation_step(self, batch, batch_idx):
        self._val_sum += float(self.pi.log_prob(batch).sum())
        self._val_count += len(batch)

    def on_validation_epoch_end(self):
        ce_pi = -self._val_sum / (self._val_count * self.symbols)  # CE(V, pi) in nats per symbol
        self._val_sum, self._val_count = 0.0, 0
        if self.algorithm == "dpg_off" and ce_pi < self.ce_valid_q:  # swap only to a better policy
            swap = {"step": int(self.global_step), "epoch": int(self.current_epoch),
                    "ce_valid_pi": ce_pi, "ce_valid_q": self.ce_valid_q}
            self.swaps.append(swap)
            log.info("[dpg] step %d: q <- pi (CE(V, pi) %.4f < CE(V, q) %.4f)", swap["step"], ce_pi, self.ce_valid_q)
            self.q.load_state_dict(self.pi.state_dict())
            self.q_is_base = False
            self.ce_valid_q = ce_pi
            self.log("dpg/swap", 1.0)
        self.log("dpg/val_ce_pi", ce_pi)
        if self.q is not None:
            self.log("dpg/val_ce_q", self.ce_valid_q)


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


def train_dpg(pi: LSTMPolicy, proposal: LSTMPolicy, potential: Potential, valid: torch.Tensor, *,
              algorithm: str, lr: float, minibatch: int, updates_per_epoch: int, max_epochs: int, patience: int,
              clip: float | None, max_len: int, symbols_per_seq: int, ce_valid_proposal: float, log_z: float = 0.0,
              seed: int = 0, proposal_batch: int | None = None, replay: int = 0, steps_per_draw: int = 1,
              logger=None, accelerator: str = "cpu", log_every: int = 1) -> DPGResult:
    """Train `pi` in place towards p = P / Z; on return it holds the best-CE(V) weights."""
    module = DPGModule(pi, proposal, potential, algorithm=algorithm, lr=lr, minibatch=minibatch, max_len=max_len,
                       symbols_per_seq=symbols_per_seq, ce_valid_proposal=ce_valid_proposal, log_z=log_z, seed=seed,
                       proposal_batch=proposal_batch, replay=replay, steps_per_draw=steps_per_draw)
    keep = KeepBest("dpg/val_ce_pi", "pi")
    keys = ["dpg/val_ce_pi"] + (["dpg/val_ce_q"] if algorithm == "dpg_off" else [])
    callbacks = [EarlyStopping("dpg/val_ce_pi", patience=patience, mode="min", check_finite=False), keep,
                 ProgressLog(algorithm, keys, every=log_every)]
    trainer = make_trainer(max_epochs, callbacks, logger, accelerator, gradient_clip_val=clip)
    updates = torch.utils.data.DataLoader(_Updates(updates_per_epoch), batch_size=1)
    trainer.fit(module, updates, full_batch_loader(valid, 1000, shuffle=False))
    pi.eval()
    return DPGResult(keep.best, trainer.current_epoch, keep.best_epoch, int(trainer.global_step),
                     module.samples_drawn, module.swaps)


@dataclass
class DistillResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    proposals: int
    acceptance_rate: float


def train_distill(pi: LSTMPolicy, gam: GAMPotential, train_extra: torch.Tensor, valid_extra: torch.Tensor, *,
                  size: int, valid_size: int, max_len: int, proposal_batch: int, max_proposals: int, lr: float,
                  batch_size: int, max_epochs: int, patience: int, clip: float, symbols_per_seq: int, seed: int = 0,
                  logger=None, accelerator: str = "cpu", log_every: int = 1) -> DistillResult:
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
                    accelerator=accelerator, seed=seed + 1, log_every=log_every)
    return DistillResult(fit.best_val_ce, fit.epochs, fit.best_epoch, rs.proposals, rs.acceptance_rate)
