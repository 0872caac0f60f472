"""Plateau and KeepBestPlateau: early stopping with lr decay from the best weights, check by check."""

import math
from types import SimpleNamespace

import pytest
import torch

from gam_rl.stages.common import KeepBestPlateau, Plateau


def drive(values, patience, decays, factor=0.5, stop_on_nonfinite=True):
    """Feed one validation value per epoch; the module's weight is the epoch number, so a
    restore is visible as the weight of the best epoch. Returns what happened."""
    module = SimpleNamespace(weight=torch.zeros(1))
    optimizer = SimpleNamespace(param_groups=[{"lr": 1.0}, {"lr": 0.1}])
    trainer = SimpleNamespace(callback_metrics={}, sanity_checking=False, current_epoch=0, should_stop=False,
                              optimizers=[optimizer])
    plateau = Plateau(patience, decays, factor, stop_on_nonfinite)
    keep = KeepBestPlateau("r/val_ce", "weight", plateau)
    weights_after = []
    for epoch, value in enumerate(values):
        trainer.current_epoch = epoch
        module.weight.fill_(float(epoch))
        trainer.callback_metrics["r/val_ce"] = torch.tensor(value)
        keep.on_validation_end(trainer, module)
        weights_after.append(float(module.weight))
        if trainer.should_stop:
            break
    keep.on_fit_end(trainer, module)
    return SimpleNamespace(stopped_at=epoch if trainer.should_stop else None, decays=plateau.decay_epochs,
                           lrs=[g["lr"] for g in optimizer.param_groups], weights=weights_after, keep=plateau,
                           final=float(module.weight))


def test_without_decays_it_is_plain_early_stopping():
    out = drive([1.0, 0.9, 0.95, 0.96, 0.8], patience=2, decays=0)
    assert out.stopped_at == 3 and out.decays == [] and out.lrs == [1.0, 0.1]
    assert out.keep.best_epoch == 1 and out.final == 1.0  # the best epoch's weights are back at the end


def test_a_plateau_restores_the_best_weights_and_decays_every_lr():
    values = [1.0, 0.9, 0.95, 0.96, 0.8, 0.85, 0.86, 0.87, 0.7]
    out = drive(values, patience=2, decays=1, factor=0.25)
    assert out.decays == [3]
    assert out.weights[3] == 1.0  # epoch 1's weights were put back at the decay
    assert out.lrs == [0.25, 0.025]
    assert out.stopped_at == 6  # patience counted afresh after the decay, then no decays left
    assert out.keep.best == pytest.approx(0.8) and out.keep.best_epoch == 4


def test_improvement_resets_the_count_and_decays_run_out():
    values = [1.0, 1.1, 0.9, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
    out = drive(values, patience=2, decays=2)
    # bad at 1, best at 2, bad 3 and 4 -> decay, bad 5 and 6 -> decay, bad 7 and 8 -> stop
    assert out.decays == [4, 6] and out.stopped_at == 8
    assert out.lrs == [0.25, 0.025]


def test_a_non_finite_value_stops_at_once():
    out = drive([1.0, math.nan, 0.5], patience=5, decays=3)
    assert out.stopped_at == 1 and out.decays == []


def test_a_non_finite_value_can_count_as_a_bad_check_instead():
    # DPG: pg's collapse gives CE(V, pi) = inf; that is no progress, not a reason to stop at once
    out = drive([1.0, math.inf, math.nan, 0.5, 0.6], patience=3, decays=0, stop_on_nonfinite=False)
    assert out.stopped_at is None and out.keep.best_epoch == 3 and out.final == 3.0
