"""Training-2 by distillation: exact samples of p = P / Z by rejection sampling from the proposal
r, plus D, into pi by maximum likelihood (validated on more exact samples plus V).

Rejection sampling accepts x ~ r with probability P(x) / (beta r(x)); for P_lambda that is
exp(lambda . phi(x) - log beta), beta bounding exp(lambda . phi) over r's outputs. Each exact
sample costs 1 / acceptance rate proposals (about 1e3 at |D| = 500, where r rarely writes the
motif and p_lambda almost always does)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from gam_rl.config_fields import MISSING, setting
from gam_rl.estimators import rejection_sample
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Potential
from gam_rl.stages.mle import MLEConfig, train_mle
from gam_rl.tokens import pad_cat

log = logging.getLogger("gam_rl")

INITS = ("fresh", "r")  # fresh: a new LSTM (the paper) | r: the MLE starts from r


@dataclass
class DistillConfig:
    """`method` section of distillation (conf/method/distill.yaml). The paper: 20000 exact samples
    plus D for training, 2000 plus V for validation, a fresh LSTM by MLE."""

    name: str = setting(MISSING)
    algorithm: str = setting("distill", choices=("distill",))
    init: str = setting("fresh", choices=INITS)
    size: int = setting(20000, ge=1)  # exact samples for training (plus D)
    valid_size: int = setting(2000, ge=1)  # exact samples for validation (plus V)
    proposal_batch: int = setting(10000, ge=1)  # r-samples per rejection round
    max_proposals: float = setting(2.0e9, gt=0)  # give up (with an error) past this many proposals
    mle: MLEConfig = setting(factory=MLEConfig)


@dataclass
class DistillResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    proposals: int
    acceptance_rate: float
    decay_epochs: list[int]

    def results(self) -> dict:
        return {"ce_valid_pi": self.best_val_ce, "t2_epochs": self.epochs, "t2_best_epoch": self.best_epoch,
                "distill_acceptance_rate": self.acceptance_rate, "distill_proposals": self.proposals,
                "t2_lr_decay_epochs": self.decay_epochs}


def distill(pi: LSTMPolicy, proposal: LSTMPolicy, target: Potential, train_extra: torch.Tensor,
            valid_extra: torch.Tensor, cfg: DistillConfig, *, max_len: int, symbols_per_seq: int, seed: int = 0,
            logger=None, accelerator: str = "cpu") -> DistillResult:
    """Fit `pi` in place on size + valid_size exact draws of P / Z and the extra data."""
    generator = torch.Generator(device=proposal.device).manual_seed(seed)
    rs = rejection_sample(proposal, target, cfg.size + cfg.valid_size, max_len, cfg.proposal_batch,
                          int(cfg.max_proposals), generator, progress="distill-rs")
    log.info("[distill] acceptance rate %.3e (%d proposals for %d samples)", rs.acceptance_rate, rs.proposals,
             len(rs.tokens))
    train = pad_cat([rs.tokens[: cfg.size], train_extra])
    valid = pad_cat([rs.tokens[cfg.size :], valid_extra])
    fit = train_mle(pi, train, valid, cfg.mle, symbols_per_seq=symbols_per_seq, prefix="distill", logger=logger,
                    accelerator=accelerator, seed=seed + 1)
    return DistillResult(fit.best_val_ce, fit.epochs, fit.best_epoch, rs.proposals, rs.acceptance_rate,
                         fit.decay_epochs)
