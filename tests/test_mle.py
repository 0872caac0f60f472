import torch

from gam_rl.data import load_splits
from gam_rl.metrics import policy_cross_entropy, sample_statistics
from gam_rl.policy import LSTMPolicy
from gam_rl.process import MotifProcess
from gam_rl.stages.mle import MLEConfig, train_mle


def test_mle_lowers_validation_cross_entropy_and_keeps_best(tmp_path):
    torch.manual_seed(0)
    n, motif = 10, "1011"
    splits = load_splits(motif, n, 200, 100, {"train": 200, "valid": 100, "test": 100}, tmp_path)
    policy = LSTMPolicy(16, 1, dropout=0.0)
    before = policy_cross_entropy(policy, splits.valid, n + 1)
    fit = train_mle(policy, splits.train, splits.valid, MLEConfig(lr=0.02, batch_size=50, max_epochs=15, patience=3),
                    symbols_per_seq=n + 1, prefix="r")
    after = policy_cross_entropy(policy, splits.valid, n + 1)
    assert after < before - 0.2, (before, after)
    assert abs(after - fit.best_val_ce) < 1e-5  # the restored weights are the best epoch's
    stats = sample_statistics(policy, MotifProcess(motif, n).contains_motif, 500, 40)
    assert stats["avg_len"] > 5  # it learned to emit roughly n bits before EOS
    assert 0.0 <= stats["motif_freq"] <= 1.0


def test_mle_plateau_restarts_from_the_best_weights_through_lightning(tmp_path):
    """lr_decays through a real Trainer: a too-large lr stalls CE(V); each plateau halves the lr
    from the best weights, and the returned policy is the best epoch's."""
    torch.manual_seed(0)
    n, motif = 10, "1011"
    splits = load_splits(motif, n, 200, 100, {"train": 200, "valid": 100, "test": 100}, tmp_path)
    policy = LSTMPolicy(16, 1, dropout=0.0)
    fit = train_mle(policy, splits.train, splits.valid,
                    MLEConfig(lr=0.5, batch_size=50, max_epochs=12, patience=1, lr_decays=2), symbols_per_seq=n + 1,
                    prefix="r")
    assert 1 <= len(fit.decay_epochs) <= 2 and fit.decay_epochs == sorted(fit.decay_epochs)
    assert fit.epochs > fit.decay_epochs[0] + 1  # training went on after the first plateau
    assert abs(policy_cross_entropy(policy, splits.valid, n + 1) - fit.best_val_ce) < 1e-5
