"""twist.pt: a twist learner's values saved with a run and read back, in SMC's convention (column t: the
prefix of the first t symbols), for each way a method reads V off pi and its critic."""

import pytest
import torch

from gam_rl.methods.ctl import twist_log_psi
from gam_rl.methods.saved_twist import load_twist
from gam_rl.methods.twist_loop import Critic, twist_payload
from gam_rl.policy import LSTMPolicy
from gam_rl.tokens import encode


def models():
    torch.manual_seed(0)
    r, pi = LSTMPolicy(8, 1, 0.0), LSTMPolicy(8, 1, 0.0)
    critic = Critic("separate", pi, r)
    with torch.no_grad():  # a value head that is not zero (it starts at 0)
        critic.value.weight.normal_()
        critic.value.bias.fill_(0.3)
    return r, pi, critic


@pytest.mark.parametrize("values", ["critic", "q_logits"])
def test_a_value_learners_twist_comes_back_as_it_computed_it(tmp_path, values):
    r, pi, critic = models()
    tokens = encode(["0110", "1", ""])
    with torch.no_grad():
        states = pi.token_states(tokens)
        expected = critic(tokens, states) + (torch.logsumexp(pi.head(states), -1) if values == "q_logits" else 0.0)
    torch.save(twist_payload("ac_dpg", values, pi, critic), tmp_path / "twist.pt")
    with torch.no_grad():  # pi changes after the payload was taken (e.g. back to its start): the payload does not
        pi.head.bias.add_(1.0)
    loaded = load_twist(tmp_path, r)(tokens)
    mask = tokens != 3
    assert torch.allclose(loaded[mask], expected[mask], atol=1e-6)


def test_ctls_twist_is_pis_logits_less_r_at_the_step_that_ends_each_prefix(tmp_path):
    r, pi, _ = models()
    tokens = encode(["0110", "10"])
    with torch.no_grad():
        log_r = torch.log_softmax(r.head(r.token_states(tokens)), -1)
        ends = twist_log_psi(pi.head(pi.token_states(tokens)), log_r, tokens)  # column t: the prefix of t + 1
    torch.save(twist_payload("ctl", "ctl", pi), tmp_path / "twist.pt")
    loaded = load_twist(tmp_path, r)(tokens)
    assert torch.all(loaded[:, 0] == 0.0)  # psi(empty prefix) = 1
    assert torch.allclose(loaded[0, 1:5], ends[0, :4], atol=1e-6) and torch.allclose(loaded[1, 1:3], ends[1, :2])


def test_a_run_without_twist_pt_is_named(tmp_path):
    r, _, _ = models()
    with pytest.raises(ValueError, match="no twist.pt"):
        load_twist(tmp_path, r)


@pytest.mark.parametrize("values, kind", [("critic", "separate"), ("critic", "head"), ("q_logits", "separate"),
                                          ("q_logits", None), ("ctl", None)])
def test_the_twist_one_symbol_at_a_time_equals_the_twist_of_each_prefix(tmp_path, values, kind):
    """TwistSteps (SMC's O(1)-per-symbol path) against LearnedTwist on whole prefixes: V(s_{1:t}) of every row at
    every step, with rows dropped and repeated between steps as SMC's resampling does."""
    r, pi, _ = models()
    critic = None if kind is None else Critic(kind, pi, r)
    if critic is not None:
        with torch.no_grad():
            critic.value.weight.normal_()
            critic.value.bias.fill_(0.3)
    torch.save(twist_payload("x", values, pi, critic), tmp_path / "twist.pt")
    twist = load_twist(tmp_path, r)
    torch.manual_seed(1)
    tokens = torch.randint(0, 2, (6, 7))
    full = twist(tokens)  # column t: V of the first t symbols
    steps = twist.steps(len(tokens))
    assert steps.v0 == pytest.approx(float(full[0, 0]), abs=1e-5)
    rows = torch.arange(len(tokens))  # which original row each working row is
    for t in range(tokens.shape[1]):
        v = steps.value_after(tokens[rows, t])
        assert torch.allclose(v, full[rows, t + 1] if t + 1 < tokens.shape[1] else twist(
            torch.cat([tokens, tokens[:, :1]], 1))[rows, t + 1], atol=1e-5), t
        if t == 2:  # resampling: keep rows 5, 0, 0, 3 (in that order)
            keep = torch.tensor([5, 0, 0, 3])
            steps.keep(keep)
            rows = rows[keep]


def test_a_critic_twist_without_its_critic_is_refused(tmp_path):
    r, pi, _ = models()
    torch.save(twist_payload("ac_dpg", "critic", pi, None), tmp_path / "twist.pt")
    with pytest.raises(ValueError, match="holds none"):
        load_twist(tmp_path, r)
