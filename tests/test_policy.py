import math

import pytest
import torch
from scipy import stats

from gam_rl.policy import LSTMPolicy
from gam_rl.tokens import EOS, PAD
from tests.exact import all_outputs


def tiny_policy(seed=0, hidden=8, layers=2):
    torch.manual_seed(seed)
    policy = LSTMPolicy(hidden, layers, dropout=0.3).eval()
    with torch.no_grad():  # sharpen the untrained net so sequences are not all length ~1
        policy.head.bias.copy_(torch.tensor([0.8, 0.8, -1.0]))
    return policy


@pytest.mark.parametrize("layers", [1, 2, 3])
def test_sampler_log_prob_equals_teacher_forced_log_prob(layers):
    policy = tiny_policy(layers=layers)
    samples = policy.sample(2000, max_len=12, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        scored = policy.log_prob(samples.tokens)
    assert torch.allclose(scored, samples.log_prob, atol=1e-5)
    assert (~samples.finished).any() and samples.finished.any()  # both kinds of rows covered
    eos_rows = (samples.tokens == EOS).any(1)
    assert torch.equal(eos_rows, samples.finished)


def test_probabilities_of_all_outputs_sum_to_one():
    policy = tiny_policy()
    with torch.no_grad():
        logp = policy.log_prob(all_outputs(6))
    assert torch.logsumexp(logp.double(), 0).item() == pytest.approx(0.0, abs=1e-5)


def test_sampler_frequencies_match_log_prob():
    policy = tiny_policy(seed=3)
    outputs = all_outputs(3)
    with torch.no_grad():
        probs = policy.log_prob(outputs).exp().double()
    draws = 40000
    samples = policy.sample(draws, max_len=3, generator=torch.Generator().manual_seed(7))
    tokens = torch.nn.functional.pad(samples.tokens, (0, 3 - samples.tokens.shape[1]), value=PAD)
    index = {tuple(row): i for i, row in enumerate(outputs.tolist())}
    counts = torch.bincount(torch.tensor([index[tuple(r)] for r in tokens.tolist()]), minlength=len(outputs))
    expected = probs / probs.sum() * draws
    assert stats.chisquare(counts.double().numpy(), expected.numpy()).pvalue > 1e-4


def test_dropout_is_off_in_sampling_and_on_in_training_mode():
    policy = tiny_policy()
    x = policy.sample(50, 10, torch.Generator().manual_seed(0)).tokens
    policy.train()
    torch.manual_seed(0)
    a = policy.log_prob(x)
    b = policy.log_prob(x)
    assert not torch.allclose(a, b)  # dropout noise in training mode
    s = policy.sample(50, 10, torch.Generator().manual_seed(0))
    policy.eval()
    assert torch.allclose(policy.log_prob(s.tokens), s.log_prob, atol=1e-5)


def test_sampler_respects_max_len_and_is_seeded():
    policy = tiny_policy()
    a = policy.sample(300, 5, torch.Generator().manual_seed(3))
    b = policy.sample(300, 5, torch.Generator().manual_seed(3))
    assert torch.equal(a.tokens, b.tokens) and a.tokens.shape[1] <= 5
    assert torch.all(a.log_prob <= 0) and math.isfinite(a.log_prob.sum().item())


def test_log_prob_is_differentiable():
    policy = tiny_policy()
    x = policy.sample(20, 8).tokens
    policy.log_prob(x).sum().backward()
    assert policy.lstm.weight_hh_l0.grad is not None
