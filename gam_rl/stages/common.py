"""What the stages share: the plateau rule that stops them, its Lightning callback, progress
and the Trainer."""

from __future__ import annotations

import copy
import logging
import math

import lightning.pytorch as pl
import torch

from gam_rl.progress import Progress

log = logging.getLogger("gam_rl")


class Plateau:
    """The stopping rule of every stage, checked once per epoch on a value to minimise.

    A value below the best so far is a new best. After `patience` checks without one: while
    `decays` remain, the stage restarts from its best state with every learning rate times
    `factor` (lr_k = lr_0 factor^k) and counts patience afresh; otherwise it stops. decays = 0
    is plain early stopping. A non-finite value stops at once, or (stop_on_nonfinite=False)
    counts as a check without a new best.
    """

    BEST, WAIT, DECAY, STOP = "best", "wait", "decay", "stop"

    def __init__(self, patience: int, decays: int = 0, factor: float = 0.5, stop_on_nonfinite: bool = True):
        self.patience, self.decays_left, self.factor = patience, decays, factor
        self.stop_on_nonfinite = stop_on_nonfinite
        self.best, self.best_epoch, self.bad_checks = math.inf, -1, 0
        self.decay_epochs: list[int] = []

    def start_at(self, value: float) -> None:
        """The starting state's value is check 0 (best_epoch -1): the first best to beat."""
        self.best, self.best_epoch, self.bad_checks = value, -1, 0

    def where_best(self) -> str:
        return "the start" if self.best_epoch < 0 else f"epoch {self.best_epoch + 1}"

    def update(self, value: float, epoch: int) -> str:
        if not math.isfinite(value) and self.stop_on_nonfinite:
            log.warning("monitored value %s is not finite: stopping", value)
            return self.STOP
        if value < self.best:
            self.best, self.best_epoch, self.bad_checks = value, epoch, 0
            return self.BEST
        self.bad_checks += 1
        if self.bad_checks < self.patience:
            return self.WAIT
        if self.decays_left <= 0:
            return self.STOP
        self.decays_left -= 1
        self.bad_checks = 0
        self.decay_epochs.append(epoch)
        return self.DECAY


class KeepBestPlateau(pl.Callback):
    """Plateau on `monitor`, with the stage's state `module.<attr>` (a submodule's weights or
    a tensor) snapshotted at every new best, put back on a decay and when fit ends."""

    def __init__(self, monitor: str, attr: str, plateau: Plateau):
        self.monitor, self.attr, self.plateau = monitor, attr, plateau
        self.best_state = None

    def start_from(self, module, value: float) -> None:
        """`module.<attr>` as it is now, with its monitored value, is the best so far (check 0)."""
        self.plateau.start_at(value)
        self.best_state = self.snapshot(getattr(module, self.attr))

    @staticmethod
    def snapshot(target):
        return target.detach().clone() if isinstance(target, torch.Tensor) else copy.deepcopy(target.state_dict())

    def on_validation_end(self, trainer, module):
        value = trainer.callback_metrics.get(self.monitor)
        if value is None or trainer.sanity_checking:
            return
        action = self.plateau.update(float(value), trainer.current_epoch)
        if action == Plateau.BEST:
            self.best_state = self.snapshot(getattr(module, self.attr))
        elif action == Plateau.DECAY:
            self.restore(module)
            for optimizer in trainer.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] *= self.plateau.factor
            log.info("[%s] no better %s for %d checks: best weights (%s) back, lr x %g",
                     self.monitor.split("/")[0], self.monitor, self.plateau.patience, self.plateau.where_best(),
                     self.plateau.factor)
        elif action == Plateau.STOP:
            trainer.should_stop = True

    def on_fit_end(self, trainer, module):
        self.restore(module)

    def restore(self, module) -> None:
        """Put the best state seen so far back into `module.<attr>`."""
        if self.best_state is None:
            return
        target = getattr(module, self.attr)
        if isinstance(target, torch.Tensor):
            target.copy_(self.best_state)
        else:
            target.load_state_dict(self.best_state)


class StageProgress(pl.Callback):
    """Progress of a Lightning stage (gam_rl.progress): optimiser steps done out of max_epochs x
    steps_per_epoch (an upper bound: the plateau rule may stop earlier), with the epoch, the
    monitored values and the best so far; a closing line says where and why it stopped."""

    def __init__(self, stage: str, keys: list[str], plateau: Plateau, steps_per_epoch: int, max_epochs: int,
                 unit: str = "steps", monitor: str | None = None):
        self.stage, self.keys, self.plateau, self.max_epochs = stage, keys, plateau, max_epochs
        self.monitor = (monitor or keys[-1]).split("/")[-1]  # the plateau's value
        self.progress = Progress(stage, steps_per_epoch * max_epochs, unit, upper_bound=True)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.progress.update(trainer.global_step)

    def on_validation_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        values = ", ".join(f"{k.split('/')[-1]} {float(trainer.callback_metrics[k]):.4f}"
                           for k in self.keys if k in trainer.callback_metrics)
        best = f"best {self.plateau.best:.4f} at {self.plateau.where_best()}"
        self.progress.update(trainer.global_step, f"epoch {trainer.current_epoch + 1}/{self.max_epochs}: {values}; "
                                                  f"{best}")

    def on_fit_end(self, trainer, module):
        self.progress.close()
        log.info("[%s] stopped after epoch %d of %d: best %s %.4f at %s", self.stage, trainer.current_epoch,
                 self.max_epochs, self.monitor, self.plateau.best, self.plateau.where_best())


def make_trainer(max_epochs: int, callbacks: list, logger=None, accelerator: str = "cpu",
                 gradient_clip_val: float | None = None) -> pl.Trainer:
    return pl.Trainer(
        max_epochs=max_epochs,
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


def token_loader(tokens: torch.Tensor, batch_size: int, shuffle: bool, seed: int = 0):
    """DataLoader over a token tensor (each batch a (B, T) tensor)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(
        tokens, batch_size=batch_size, shuffle=shuffle, generator=generator if shuffle else None
    )
