"""Potentials as an algebra: products, the tilt, and the weights they give sampling code."""

import copy
import math

import pytest
import torch

from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Product, Tilt, TrueProcess, gam
from gam_rl.process import MotifProcess
from tests.exact import all_outputs, exact_distribution

MAX_LEN = 8


def policy(seed):
    torch.manual_seed(seed)
    return LSTMPolicy(8, 1, dropout=0.0).eval()


def test_a_gam_is_r_times_its_tilt_and_weights_against_its_own_r_without_scoring_it():
    r, features, lam = policy(0), Features("Mv1001111", "101", max_len=10), torch.tensor([0.4, -0.2, -2.0, 0.7,
                                                                                           -0.5, 1.0, 0.3])
    p_lambda = gam(r, features, lam)
    assert isinstance(p_lambda, Product) and p_lambda.factors[0] is r and isinstance(p_lambda.factors[1], Tilt)
    samples = r.sample(500, MAX_LEN, torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = r.log_prob(samples.tokens).double() + (features(samples.tokens) @ lam).double()
    assert torch.allclose(p_lambda.log_potential(samples.tokens), expected, atol=1e-5)
    # q = r, a factor of P: w = P/q = exp(lambda . phi), r is not scored; a copy of r (not a factor) is,
    # and gives the same weights
    tilt_only = p_lambda.log_weight(r, samples)
    assert torch.allclose(tilt_only, (features(samples.tokens) @ lam).double(), atol=1e-6)
    scored = p_lambda.log_weight(copy.deepcopy(r), samples)
    assert torch.allclose(scored, tilt_only, atol=1e-4)
    # the rejection bound: the tilt's bound against r, none against another policy
    bound = p_lambda.log_weight_bound(r, MAX_LEN)
    assert float(tilt_only.max()) <= bound and p_lambda.log_weight_bound(policy(3), MAX_LEN) is None
    assert bound == pytest.approx(0.4 * 0.8 + 0.7 + 1.0 + 0.3)  # M <= 8/10 at 8 symbols, v's weight < 0


def test_products_flatten_and_multiply():
    r, q = policy(0), policy(1)
    tilt = Tilt(Features("1001111", "101"), torch.tensor([-1.0, 0.5, 0.0, 0.2, -0.3]))
    three = (r * tilt) * q
    assert three.factors == [r, tilt, q]
    space = all_outputs(MAX_LEN)
    with torch.no_grad():
        expected = r.log_prob(space).double() + tilt.log_potential(space).double() + q.log_prob(space).double()
    assert torch.allclose(three.log_potential(space), expected, atol=1e-5)
    samples = q.sample(100, MAX_LEN, torch.Generator().manual_seed(2))
    assert torch.allclose(three.log_weight(q, samples), (r * tilt).log_potential(samples.tokens), atol=1e-6)
    assert three.log_upper_bound(MAX_LEN) == pytest.approx(0.5 + 0.2)  # policies <= 1, tilt bound


def test_the_true_process_is_a_potential_with_exact_log_z():
    process = MotifProcess("11", 6)
    true = TrueProcess(process)
    log_p, log_z = exact_distribution(true.log_potential(all_outputs(7)))
    assert log_z == pytest.approx(true.log_z, abs=1e-9)
    assert int((log_p > -math.inf).sum()) == process.num_strings
    assert true.log_upper_bound(7) == pytest.approx(-6 * math.log(2))
