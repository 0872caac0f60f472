"""Quasi-rejection sampling (Eikema et al. 2022) against exact enumeration (max length 8: 511 outputs).

q is a tiny LSTM, P = q exp(lambda . phi): P/q ranges over e^-4 .. e^4 on q's outputs, so p
is far from q (TV 0.67) and p_beta moves from q to p as beta grows."""

import math

import pytest
import torch
from scipy import stats

from gam_rl.estimators import (
    EstimatorError,
    choose_log_beta,
    qrs_diagnostics,
    quasi_rejection_sample,
    rejection_sample,
)
from gam_rl.features import Features
from gam_rl.methods.distill import DistillConfig, distill
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.stages.mle import MLEConfig
from tests.conftest import long_proposal
from tests.exact import all_outputs

MAX_LEN, MOTIF = 8, "101"
LOG_BETAS = (1.0, 2.5, 3.5)  # exact TV(p, p_beta) about 0.50, 0.33, 0.12


@pytest.fixture(scope="module")
def problem():
    q = long_proposal(seed=0, hidden=8, bias=0.6)
    features = Features("1001111", MOTIF)
    target = gam(q, features, torch.tensor([-3.0, 1.5, -1.0, 2.5, 1.0]))
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_q = q.log_prob(space).double()
        log_w = target.log_potential(space).double() - log_q  # log P/q, P unnormalised (as the sampler sees it)
    log_p = log_q + log_w - torch.logsumexp(log_q + log_w, 0)
    return q, target, space, log_q, log_w, log_p


def exact_qrs(problem, log_beta: float) -> tuple[float, float, float, torch.Tensor]:
    """Acceptance, TV(p, p_beta), KL(p || p_beta) and log p_beta, by enumeration:
    p_beta = min(q, P / beta) / a(beta), a(beta) = sum_x min(q(x), P(x) / beta)."""
    _, _, _, log_q, log_w, log_p = problem
    log_m = log_q + (log_w - log_beta).clamp(max=0.0)  # log min(q, P / beta)
    log_a = torch.logsumexp(log_m, 0)
    log_pb = log_m - log_a
    tv = 0.5 * float((log_p.exp() - log_pb.exp()).abs().sum())
    kl = float((log_p.exp() * (log_p - log_pb)).sum())
    return math.exp(float(log_a)), tv, kl, log_pb


def counts_of(tokens: torch.Tensor, space: torch.Tensor) -> torch.Tensor:
    index = {tuple(row.tolist()): i for i, row in enumerate(space)}
    tokens = torch.nn.functional.pad(tokens, (0, MAX_LEN - tokens.shape[1]), value=3)
    return torch.bincount(torch.tensor([index[tuple(t)] for t in tokens.tolist()]), minlength=len(space)).double()


def chi_square_pvalue(counts: torch.Tensor, log_expected: torch.Tensor) -> float:
    expected = log_expected.exp() * counts.sum()
    big = expected >= 5  # pool the rare outcomes into one bin
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    return float(stats.chisquare(obs.numpy(), exp.numpy()).pvalue)


def test_qrs_diagnostics_agree_with_enumeration(problem):
    """Z is unknown to the estimator (self-normalised): with 100k draws of q, each estimate is
    within 5 of its standard errors of the exact value; the standard error comes from the
    spread over 20 independent batches of 5k (the estimators are smooth functions of means:
    their variance falls as 1/N). Their O(1/N) bias is far below that."""
    q, target, *_ = problem
    batches, per = 20, 5_000
    samples = q.sample(batches * per, MAX_LEN, torch.Generator().manual_seed(1))
    log_w = target.log_weight(q, samples)
    full = qrs_diagnostics(log_w, torch.tensor(LOG_BETAS))
    parts = [qrs_diagnostics(log_w[k * per:(k + 1) * per], torch.tensor(LOG_BETAS)) for k in range(batches)]
    for j, log_beta in enumerate(LOG_BETAS):
        acceptance, tv, kl, _ = exact_qrs(problem, log_beta)
        assert full[j].log_beta == log_beta
        for name, exact in (("acceptance", acceptance), ("tv", tv), ("kl", kl)):
            spread = torch.tensor([getattr(p[j], name) for p in parts], dtype=torch.float64).std()
            se = float(spread) / math.sqrt(batches)
            estimate = getattr(full[j], name)
            assert abs(estimate - exact) <= 5 * se, (log_beta, name, estimate, exact, se)
            assert 0 < se < 0.01  # the check has teeth: 100k draws pin each value to < 0.05
    # acceptance falls and p_beta approaches p as beta grows
    assert full[0].acceptance > full[1].acceptance > full[2].acceptance
    assert full[0].tv > full[1].tv > full[2].tv > 0.05 and full[0].kl > full[1].kl > full[2].kl > 0


def test_qrs_is_rejection_sampling_above_the_bound(problem):
    q, target, *_ = problem
    log_bound = target.log_weight_bound(q, MAX_LEN)  # sum of the positive lambdas: 5
    max_log_w = float(problem[4].max())  # the enumerated max P/q: e^4
    assert max_log_w <= log_bound
    log_w = target.log_weight(q, q.sample(20_000, MAX_LEN, torch.Generator().manual_seed(4)))
    for diag in qrs_diagnostics(log_w, [max_log_w, log_bound, log_bound + 3]):
        assert diag.tv == 0.0 and diag.kl == 0.0
        # a = Z-hat / beta exactly
        assert diag.acceptance == pytest.approx(math.exp(float(torch.logsumexp(log_w, 0)) - math.log(len(log_w))
                                                         - diag.log_beta), rel=1e-12)
    rs = rejection_sample(q, target, 500, MAX_LEN, 2_000, 10**6, torch.Generator().manual_seed(5))
    qrs = quasi_rejection_sample(q, target, 500, MAX_LEN, 2_000, 10**6, log_bound, torch.Generator().manual_seed(5))
    assert torch.equal(qrs.tokens, rs.tokens)
    assert (qrs.proposals, qrs.accepted, qrs.acceptance_rate) == (rs.proposals, rs.accepted, rs.acceptance_rate)
    assert qrs.log_beta == log_bound


def test_qrs_samples_follow_p_beta_not_p(problem):
    q, target, space, _, _, log_p = problem
    log_beta = 2.0
    acceptance, tv, _, log_pb = exact_qrs(problem, log_beta)
    assert tv > 0.35  # p_beta is far from p here
    draws = 4_000
    qrs = quasi_rejection_sample(q, target, draws, MAX_LEN, 5_000, 10**6, log_beta, torch.Generator().manual_seed(6))
    assert len(qrs.tokens) == draws and qrs.log_beta == log_beta
    assert abs(qrs.acceptance_rate - acceptance) <= 5 * math.sqrt(acceptance * (1 - acceptance) / qrs.proposals)
    counts = counts_of(qrs.tokens, space)
    assert chi_square_pvalue(counts, log_pb) > 1e-4
    assert chi_square_pvalue(counts, log_p) < 1e-12  # the same test refuses p
    # in total variation: the empirical distribution of n draws of p_beta is within about
    # 1/2 sum_x sqrt(p_beta(x) (1 - p_beta(x)) / n) of p_beta (E|count/n - p| <= its sd), 0.09
    # here, and so at least TV(p, p_beta) - that from p
    pb = log_pb.exp()
    noise = 0.5 * float(torch.sqrt(pb * (1 - pb) / draws).sum())
    empirical = counts / draws
    assert 0.5 * float((empirical - pb).abs().sum()) < 1.2 * noise < tv - 1.2 * noise
    assert 0.5 * float((empirical - log_p.exp()).abs().sum()) > tv - 1.2 * noise


def test_choose_log_beta_hits_its_target_on_the_pilot(problem):
    q, target, *_ = problem
    pilot = target.log_weight(q, q.sample(20_000, MAX_LEN, torch.Generator().manual_seed(7)))
    fixed = choose_log_beta(pilot, beta=5.0)
    assert fixed.log_beta == math.log(5.0) and fixed == qrs_diagnostics(pilot, [math.log(5.0)])[0]
    hit = choose_log_beta(pilot, target_acceptance=0.3)
    assert hit.acceptance == pytest.approx(0.3, rel=1e-9)
    assert qrs_diagnostics(pilot, [hit.log_beta])[0] == hit
    low = choose_log_beta(pilot, target_acceptance=0.01)  # below Z-hat / max w: beyond max w, exact
    z_hat = float(pilot.double().exp().mean())
    assert low.log_beta == pytest.approx(math.log(z_hat / 0.01)) and low.tv == low.kl == 0.0
    assert low.acceptance == pytest.approx(0.01)
    assert choose_log_beta(pilot, target_acceptance=1.0).log_beta == float(pilot.min())  # every weight > 0 here
    for max_tv in (0.3, 0.05):
        chosen = choose_log_beta(pilot, max_tv=max_tv)
        assert chosen.tv <= max_tv and chosen.tv == pytest.approx(max_tv, abs=1e-6)
        # the smallest such beta: a little below it, TV is above max_tv
        assert qrs_diagnostics(pilot, [chosen.log_beta - 1e-4])[0].tv > max_tv
    loose = choose_log_beta(pilot, max_tv=0.9)  # p_beta = q already passes: beta = min w, acceptance 1
    assert loose.log_beta == float(pilot.min()) and loose.acceptance == 1.0


def test_choose_log_beta_refuses_impossible_input():
    log_w = torch.tensor([0.0, 1.0, -math.inf, -math.inf])
    with pytest.raises(EstimatorError, match="every importance weight is zero"):
        choose_log_beta(torch.full((10,), -math.inf), max_tv=0.1)
    with pytest.raises(EstimatorError, match="above the highest acceptance any beta reaches, 0.5"):
        choose_log_beta(log_w, target_acceptance=0.6)  # half the proposals have P = 0
    with pytest.raises(ValueError, match="exactly one of"):
        choose_log_beta(log_w, beta=1.0, max_tv=0.1)
    with pytest.raises(ValueError, match="exactly one of"):
        choose_log_beta(log_w)
    with pytest.raises(ValueError, match="max_tv=1.5"):
        choose_log_beta(log_w, max_tv=1.5)
    with pytest.raises(EstimatorError, match="NaN"):
        qrs_diagnostics(torch.tensor([0.0, math.nan]), [0.0])


def test_qrs_gives_up_with_a_clear_error(problem):
    q, target, *_ = problem
    with pytest.raises(EstimatorError, match="quasi-rejection sampling accepted .* max_proposals=3000"):
        quasi_rejection_sample(q, target, 100_000, MAX_LEN, 1000, 3000, 4.0)


@pytest.mark.parametrize("options, words", [
    (dict(sampler="qrs"), "method.sampler='qrs' with no beta setting"),
    (dict(sampler="qrs", beta=2.0, max_tv=0.1), "method.sampler='qrs' with method.beta=2.0, method.max_tv=0.1"),
    (dict(sampler="qrs", target_acceptance=0.5, max_tv=0.1), "exactly one of method.beta, method.target_acceptance"),
    (dict(sampler="rs", target_acceptance=0.5), "method.sampler='rs' with method.target_acceptance=0.5"),
    (dict(sampler="qrs", max_tv=0.1, pilot=5000, max_proposals=4000), "method.pilot=5000"),
])
def test_distill_config_problems_name_the_keys(options, words):
    problems = DistillConfig(name="distill", **options).problems()
    assert len(problems) == 1 and words in problems[0], problems


def test_distill_config_good_combinations_have_no_problems():
    assert DistillConfig(name="distill").problems() == []
    for key, value in (("beta", 3.0), ("target_acceptance", 0.2), ("max_tv", 0.01)):
        assert DistillConfig(name="distill_qrs", sampler="qrs", **{key: value}).problems() == []


def test_distill_with_qrs_end_to_end(problem):
    q, target, *_ = problem
    empty = torch.empty(0, 1, dtype=torch.long)
    mle = MLEConfig(lr=0.02, batch_size=100, max_epochs=2, patience=2, clip=1.0)
    cfg = DistillConfig(name="distill_qrs", size=300, valid_size=100, proposal_batch=2_000, max_proposals=1e6,
                        mle=mle, sampler="qrs", max_tv=0.05, pilot=5_000)
    torch.manual_seed(8)
    fit = distill(LSTMPolicy(8, 1, dropout=0.0), q, target, empty, empty, cfg, max_len=MAX_LEN,
                  symbols_per_seq=MAX_LEN, seed=9)
    res = fit.results()
    assert res["distill_sampler"] == "qrs" and res["distill_qrs_tv"] <= 0.05
    assert res["distill_qrs_kl"] >= 0 and 0 < res["distill_qrs_acceptance_est"] < 1
    assert res["distill_log_beta"] < target.log_weight_bound(q, MAX_LEN)
    assert res["distill_proposals"] >= 5_000 + 400 and 0 < res["distill_acceptance_rate"] < 1
    assert math.isfinite(res["distill_ce_valid_mixed"]) and res["t2_epochs"] >= 1
    rs = distill(LSTMPolicy(8, 1, dropout=0.0), q, target, empty, empty,
                 DistillConfig(name="distill", size=300, valid_size=100, proposal_batch=2_000, max_proposals=1e6,
                               mle=mle), max_len=MAX_LEN, symbols_per_seq=MAX_LEN, seed=9).results()
    assert rs["distill_sampler"] == "rs" and rs["distill_log_beta"] == target.log_weight_bound(q, MAX_LEN)
    assert rs["distill_qrs_tv"] is rs["distill_qrs_kl"] is rs["distill_qrs_acceptance_est"] is None
