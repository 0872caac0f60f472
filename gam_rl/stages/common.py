"""Pieces every stage's Trainer shares: best-weights keeping, progress lines, the Trainer."""

from __future__ import annotations

import copy
import logging
import math

import lightning.pytorch as pl
import torch

log = logging.getLogger("gam_rl")


class KeepBest(pl.Callback):
    """Remember `module.<attr>` (a submodule's weights or a tensor) at the lowest monitored
    value; put it back when fit ends."""

    def __init__(self, monitor: str, attr: str):
        self.monitor, self.attr = monitor, attr
        self.best = math.inf
        self.best_epoch = -1
        self.best_state = None

    def on_validation_end(self, trainer, module):
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        value = float(value)
        if value < self.best:
            self.best, self.best_epoch = value, trainer.current_epoch
            target = getattr(module, self.attr)
            self.best_state = (target.detach().clone() if isinstance(target, torch.Tensor)
                               else copy.deepcopy(target.state_dict()))

    def on_fit_end(self, trainer, module):
        self.restore(module)

    def restore(self, module) -> None:
        """Put the best weights seen so far back into `module.<attr>`."""
        if self.best_state is None:
            return
        target = getattr(module, self.attr)
        if isinstance(target, torch.Tensor):
            target.copy_(self.best_state)
        else:
            target.load_state_dict(self.best_state)


class PlateauStop(pl.Callback):
    """Early stopping with learning-rate decay on plateaus. After `patience` checks without a
    new best of `keep.monitor`: while `decays` remain, put the best weights back and multiply
    every learning rate by `factor` (lr_k = lr_0 factor^k), then count patience afresh;
    otherwise stop. decays = 0 is plain early stopping. A non-finite value stops at once.
    Put it after `keep` in the callback list, so that `keep` has seen the check first."""

    def __init__(self, keep: KeepBest, patience: int, decays: int = 0, factor: float = 0.5):
        self.keep, self.patience, self.decays_left, self.factor = keep, patience, decays, factor
        self.bad_checks = 0
        self.decay_epochs: list[int] = []

    def on_validation_end(self, trainer, module):
        value = trainer.callback_metrics.get(self.keep.monitor)
        if value is None or trainer.sanity_checking:
            return
        if not math.isfinite(float(value)):
            log.warning("%s = %s is not finite: stopping", self.keep.monitor, float(value))
            trainer.should_stop = True
            return
        self.bad_checks = 0 if self.keep.best_epoch == trainer.current_epoch else self.bad_checks + 1
        if self.bad_checks < self.patience:
            return
        if self.decays_left <= 0:
            trainer.should_stop = True
            return
        self.keep.restore(module)
        for optimizer in trainer.optimizers:
            for group in optimizer.param_groups:
                group["lr"] *= self.factor
        self.decays_left -= 1
        self.bad_checks = 0
        self.decay_epochs.append(trainer.current_epoch)
        log.info("[%s] no better %s for %d checks: best weights (epoch %d) back, lr x %g",
                 self.keep.monitor.split("/")[0], self.keep.monitor, self.patience, self.keep.best_epoch + 1,
                 self.factor)


class ProgressLog(pl.Callback):
    """One log line every `every` epochs (and the last), readable in a terminal or a log file."""

    def __init__(self, stage: str, keys: list[str], every: int = 1):
        self.stage, self.keys, self.every = stage, keys, max(1, every)

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        epoch = trainer.current_epoch
        last = epoch + 1 >= (trainer.max_epochs or 0)
        if epoch % self.every and not last:
            return
        values = ", ".join(
            f"{k}={float(trainer.callback_metrics[k]):.4f}" for k in self.keys if k in trainer.callback_metrics
        )
        log.info("[%s] epoch %d/%s %s", self.stage, epoch + 1, trainer.max_epochs, values)


def make_trainer(max_epochs: int, callbacks: list, logger=None, accelerator: str = "cpu",
                 gradient_clip_val: float | None = None, max_steps: int = -1) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
        max_steps=max_steps,
        accelerator=accelerator,
        devices=1,
        logger=logger if logger is not None else False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        gradient_clip_val=gradient_clip_val,
        gradient_clip_algorithm="norm",
        log_every_n_steps=1,
        deterministic=False,
    )


def full_batch_loader(tokens: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
    """DataLoader over a token tensor (each batch a (B, T) tensor)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        tokens, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None
    )
