"""The defensive mixture q = a r + (1 - a) pi (gam_rl/proposals.py) against exact enumeration: q
normalises, draws carry the exact log q and log r, the GAM's weight is bounded as stated, and IS / SNIS
from q are unbiased for Z and E_{p_lambda}[phi]; Training-1's snis_mix on it matches D's moments exactly."""

import math

import numpy as np
import pytest
import torch

from gam_rl.estimators import importance_z, snis_moments
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.process import MotifProcess
from gam_rl.proposals import DefensiveMixture
from gam_rl.stages.moment_matching import MomentMatchingConfig, moment_matching
from gam_rl.tokens import encode
from tests.conftest import long_proposal
from tests.exact import all_outputs, chi_square, exact_distribution

N, MOTIF, MAX_LEN = 7, "110", 9
A = 0.2


def motif_writer(r: LSTMPolicy) -> LSTMPolicy:
    """Another policy, far from r: long_proposal with another seed and a stronger bias to 1."""
    pi = long_proposal(seed=5, bias=1.2)
    with torch.no_grad():
        pi.head.bias.copy_(torch.tensor([0.2, 1.6, -1.2]))
    return pi


@pytest.fixture(scope="module")
def problem():
    r = long_proposal()
    q = DefensiveMixture(r, motif_writer(r), A)
    features = Features(["first_bit", "distractor_10101", "supermotif"], MOTIF)
    target = gam(r, features, torch.tensor([0.5, -1.0, 1.5]))
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_p, log_z = exact_distribution(target.log_potential(space))
    return r, q, features, target, space, log_p, log_z


def test_the_mixture_is_a_distribution_and_its_draws_carry_exact_log_q_and_log_r(problem):
    r, q, _, _, space, _, _ = problem
    with torch.no_grad():
        log_q = q.log_potential(space)
        assert float(torch.logsumexp(log_q, 0)) == pytest.approx(0.0, abs=1e-5)  # sums to 1 over every output
        # log q = log(a r + (1 - a) pi), each term scored on its own
        r_probs, pi_probs = (m.log_potential(space).double().exp() for m in (r, q.other))
        expected = torch.log(A * r_probs + (1 - A) * pi_probs)
        assert torch.allclose(log_q, expected, atol=1e-6)
    draws = q.sample(4000, MAX_LEN, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(draws.log_prob, q.log_potential(draws.tokens), atol=1e-5)
        assert torch.allclose(draws.log_base, r.log_potential(draws.tokens).double(), atol=1e-5)


def test_draws_follow_the_mixture_chi_square(problem):
    """The empirical distribution of 20000 draws against q by enumeration, over the outputs q gives at least
    5 expected draws (the rest pooled)."""
    _, q, _, _, space, _, _ = problem
    num = 20000
    draws = q.sample(num, MAX_LEN, torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = q.log_potential(space).exp()
    chi2, bound, dof = chi_square(draws.tokens, space, probs)
    assert chi2 < bound, (chi2, bound, dof)


def test_the_gam_weight_under_the_mixture_is_bounded_by_exp_lambda_phi_over_a(problem):
    r, q, _, target, space, _, _ = problem
    draws = q.sample(5000, MAX_LEN, torch.Generator().manual_seed(2))
    with torch.no_grad():
        log_w = target.log_weight(q, draws)  # from the draws' log r and log q, r not scored again
        direct = target.log_potential(draws.tokens).double() - q.log_potential(draws.tokens)
        assert torch.allclose(log_w, direct, atol=1e-5)
        bound = target.log_weight_bound(q, MAX_LEN)
        exact_max = float((target.log_potential(space).double() - q.log_potential(space)).max())
    assert bound == pytest.approx(target.factors[1].log_upper_bound(MAX_LEN) - math.log(A))
    assert exact_max <= bound + 1e-9


def test_importance_sampling_and_snis_from_the_mixture_are_unbiased(problem):
    """Z-hat from q over 40 independent estimates: mean within 3 s.e. of the exact Z; SNIS moments on
    200000 draws within 4 s.e. of the exact E_{p_lambda}[phi]."""
    _, q, features, target, space, log_p, log_z = problem
    generator = torch.Generator().manual_seed(3)
    z_hats = torch.tensor([importance_z(q, target, 2000, 2000, MAX_LEN, generator).z for _ in range(40)])
    se = float(z_hats.std() / math.sqrt(len(z_hats)))
    assert abs(float(z_hats.mean()) - math.exp(log_z)) < 3 * se, (float(z_hats.mean()), math.exp(log_z), se)
    draws = q.sample(200000, MAX_LEN, generator)
    with torch.no_grad():
        estimate = snis_moments(target.log_weight(q, draws), features(draws.tokens))
        exact = (log_p.exp().unsqueeze(1) * features(space).double()).sum(0)
    assert ((estimate.moments.double() - exact).abs() < 4 * estimate.se.double() + 1e-4).all(), (estimate, exact)


def test_training1_snis_mix_matches_data_moments_exactly_enumerated():
    """Training-1 with the mixture as proposal: the exact moments of the kept lambda match mean_D phi (a finite
    MLE), as snis_r's do; the held-out set came from q (its ESS above what r alone would give is not asserted)."""
    data = encode(MotifProcess(MOTIF, N).sample_strings(1000, np.random.default_rng(0)))
    r = long_proposal()
    features = Features(["first_bit", "distractor_10101", "supermotif"], MOTIF)
    cfg = MomentMatchingConfig(estimator="snis_mix", proposal="unused-by-the-stage", mix_r=A, lr=4.0, chunk=500,
                               samples_per_step=4000, buffer=40000, reuse="run", heldout=20000, max_epochs=40,
                               patience=40)
    fit = moment_matching(r, features, data, cfg, max_len=MAX_LEN, seed=1,
                          proposal=DefensiveMixture(r, motif_writer(r), A))
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_p, _ = exact_distribution(gam(r, features, torch.tensor(fit.lam)).log_potential(space))
        model = (log_p.exp().unsqueeze(1) * features(space).double()).sum(0)
    mismatch = float((model - features(data).double().mean(0)).abs().sum())
    assert mismatch < 0.03, (mismatch, fit.lam)
    assert abs(fit.best_mismatch - mismatch) < 4 * fit.best_mismatch_se + 0.01
    # the stage drew from the mixture: snis_r with the same seed draws the same r-samples every time, and its
    # held-out estimate differs (here pi is no closer to p_lambda than r, so the mixture is not the better one)
    from_r = moment_matching(r, features, data, MomentMatchingConfig(
        estimator="snis_r", lr=4.0, chunk=500, samples_per_step=4000, buffer=40000, reuse="run", heldout=20000,
        max_epochs=40, patience=40), max_len=MAX_LEN, seed=1)
    assert abs(fit.best_mismatch_se - from_r.best_mismatch_se) > 1e-4, (fit.best_mismatch_se, from_r.best_mismatch_se)


def test_a_batch_that_draws_nothing_from_one_component_is_fine(problem):
    """Batches of 1 (one component empty every time), and mixtures leaning almost all one way."""
    r, q, _, target, _, _, _ = problem
    g = torch.Generator().manual_seed(4)
    for _ in range(20):
        draws = q.sample(1, MAX_LEN, g)
        assert len(draws) == 1 and torch.isfinite(target.log_weight(q, draws)).all()
    for a in (1e-6, 1 - 1e-6):
        draws = DefensiveMixture(r, q.other, a).sample(50, MAX_LEN, g)
        assert len(draws) == 50 and torch.isfinite(draws.log_prob).all()


def test_the_last_draws_of_a_batch_are_a_sample_of_q_too(problem):
    """Training-1 keeps the last `buffer` draws: with a buffer of half a step, the SNIS moments of what it keeps
    are still unbiased (the mixture's draws come in random order, not one component's after the other's).
    The mean of 40 steps' estimates within 4 s.e. of the exact E_{p_lambda}[phi]."""
    from gam_rl.stages.moment_matching import SampledMoments

    r, q, features, target, space, log_p, _ = problem
    lam = target.factors[1].lam
    cfg = MomentMatchingConfig(estimator="snis_mix", proposal="unused", mix_r=A, samples_per_step=1000, buffer=500,
                               reuse="run", heldout=100)
    sampled = SampledMoments(r, features, cfg, MAX_LEN, torch.Generator().manual_seed(5), proposal=q)
    estimates = torch.stack([sampled.step(lam).moments.double() for _ in range(40)])
    with torch.no_grad():
        exact = (log_p.exp().unsqueeze(1) * features(space).double()).sum(0)
    mean, se = estimates.mean(0), estimates.std(0) / math.sqrt(len(estimates))
    assert ((mean - exact).abs() < 4 * se + 1e-3).all(), (mean, exact, se)
