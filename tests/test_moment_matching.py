"""Training-1 (moment matching) against exact enumeration of every output."""

import numpy as np
import pytest
import torch

from gam_rl.estimators import MomentEstimate
from gam_rl.features import Features
from gam_rl.potentials import gam
from gam_rl.process import MotifProcess
from gam_rl.stages.moment_matching import MomentMatchingConfig, fit_lambda, moment_matching
from gam_rl.tokens import encode
from tests.conftest import long_proposal
from tests.exact import all_outputs, exact_distribution

N, MOTIF, MAX_LEN = 7, "110", 9


def exact_moments(r, features, lam, space):
    with torch.no_grad():
        log_p, _ = exact_distribution(gam(r, features, lam).log_potential(space))
        return (log_p.exp().unsqueeze(1) * features(space).double()).sum(0)


@pytest.mark.parametrize("estimator,reuse", [("snis_r", "epoch"), ("rs", "epoch"), ("snis_r", "run")])
def test_training1_matches_data_moments_exactly_enumerated(estimator, reuse):
    data = encode(MotifProcess(MOTIF, N).sample_strings(1000, np.random.default_rng(0)))
    r = long_proposal()
    features = Features("0001111", MOTIF)  # first bit + distractors: finite lambdas fit them
    cfg = MomentMatchingConfig(estimator=estimator, lr=4.0, chunk=500, samples_per_step=4000, buffer=40000,
                               reuse=reuse, heldout=20000, max_epochs=40, patience=40)
    fit = moment_matching(r, features, data, cfg, max_len=MAX_LEN, seed=1)
    space = all_outputs(MAX_LEN)
    target = features(data).double().mean(0)
    mismatch = float((exact_moments(r, features, torch.tensor(fit.lam), space) - target).abs().sum())
    # Tolerance: each step's estimate has a standard error of about 1/sqrt(ESS) ~ 0.01-0.02 per
    # feature, and lr / epoch averages the noise down; 4 features -> L1 below 0.05 leaves
    # headroom. At lambda = 0 the mismatch is far larger (checked below).
    assert mismatch < 0.05, (mismatch, fit.lam)
    start = float((exact_moments(r, features, torch.zeros(4), space) - target).abs().sum())
    assert start > 0.3
    # the selection estimate is the held-out one, reported with its standard error; the exact
    # mismatch of the kept lambda is within a few of those
    assert fit.best_mismatch_se > 0 and abs(fit.best_mismatch - mismatch) < 4 * fit.best_mismatch_se + 0.01
    assert fit.samples >= 20000 + 4000 * fit.epochs * 2  # held-out + 2 steps (chunks of 500) per epoch


class ExactMoments:
    """E_{p_lambda}[phi] by enumeration, for every step and the held-out check (se tiny)."""

    def __init__(self, r, features, space):
        self.r, self.features, self.space, self.steps = r, features, space, 0

    def new_epoch(self):
        pass

    def step(self, lam):
        self.steps += 1
        return self.heldout(lam)

    def heldout(self, lam):
        moments = exact_moments(self.r, self.features, lam, self.space).float()
        return MomentEstimate(moments, torch.full_like(moments, 1e-5), 1e9)


def test_each_step_moves_lambda_towards_the_mean_over_all_of_d():
    """With exact model moments, the step lambda += lr_e (mean_D phi - E phi) has the exact MLE as
    its fixed point, reached to 1e-4; a step on the chunk's mean would chase each chunk in turn."""
    r = long_proposal()
    features = Features(["first_bit", "distractor_10101", "supermotif"], MOTIF)  # a finite MLE
    strings = MotifProcess(MOTIF, N).sample_strings(1000, np.random.default_rng(2))
    # two chunks of 500 with very different first-bit means
    data = encode(sorted(strings, key=lambda s: s[0]))
    phi = features(data).double()
    assert abs(float(phi[:500, 0].mean() - phi[500:, 0].mean())) > 0.5
    estimator = ExactMoments(r, features, all_outputs(MAX_LEN))
    cfg = MomentMatchingConfig(lr=6.0, chunk=500, max_epochs=100, patience=100)
    fit = fit_lambda(phi.mean(0).float(), estimator, cfg, steps_per_epoch=2, names=features.names)
    final = exact_moments(r, features, torch.tensor(fit.lam), estimator.space)
    assert float((final - phi.mean(0)).abs().max()) < 1e-4, (final, phi.mean(0))
    assert fit.converged and fit.best_max_z < 2.0  # within 2 of its (tiny) standard errors


def test_training1_stops_once_the_mismatch_is_within_its_own_noise():
    """stop_within_noise: a noisy held-out estimate (se 0.05 per feature) stops the fit at the
    first epoch whose mismatch is within two of its standard errors, long before patience would."""
    r, features = long_proposal(), Features("0001111", MOTIF)
    data = encode(MotifProcess(MOTIF, N).sample_strings(1000, np.random.default_rng(3)))
    target = features(data).mean(0)

    class Noisy(ExactMoments):
        def heldout(self, lam):
            exact = super().heldout(lam)
            return MomentEstimate(exact.moments, torch.full_like(exact.moments, 0.05), 1e4)

    fit = fit_lambda(target, Noisy(r, features, all_outputs(MAX_LEN)),
                     MomentMatchingConfig(lr=4.0, max_epochs=100, patience=100, stop_within_noise=True), 2,
                     names=features.names)
    assert fit.converged and fit.epochs < 20 and fit.best_mismatch < 2 * fit.best_mismatch_se
