"""Maximum-likelihood training of an autoregressive policy (r on D; pi in distillation)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from gam_rl.config_fields import setting
from gam_rl.policy import LSTMPolicy
from gam_rl.stages.common import KeepBestPlateau, Plateau, StageProgress, make_trainer, token_loader


@dataclass
class MLEConfig:
    """An MLE schedule: `r` (r on D) and `method.mle` (distillation). The paper: Adam 1e-3,
    batch min(|D|, 500) (a batch larger than the data is one batch of all of it), grad-norm
    clip 0.25, up to 99 epochs, patience 8 on CE(V)."""

    lr: float = setting(1e-3, gt=0)
    batch_size: int = setting(500, ge=1)
    max_epochs: int = setting(99, ge=1)
    patience: int = setting(8, ge=1)
    lr_decays: int = setting(0, ge=0)  # > 0: on a plateau, restart from the best weights at lr x lr_decay_factor,
    lr_decay_factor: float = setting(0.5, gt=0, lt=1)  # at most lr_decays times, before stopping (0: the paper)
    clip: float = setting(0.25, gt=0)  # grad-norm clip


class MLEModule(pl.LightningModule):
    """Minimise CE(D, pi) = -mean_x log pi(x) / symbols, validated by CE(V, pi)."""

    def __init__(self, policy: LSTMPolicy, lr: float, symbols_per_seq: int, prefix: str):
        super().__init__()
        self.policy, self.lr, self.symbols, self.prefix = policy, lr, symbols_per_seq, prefix
        self._train_sum, self._train_count = 0.0, 0

    def training_step(self, batch, batch_idx):
        # per-symbol NLL: -sum_x log pi(x) / (batch * symbols), dropout on
        loss = -self.policy.log_prob(batch).mean() / self.symbols
        self._train_sum += float(loss.detach()) * len(batch)
        self._train_count += len(batch)
        return loss

    def on_validation_epoch_end(self):
        # the epoch's mean training CE, logged with the validation CE of the same epoch
        if self._train_count:
            self.log(f"{self.prefix}/train_ce", self._train_sum / self._train_count)
        self._train_sum, self._train_count = 0.0, 0

    def validation_step(self, batch, batch_idx):
        ce = -self.policy.log_prob(batch).mean() / self.symbols
        self.log(f"{self.prefix}/val_ce", ce, on_step=False, on_epoch=True, batch_size=len(batch))

    def configure_optimizers(self):
        return torch.optim.Adam(self.policy.parameters(), lr=self.lr)


@dataclass
class MLEResult:
    best_val_ce: float
    epochs: int
    best_epoch: int
    sequences_seen: int
    decay_epochs: list[int]  # epochs (0-based) after which the lr was decayed


def train_mle(policy: LSTMPolicy, train: torch.Tensor, valid: torch.Tensor, cfg: MLEConfig, *,
              symbols_per_seq: int, prefix: str, logger=None, accelerator: str = "cpu", seed: int = 0) -> MLEResult:
    """Fit `policy` in place; on return it holds the weights with the best CE(V) (Plateau)."""
    module = MLEModule(policy, cfg.lr, symbols_per_seq, prefix)
    monitor = f"{prefix}/val_ce"
    plateau = Plateau(cfg.patience, cfg.lr_decays, cfg.lr_decay_factor)
    callbacks = [KeepBestPlateau(monitor, "policy", plateau),
                 StageProgress(prefix, [f"{prefix}/train_ce", monitor], plateau, math.ceil(len(train) / cfg.batch_size),
                               cfg.max_epochs, unit="batches")]
    trainer = make_trainer(cfg.max_epochs, callbacks, logger, accelerator, gradient_clip_val=cfg.clip)
    train_loader = token_loader(train, cfg.batch_size, shuffle=True, seed=seed)
    valid_loader = token_loader(valid, max(cfg.batch_size, 1000), shuffle=False)
    trainer.fit(module, train_loader, valid_loader)
    policy.eval()
    epochs = trainer.current_epoch
    return MLEResult(plateau.best, epochs, plateau.best_epoch, epochs * len(train), plateau.decay_epochs)
