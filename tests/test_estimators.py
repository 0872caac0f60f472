"""Estimators against exact enumeration on a small problem (max length 8: 511 outputs)."""

import math

import pytest
import torch
from scipy import stats

from gam_rl.estimators import (
    EstimatorError,
    ExpectedAccepts,
    check_unit_box,
    cross_entropy_p_lambda,
    effective_sample_size,
    importance_z,
    rejection_log_bound,
    rejection_sample,
    snis_moments,
    thin_by_weight,
)
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import GAMPotential, TrueProcessPotential
from gam_rl.process import MotifProcess
from tests.exact import all_outputs, exact_distribution

MAX_LEN, MOTIF = 8, "101"


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    r = LSTMPolicy(8, 1, dropout=0.0).eval()
    with torch.no_grad():
        r.head.bias.copy_(torch.tensor([0.6, 0.6, -0.6]))
    features = Features("1001111", MOTIF)
    lam = torch.tensor([-2.0, 0.7, -0.5, 1.0, 0.3])
    gam = GAMPotential(r, features, lam)
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_p, log_z = exact_distribution(gam.log_potential(space))
        phi = features(space)
    exact_moments = (log_p.exp().unsqueeze(1) * phi.double()).sum(0)
    return r, features, lam, gam, space, log_p, log_z, phi, exact_moments


def test_snis_moments_converge_to_exact(problem):
    r, features, lam, _, _, _, _, _, exact_moments = problem
    samples = r.sample(200_000, MAX_LEN, torch.Generator().manual_seed(1))
    phi = features(samples.tokens)
    log_w = phi @ lam
    est = snis_moments(log_w, phi)
    # delta-method standard error of SNIS: sqrt(sum_i wbar_i^2 (phi_i - mu)^2)
    wbar = torch.softmax(log_w.double(), 0).unsqueeze(1)
    se = torch.sqrt((wbar**2 * (phi.double() - est.moments.double()) ** 2).sum(0))
    assert torch.all((est.moments.double() - exact_moments).abs() <= 5 * se + 1e-6), (est.moments, exact_moments, se)
    assert 0 < est.ess <= len(log_w)


def test_rejection_samples_are_exact_goodness_of_fit(problem):
    r, features, lam, gam, space, log_p, log_z, _, exact_moments = problem
    draws = 30_000
    rs = rejection_sample(r, features, features.names, lam, rejection_log_bound(lam), draws, MAX_LEN,
                          20_000, 10**8, torch.Generator().manual_seed(2))
    assert len(rs.tokens) == draws and 0 < rs.acceptance_rate < 1
    # acceptance rate = Z / beta, with Z = E_r[exp(lam . phi)] exactly known here
    rate = math.exp(log_z - rejection_log_bound(lam))
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
    generator = torch.Generator().manual_seed(3)

    def draw(k):
        samples = r.sample(k, MAX_LEN, generator)
        return samples, features(samples.tokens) @ lam

    z = importance_z(draw, 100_000, 20_000)
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
    r, features, lam, _, _, _, log_z, _, _ = problem
    generator = torch.Generator().manual_seed(5)

    def draw(k):
        samples = r.sample(k, MAX_LEN, generator)
        return samples, features(samples.tokens) @ lam

    z = importance_z(draw, 1_000_000, 2_000, rel_tol=0.02, min_samples=4_000)
    # stops at the first batch past min_samples where rel_se <= tol: far below the 1M cap
    assert z.rel_se <= 0.02 and 4_000 <= z.num < 1_000_000 and z.num % 2_000 == 0
    assert abs(z.log_z - log_z) <= 4 * z.rel_se
    loose = importance_z(draw, 1_000_000, 2_000, rel_tol=10.0, min_samples=6_000)
    assert loose.num == 6_000  # never before min_samples


def test_importance_z_tolerance_waits_for_the_heavy_tail():
    # one weight of 5000 in every 5000 draws, the rest 1: Z = (4999 + 5000) / 5000 ~ 2.
    # Before the first heavy draw the weights look uniform (rel_se = 0) and Z-hat = 1.
    def stream():
        drawn, heavy = 0, 0

        def draw(k):
            nonlocal drawn, heavy
            is_heavy = torch.arange(drawn, drawn + k) % 5000 == 4999
            drawn, heavy = drawn + k, heavy + int(is_heavy.sum())
            return None, torch.where(is_heavy, math.log(5000.0), 0.0).double()

        return draw, lambda: heavy >= 10

    draw, _ = stream()
    blind = importance_z(draw, 1_000_000, 2_000, rel_tol=0.2, min_samples=4_000)
    assert blind.num == 4_000 and blind.z == pytest.approx(1.0)  # the failure the tail test prevents
    draw, tail_seen = stream()
    z = importance_z(draw, 1_000_000, 2_000, rel_tol=0.2, min_samples=4_000, tail_seen=tail_seen)
    assert z.num == 50_000 and z.z == pytest.approx(9999 / 5000) and z.rel_se <= 0.2


def test_expected_accepts_waits_for_a_rare_negatively_weighted_motif():
    # GAM-like weights: the motif feature is 1 when the motif is ABSENT, lambda = -10, so the
    # rare strings WITH the motif (1 in 5000 here) carry the mass; a common feature has lambda 0.3
    lam = torch.tensor([-10.0, 0.3])
    drawn = 0

    def draw(k):
        nonlocal drawn
        absent = (torch.arange(drawn, drawn + k) % 5000 != 4999).double()
        phi = torch.stack([absent, torch.ones(k, dtype=torch.float64)], 1)
        drawn += k
        log_w = phi @ lam.double()
        accepts.add(log_w)
        return None, log_w

    exact_z = (4999 * math.exp(-9.7) + math.exp(0.3)) / 5000
    accepts = ExpectedAccepts(rejection_log_bound(lam), 10)
    blind = importance_z(draw, 1_000_000, 2_000, rel_tol=0.3, min_samples=4_000)
    assert blind.num == 4_000 and blind.z < exact_z / 5  # no motif drawn yet: rel_se 0, Z-hat 5x too low
    drawn, accepts = 0, ExpectedAccepts(rejection_log_bound(lam), 10)
    z = importance_z(draw, 1_000_000, 2_000, rel_tol=0.3, min_samples=4_000, tail_seen=accepts)
    # each 5000 draws hold 1.23 expected accepts (the motif string w / beta = 1, the other 4999 e^-10 each):
    # >= 10 from 40750 draws on, then the first batch with rel_se <= 0.3
    assert 40_000 <= z.num <= 56_000 and abs(z.z / exact_z - 1) < 0.3 and accepts.value >= 10


def test_true_process_potential_has_exact_log_z():
    process = MotifProcess("11", 6)
    pot = TrueProcessPotential(process)
    log_p, log_z = exact_distribution(pot.log_potential(all_outputs(7)))
    assert log_z == pytest.approx(pot.log_z, abs=1e-6)  # float32 potentials
    assert int((log_p > -math.inf).sum()) == process.num_strings


def test_degenerate_weights_raise_instead_of_nan():
    phi = torch.ones(4, 2)
    with pytest.raises(EstimatorError, match="zero"):
        snis_moments(torch.full((4,), -math.inf), phi)
    with pytest.raises(EstimatorError, match="NaN"):
        snis_moments(torch.tensor([0.0, float("nan"), 0.0, 0.0]), phi)
    with pytest.raises(EstimatorError, match="zero"):
        importance_z(lambda k: (None, torch.full((k,), -math.inf)), 10, 5)
    assert effective_sample_size(torch.zeros(10)) == pytest.approx(10.0)


def test_rejection_refuses_features_outside_unit_interval():
    with pytest.raises(EstimatorError, match="in \\[0, 1\\]"):
        check_unit_box(torch.tensor([[0.5, 1.2]]), ["M", "motif"])


def test_rejection_gives_up_with_a_clear_error(problem):
    r, features, _, _, _, _, _, _, _ = problem
    lam = torch.tensor([-60.0, 0.0, 0.0, 0.0, 0.0])  # essentially only motif strings accepted... almost never
    gam = GAMPotential(r, features, lam)
    with pytest.raises(EstimatorError, match="max_proposals"):
        rejection_sample(r, features, features.names, gam.lam, 100.0, 10, MAX_LEN, 1000, 3000)


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
