"""Maximum-likelihood training of an autoregressive policy (r on D; pi in distillation)."""

from __future__ import annotations

from dataclasses import dataclass

import lightning.pytorch as pl
import torch

from gam_rl.policy import LSTMPolicy
from gam_rl.stages.common import KeepBest, PlateauStop, ProgressLog, full_batch_loader, make_trainer


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


def train_mle(policy: LSTMPolicy, train: torch.Tensor, valid: torch.Tensor, *, symbols_per_seq: int,
              lr: float, batch_size: int, max_epochs: int, patience: int, clip: float, prefix: str,
              logger=None, accelerator: str = "cpu", seed: int = 0, log_every: int = 1, lr_decays: int = 0,
              lr_decay_factor: float = 0.5) -> MLEResult:
    """Fit `policy` in place; on return it holds the weights with the best CE(V). With
    lr_decays > 0 a plateau of `patience` epochs restarts from the best weights at lr x
    lr_decay_factor (at most lr_decays times) before it stops (PlateauStop)."""
    module = MLEModule(policy, lr, symbols_per_seq, prefix)
    monitor = f"{prefix}/val_ce"
    keep = KeepBest(monitor, "policy")
    stop = PlateauStop(keep, patience, lr_decays, lr_decay_factor)
    callbacks = [keep, stop,
                 ProgressLog(prefix, [f"{prefix}/train_ce", monitor], every=log_every)]
    trainer = make_trainer(max_epochs, callbacks, logger, accelerator, gradient_clip_val=clip)
    train_loader = full_batch_loader(train, batch_size, shuffle=True, seed=seed)
    valid_loader = full_batch_loader(valid, max(batch_size, 1000), shuffle=False)
    trainer.fit(module, train_loader, valid_loader)
    policy.eval()
    epochs = trainer.current_epoch
    return MLEResult(keep.best, epochs, keep.best_epoch, epochs * len(train), stop.decay_epochs)
