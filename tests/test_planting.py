"""The planted proposal (gam_rl/planting.py) against exact enumeration: q(x) = (1/K) sum_j q_j(x) normalises,
holds its stated values on hand-made strings, its sampler follows it, the mixture with the loop's proposal
gives unbiased importance-sampling estimates, and the Training-2 loop draws from it with method.plant_motif."""

import math

import pytest
import torch

from gam_rl.estimators import importance_z
from gam_rl.features import Features
from gam_rl.methods.dpg import DPGConfig
from gam_rl.methods.draws import ProposalDraws
from gam_rl.patterns import occurs
from gam_rl.planting import MotifPlanting, PlantedMixture
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import gam
from gam_rl.tokens import encode
from tests.conftest import long_proposal, train_method
from tests.exact import all_outputs, chi_square, exact_distribution, kl
from tests.test_training2 import gam_problem

N, MOTIF, MAX_LEN = 7, "110", 9
K = N - len(MOTIF) + 1  # starts j = 0 .. 4


@pytest.fixture(scope="module")
def problem():
    r = long_proposal()
    planting = MotifPlanting(r, MOTIF, N)
    # P_lambda = r exp(lambda . phi): the motif feature is 1 where the motif is absent, so lambda < 0 favours it
    target = gam(r, Features(["motif", "first_bit"], MOTIF), torch.tensor([-4.0, 0.5]))
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        log_p, log_z = exact_distribution(target.log_potential(space))
    return r, planting, target, space, log_p, log_z


def test_planting_is_a_distribution_and_its_draws_carry_exact_log_q_and_log_r(problem):
    r, planting, _, space, _, _ = problem
    with torch.no_grad():
        assert float(torch.logsumexp(planting.log_potential(space), 0)) == pytest.approx(0.0, abs=1e-6)
    draws = planting.sample(3000, MAX_LEN, torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(draws.log_prob, planting.log_potential(draws.tokens), atol=1e-5)
        assert torch.allclose(draws.log_base, r.log_potential(draws.tokens).double(), atol=1e-5)
    # every draw holds the motif, unless r ended it before its start
    ended_early = (draws.tokens[:, : N - len(MOTIF)] == 2).any(1)
    assert bool((occurs(draws.tokens, MOTIF) | ended_early).all())


def test_planting_probabilities_of_hand_made_strings(problem):
    """q of strings whose terms can be read off: the empty string ends before every start j >= 1 (q_0 needs the
    motif at 0); a string without the motif is out of reach once it runs past every start; a string with the
    motif at j = 0 and j = 3 has those two terms, r(x) / r(motif at j | prefix)."""
    r, planting, _, _, _, _ = problem
    tokens = encode(["", "0000000", "1101100"])
    with eval_mode(r), torch.no_grad():
        per_symbol = r.token_log_probs(tokens).double()
        log_r = per_symbol.sum(1)
        log_q = planting.log_potential(tokens)
    assert float(log_q[0]) == pytest.approx(float(log_r[0]) + math.log((K - 1) / K), abs=1e-9)
    assert float(log_q[1]) == -math.inf
    at = [float(log_r[2] - per_symbol[2, j : j + 3].sum()) for j in (0, 3)]
    assert float(log_q[2]) == pytest.approx(math.log((math.exp(at[0]) + math.exp(at[1])) / K), abs=1e-9)


def test_planted_draws_follow_q_chi_square(problem):
    _, planting, _, space, _, _ = problem
    draws = planting.sample(20000, MAX_LEN, torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = planting.log_potential(space).exp()
    chi2, bound, dof = chi_square(draws.tokens, space, probs)
    assert chi2 < bound, (chi2, bound, dof)


@pytest.mark.parametrize("current", ["r", "other"])
def test_the_planted_mixture_is_a_distribution_and_its_weights_are_unbiased(problem, current):
    """q = s q_plant + (1 - s) q_current (current r, or another policy as after a swap): it normalises, its
    draws follow it, the GAM's weight is read off the draws' log r, no bound on P/q is claimed, and Z-hat from it
    is unbiased (40 estimates: their mean within 3 s.e. of the exact Z)."""
    r, planting, target, space, _, log_z = problem
    other = r if current == "r" else long_proposal(seed=5, bias=1.2)
    q = PlantedMixture(other, planting, 0.4)
    with torch.no_grad():
        log_q = q.log_potential(space)
    assert float(torch.logsumexp(log_q, 0)) == pytest.approx(0.0, abs=1e-6)
    draws = q.sample(20000, MAX_LEN, torch.Generator().manual_seed(2))
    chi2, bound, dof = chi_square(draws.tokens, space, log_q.exp())
    assert chi2 < bound, (chi2, bound, dof)
    with torch.no_grad():
        assert torch.allclose(draws.log_prob, q.log_potential(draws.tokens), atol=1e-5)
        direct = target.log_potential(draws.tokens).double() - q.log_potential(draws.tokens)
        assert torch.allclose(target.log_weight(q, draws), direct, atol=1e-5)
    assert target.log_weight_bound(q, MAX_LEN) is None  # P / q has no bound once current is pi
    generator = torch.Generator().manual_seed(3)
    z_hats = torch.tensor([importance_z(q, target, 2000, 2000, MAX_LEN, generator).z for _ in range(40)])
    se = float(z_hats.std() / math.sqrt(len(z_hats)))
    assert abs(float(z_hats.mean()) - math.exp(log_z)) < 3 * se, (float(z_hats.mean()), math.exp(log_z), se)


def test_a_planted_mixture_of_a_batch_with_no_draw_of_one_component(problem):
    r, planting, _, _, _, _ = problem
    for share in (1e-9, 1.0):
        draws = PlantedMixture(r, planting, share).sample(3, MAX_LEN, torch.Generator().manual_seed(4))
        assert len(draws) == 3 and torch.isfinite(draws.log_prob).all()
    with pytest.raises(ValueError, match="max_len=7"):
        planting.sample(2, N, torch.Generator())
    with pytest.raises(ValueError, match="motif '12'"):
        MotifPlanting(r, "12", N)


def test_the_loops_draws_mix_in_the_planted_proposal_and_follow_swaps(problem):
    """ProposalDraws with plant_share: every fresh draw is of the mixture with the current proposal (a swap
    replaces that component), and the running Z-hat over its draws is unbiased (within 4 s.e. of exact Z)."""
    r, planting, target, _, _, log_z = problem
    draws = ProposalDraws(r, target, minibatch=500, proposal_batch=2000, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=MAX_LEN, generator=torch.Generator().manual_seed(5),
                          planting=planting, plant_share=0.5)
    weights = []
    for _ in range(20):
        draw = draws.fresh()
        weights.append(torch.exp(draw.log_w + draw.log_h).sum())  # this draw's Z-hat
    z_hats = torch.stack(weights)
    se = float(z_hats.std() / math.sqrt(len(z_hats)))
    assert abs(float(z_hats.mean()) - math.exp(log_z)) < 4 * se
    assert draws.samples_drawn == 20 * 2000
    pi = long_proposal(seed=5, bias=1.2)
    draws.proposal = pi  # what LoopModule._swap does
    assert draws.sampler().current is pi and draws.sampler().planting is planting
    draws.plant_share = 0.0
    assert draws.sampler() is pi


def test_dpg_off_with_planted_draws_moves_pi_to_p_lambda():
    """dpg_off with method.plant_motif=0.5 on an enumerable GAM: pi ends closer to p_lambda than r is, by the
    exact KL(p_lambda || pi), and a run without the motif in its inputs is refused before any draw."""
    r, p_lambda, space, log_p, _, valid = gam_problem()  # P_lambda = r exp(-5 [x lacks 11]): strings with 11
    with eval_mode(r):
        ce_r = -float(r.log_prob(valid).mean()) / 7
        kl_r = kl(log_p, r.log_prob(space))
    cfg = DPGConfig(name="dpg_off", algorithm="dpg_off", lr=0.02, minibatch=256, updates_per_epoch=25, max_epochs=8,
                    patience=8, clip=1.0, plant_motif=0.5)
    torch.manual_seed(3)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    fit = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_r, seed=4, motif="11")
    with eval_mode(fit.pi):
        kl_pi = kl(log_p, fit.pi.log_prob(space))
    assert kl_pi < 0.5 * kl_r, (kl_pi, kl_r)
    with pytest.raises(ValueError, match="no motif to plant"):
        train_method(cfg, LSTMPolicy(16, 1, dropout=0.0), r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_r)
