"""Estimators against exact enumeration on a small problem (max length 8: 511 outputs)."""

import math

import pytest
import torch
from scipy import stats

from gam_rl.estimators import (
    EstimatorError,
    cross_entropy_p_lambda,
    effective_sample_size,
    importance_z,
    rejection_moments,
    rejection_sample,
    snis_moment_gap,
    snis_moments,
    thin_by_weight,
)
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy, Samples
from gam_rl.potentials import Potential, Tilt, TrueProcess, gam
from gam_rl.process import MotifProcess
from tests.conftest import long_proposal
from tests.exact import all_outputs, exact_distribution

MAX_LEN, MOTIF = 8, "101"


@pytest.fixture(scope="module")
def problem():
    r = long_proposal(seed=0, hidden=8, bias=0.6)
    features = Features("1001111", MOTIF)
    lam = torch.tensor([-2.0, 0.7, -0.5, 1.0, 0.3])
    p_lambda = gam(r, features, lam)
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_p, log_z = exact_distribution(p_lambda.log_potential(space))
        phi = features(space)
    exact_moments = (log_p.exp().unsqueeze(1) * phi.double()).sum(0)
    return r, features, lam, p_lambda, space, log_p, log_z, phi, exact_moments


class Stream(Potential):
    """A proposal and target pair with synthetic log-weights: weight(i) for the i-th draw."""

    def __init__(self, weight, log_bound=None):
        self.weight, self.log_bound, self.drawn = weight, log_bound, 0

    def sample(self, k, max_len, generator=None):
        index = torch.arange(self.drawn, self.drawn + k)
        self.drawn += k
        return Samples(index.unsqueeze(1), torch.zeros(k), torch.ones(k, dtype=torch.bool))

    def log_weight(self, proposal, samples):
        return self.weight(samples.tokens[:, 0]).double()

    def log_weight_bound(self, proposal, max_len):
        return self.log_bound


def test_snis_moments_converge_to_exact(problem):
    r, features, lam, _, _, _, _, _, exact_moments = problem
    samples = r.sample(200_000, MAX_LEN, torch.Generator().manual_seed(1))
    phi = features(samples.tokens)
    log_w = phi @ lam
    est = snis_moments(log_w, phi)
    # within 5 of its own delta-method standard errors, which are small (200k draws)
    assert torch.all((est.moments.double() - exact_moments).abs() <= 5 * est.se + 1e-6), (est, exact_moments)
    assert torch.all(est.se < 0.01) and 0 < est.ess <= len(log_w)
    # the standard error is honest: over 40 independent estimates of 2000 draws, the spread matches it
    runs = [snis_moments(phi[i::100] @ lam, phi[i::100]) for i in range(40)]
    spread = torch.stack([e.moments for e in runs]).double().std(0)
    mean_se = torch.stack([e.se for e in runs]).double().mean(0)
    assert torch.all((spread / mean_se - 1).abs() < 0.5), (spread, mean_se)


def test_snis_moment_gap_is_exact_in_expectation_with_an_honest_standard_error(problem):
    """E_p[phi] - E_r[phi] from draws of r alone: the exact difference within 5 s.e. (200k draws), and
    over 40 estimates of 2000 draws the spread matches the delta-method s.e.; with q = p (constant
    weights) the gap and its s.e. are exactly 0."""
    r, features, lam, _, space, _, _, phi_space, exact_moments = problem
    with torch.no_grad():
        r_moments = (r.log_prob(space).double().exp().unsqueeze(1) * phi_space.double()).sum(0)
    exact_gap = exact_moments - r_moments
    samples = r.sample(200_000, MAX_LEN, torch.Generator().manual_seed(3))
    phi = features(samples.tokens)
    est = snis_moment_gap(phi @ lam, phi)
    assert torch.all((est.gap - exact_gap).abs() <= 5 * est.se), (est, exact_gap)
    assert torch.all(exact_gap.abs() > 10 * est.se)  # a gap this size is seen, not lost in the noise
    runs = [snis_moment_gap(phi[i::100] @ lam, phi[i::100]) for i in range(40)]
    spread = torch.stack([e.gap for e in runs]).std(0)
    mean_se = torch.stack([e.se for e in runs]).mean(0)
    assert torch.all((spread / mean_se - 1).abs() < 0.5), (spread, mean_se)
    same = snis_moment_gap(torch.full((len(phi),), -3.0), phi)  # p = q: paired, so no noise at all
    assert torch.all(same.gap.abs() < 1e-12) and torch.all(same.se < 1e-12) and same.ess == pytest.approx(len(phi))


def test_rejection_moments_are_exact_in_expectation(problem):
    r, features, lam, p_lambda, _, _, _, _, exact_moments = problem
    samples = r.sample(200_000, MAX_LEN, torch.Generator().manual_seed(21))
    est = rejection_moments(features(samples.tokens) @ lam, features(samples.tokens),
                            p_lambda.log_weight_bound(r, MAX_LEN), torch.Generator().manual_seed(22))
    assert torch.all((est.moments.double() - exact_moments).abs() <= 5 * est.se.double() + 1e-6)
    assert est.ess < 200_000
    assert rejection_moments(torch.full((5,), -50.0), torch.ones(5, 2), 0.0) is None  # nothing accepted


def test_rejection_samples_are_exact_goodness_of_fit(problem):
    r, features, lam, gam, space, log_p, log_z, _, exact_moments = problem
    draws = 30_000
    rs = rejection_sample(r, gam, draws, MAX_LEN, 20_000, 10**8, torch.Generator().manual_seed(2))
    assert len(rs.tokens) == draws and 0 < rs.acceptance_rate < 1
    # acceptance rate = Z / beta, with Z = E_r[exp(lam . phi)] exactly known here and
    # log beta = sum_k max(lam_k, 0) for binary features (the GAM's bound on P_lambda / r)
    log_beta = gam.log_weight_bound(r, MAX_LEN)
    assert log_beta == pytest.approx(float(lam.clamp(min=0).sum()))
    rate = math.exp(log_z - log_beta)
    assert abs(rs.acceptance_rate - rate) <= 5 * math.sqrt(rate * (1 - rate) / rs.proposals)
    index = {tuple(row.tolist()): i for i, row in enumerate(space)}
    tokens = torch.nn.functional.pad(rs.tokens, (0, MAX_LEN - rs.tokens.shape[1]), value=3)
    counts = torch.bincount(torch.tensor([index[tuple(t)] for t in tokens.tolist()]), minlength=len(space)).double()
    expected = log_p.exp() * draws
    big = expected >= 5  # pool the rare outcomes into one bin
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    assert stats.chisquare(obs.numpy(), exp.numpy()).pvalue > 1e-4
    mean_phi = features(rs.tokens).double().mean(0)
    se = torch.sqrt((exact_moments * (1 - exact_moments)) / draws)  # binary features
    assert torch.all((mean_phi - exact_moments).abs() <= 5 * se + 1e-6)


def test_importance_z_and_cross_entropy_within_standard_error(problem):
    r, features, lam, gam, space, log_p, log_z, _, _ = problem
    z = importance_z(r, gam, 100_000, 20_000, MAX_LEN, torch.Generator().manual_seed(3))
    # P_lambda = r exp(lam.phi) and r sums to 1 over the space, so log Z is exact here
    assert abs(z.log_z - log_z) <= 4 * z.rel_se, (z.log_z, log_z, z.rel_se)
    assert 0 < z.ess <= z.num and z.rel_se < 0.02
    test = space[torch.multinomial(log_p.exp(), 2000, replacement=True, generator=torch.Generator().manual_seed(4))]
    with torch.no_grad():
        log_pot = gam.log_potential(test)
    ce, se = cross_entropy_p_lambda(log_pot, z, MAX_LEN)
    exact_ce = -float((log_pot.double() - log_z).mean()) / MAX_LEN
    assert abs(ce - exact_ce) <= 4 * se and se > 0


def test_importance_z_stops_at_the_tolerance(problem):
    r, features, lam, p_lambda, _, _, log_z, _, _ = problem
    generator = torch.Generator().manual_seed(5)
    z = importance_z(r, p_lambda, 1_000_000, 2_000, MAX_LEN, generator, rel_tol=0.02, min_samples=4_000)
    # stops at the first batch past min_samples where rel_se <= tol: far below the 1M cap
    assert z.rel_se <= 0.02 and 4_000 <= z.num < 1_000_000 and z.num % 2_000 == 0
    assert abs(z.log_z - log_z) <= 4 * z.rel_se
    loose = importance_z(r, p_lambda, 1_000_000, 2_000, MAX_LEN, generator, rel_tol=10.0, min_samples=6_000)
    assert loose.num == 6_000  # never before min_samples


def test_importance_z_tolerance_waits_for_the_heavy_tail():
    # one weight of 5000 in every 5000 draws, the rest 1: Z = (4999 + 5000) / 5000 ~ 2.
    # Before the first heavy draw the weights look uniform (rel_se = 0) and Z-hat = 1.
    def stream():
        return Stream(lambda i: torch.where(i % 5000 == 4999, math.log(5000.0), 0.0), log_bound=math.log(5000.0))

    blind = stream()
    z = importance_z(blind, blind, 1_000_000, 2_000, 1, rel_tol=0.2, min_samples=4_000)
    assert z.num == 4_000 and z.z == pytest.approx(1.0)  # the failure the tail test prevents
    seen = stream()
    # each 5000 draws hold 4999/5000 + 1 expected rejection accepts: >= 10 after ~25000
    z = importance_z(seen, seen, 1_000_000, 2_000, 1, rel_tol=0.2, min_samples=4_000, tail_hits=10)
    assert 25_000 <= z.num <= 50_000 and z.rel_se <= 0.2 and abs(z.z / (9999 / 5000) - 1) < 0.4


def test_expected_accepts_waits_for_a_rare_negatively_weighted_motif():
    # GAM-like weights: the motif feature is 1 when the motif is ABSENT, lambda = -10, so the
    # rare strings WITH the motif (1 in 5000 here) carry the mass; a common feature has lambda 0.3
    lam = torch.tensor([-10.0, 0.3], dtype=torch.float64)

    def stream():
        def weight(i):
            absent = (i % 5000 != 4999).double()
            return torch.stack([absent, torch.ones(len(i), dtype=torch.float64)], 1) @ lam
        return Stream(weight, log_bound=0.3)  # sum_k max(lambda_k, 0): the GAM bound

    exact_z = (4999 * math.exp(-9.7) + math.exp(0.3)) / 5000
    blind = stream()
    z = importance_z(blind, blind, 1_000_000, 2_000, 1, rel_tol=0.3, min_samples=4_000)
    assert z.num == 4_000 and z.z < exact_z / 5  # no motif drawn yet: rel_se 0, Z-hat 5x too low
    seen = stream()
    z = importance_z(seen, seen, 1_000_000, 2_000, 1, rel_tol=0.3, min_samples=4_000, tail_hits=10)
    # each 5000 draws hold 1.23 expected accepts (the motif string w / beta = 1, the other 4999 e^-10 each):
    # >= 10 from 40750 draws on, then the first batch with rel_se <= 0.3
    assert 40_000 <= z.num <= 56_000 and abs(z.z / exact_z - 1) < 0.3


def test_true_process_potential_has_exact_log_z():
    process = MotifProcess("11", 6)
    pot = TrueProcess(process)
    log_p, log_z = exact_distribution(pot.log_potential(all_outputs(7)))
    assert log_z == pytest.approx(pot.log_z, abs=1e-6)  # float32 potentials
    assert int((log_p > -math.inf).sum()) == process.num_strings


def test_degenerate_weights_raise_instead_of_nan():
    phi = torch.ones(4, 2)
    with pytest.raises(EstimatorError, match="zero"):
        snis_moments(torch.full((4,), -math.inf), phi)
    with pytest.raises(EstimatorError, match="NaN"):
        snis_moments(torch.tensor([0.0, float("nan"), 0.0, 0.0]), phi)
    zeros = Stream(lambda i: torch.full((len(i),), -math.inf))
    with pytest.raises(EstimatorError, match="zero"):
        importance_z(zeros, zeros, 10, 5, 1)
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10.0)


def test_rejection_bounds_hold_with_length_features_past_one():
    # M = |x| / 4 reaches 2 at 8 bits: the bound uses each feature's range at the sampling length
    features = Features("Mv1001111", MOTIF, max_len=4)
    lam = torch.tensor([0.5, -0.3, -2.0, 0.7, -0.5, 1.0, 0.3])
    tilt = Tilt(features, lam)
    bound = tilt.log_upper_bound(MAX_LEN)
    assert float(tilt.log_potential(all_outputs(MAX_LEN)).max()) <= bound + 1e-6
    assert bound == pytest.approx(0.5 * 2 + 0.7 + 1.0 + 0.3)  # M <= 2 (v <= 4 with a negative weight: 0)


def test_rejection_refuses_a_pair_without_a_bound(problem):
    r, features, lam, _, _, _, _, _, _ = problem
    other = LSTMPolicy(8, 1, dropout=0.0)
    with pytest.raises(EstimatorError, match="no known bound"):
        rejection_sample(other, gam(r, features, lam), 10, MAX_LEN, 100, 1000)


def test_rejection_gives_up_with_a_clear_error(problem):
    r, _, _, p_lambda, _, _, _, _, _ = problem
    with pytest.raises(EstimatorError, match="max_proposals=3000"):  # 10^5 accepts cannot come from 3000
        rejection_sample(r, p_lambda, 100_000, MAX_LEN, 1000, 3000)


def test_thinning_is_unbiased_and_respects_the_budget():
    gen = torch.Generator().manual_seed(11)
    log_w = torch.cat([torch.tensor([3.0, 2.0, 1.5]), torch.randn(5000) * 2 - 12])  # a few heavy, many light
    f = torch.randn(len(log_w), dtype=torch.float64)
    exact = float((log_w.double().exp() * f).sum())
    estimates, kept = [], []
    for _ in range(400):
        keep, new_log_w = thin_by_weight(log_w, 100, gen)
        estimates.append(float((new_log_w.double().exp() * f[keep]).sum()))
        kept.append(len(keep))
        assert {0, 1, 2} <= set(keep.tolist())  # heavy items are always kept
    estimates = torch.tensor(estimates, dtype=torch.float64)
    se = float(estimates.std() / len(estimates) ** 0.5)
    assert abs(float(estimates.mean()) - exact) <= 4 * se + 1e-12
    assert abs(sum(kept) / len(kept) - 100) < 5
    keep, same = thin_by_weight(log_w[:50], 100, gen)  # budget above n: untouched
    assert len(keep) == 50 and torch.equal(same, log_w[:50])
    # all weights zero (a true target no draw has hit): the estimate is exactly 0, one zero item kept
    keep, zero = thin_by_weight(torch.full((500,), -math.inf), 100, gen)
    assert len(keep) == 1 and torch.isneginf(zero).all()
    with pytest.raises(EstimatorError, match="NaN"):
        thin_by_weight(torch.tensor([0.0, float("nan")] * 100), 100, gen)
    # c <= max w: flat weights are kept whole (sum w / max w = 1000 items), one dominant weight always
    assert len(thin_by_weight(torch.zeros(1000), 1, gen)[0]) == 1000
    assert thin_by_weight(torch.cat([torch.zeros(1), torch.full((999,), -30.0)]), 1, gen)[0][0] == 0
