"""The twist (methods/twist.py) against exact answers on an enumerable problem: the prefix sums
log Z(s), the soft values V*(s) = log Z(s) - log r(s) and the optimal policy pi*(a | s) =
Z(s a) / Z(s) computed from the enumeration, then path consistency, the critic's targets and
the twisted r checked on them; PPO's surrogate by autograd."""

import math

import pytest
import torch

from gam_rl.exact import ExactTarget, OutputSpace, prefix_log_z, twist_values
from gam_rl.features import Features
from gam_rl.methods.twist import (
    EXP_FIT_MAX,
    critic_loss,
    critic_targets,
    next_values,
    pcl_consistency,
    ppo_surrogate,
    td_targets,
    twisted_log_prob,
)
from gam_rl.methods.twist_loop import terminal_reward
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import gam
from gam_rl.tokens import EOS, PAD, decode

MAX_LEN = 7


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(3)
    r = LSTMPolicy(12, 1, dropout=0.0).eval()
    features = Features(["motif", "first_bit", "M"], "101", max_len=MAX_LEN)
    p_lambda = gam(r, features, torch.tensor([-2.0, 0.7, 1.5]))
    target = ExactTarget.of(p_lambda, OutputSpace(MAX_LEN), "cpu")
    samples = r.sample(64, MAX_LEN, torch.Generator().manual_seed(5))  # some truncated, some not
    return r, p_lambda, target, samples.tokens


def exact_per_step(target: ExactTarget, r: LSTMPolicy, tokens: torch.Tensor):
    """V*(s_t) and log pi*(a_t | s_t) = log Z(s_t a_t) - log Z(s_t) at every step, from the enumeration."""
    B, T = tokens.shape
    values, log_star = torch.zeros(B, T, dtype=torch.float64), torch.zeros(B, T, dtype=torch.float64)
    for i, row in enumerate(tokens.tolist()):
        bits = ""
        for t, a in enumerate(row):
            if a == PAD:
                break
            values[i, t] = float(twist_values(target, r, [bits])[0])
            if a == EOS:  # Z(s EOS) = P(s EOS): the single output with |s| bits, index 2^|s| - 1 + int(s)
                log_child = float(target.log_p[2 ** len(bits) - 1 + (int(bits, 2) if bits else 0)]) + target.log_z
            else:
                log_child = prefix_log_z(target, bits + str(a))
            log_star[i, t] = log_child - prefix_log_z(target, bits)
            bits += "" if a == EOS else str(a)
    return values, log_star


def test_prefix_sums_against_brute_force(problem):
    r, _, target, _ = problem
    strings = decode(torch.cat([b.long() for b in target.space.batches]))
    for prefix in ["", "1", "01", "110", "1011011"]:
        brute = torch.logsumexp(target.log_p[[s.startswith(prefix) for s in strings]], 0) + target.log_z
        assert prefix_log_z(target, prefix) == pytest.approx(float(brute), abs=1e-9)
    assert float(twist_values(target, r, [""])[0]) == pytest.approx(target.log_z, abs=1e-9)  # V*(empty) = log Z


@pytest.fixture(scope="module")
def steps(problem):
    """The sampled trajectories step by step: mask, log r(a_t | s_t), the terminal reward, and the
    exact V*(s_t) and log pi*(a_t | s_t)."""
    r, p_lambda, target, tokens = problem
    with eval_mode(r):
        log_r = r.token_log_probs(tokens).double()
    terminal = terminal_reward(p_lambda, r, tokens, log_r.sum(1)).double()
    return (tokens != PAD, log_r, terminal, *exact_per_step(target, r, tokens))


def test_path_consistency_vanishes_exactly_at_the_twist(problem, steps):
    _, _, target, tokens = problem
    mask, log_r, terminal, values, log_star = steps
    # pi* is p_lambda: its per-step log-probabilities sum to log p(x)
    index = {s: i for i, s in enumerate(decode(torch.cat([b.long() for b in target.space.batches])))}
    assert torch.allclose(log_star.sum(1), target.log_p[[index[s] for s in decode(tokens)]], atol=1e-6)
    for horizon in (0, 1, 3):
        c = pcl_consistency(values, log_star, log_r, terminal, mask, horizon)
        assert c.abs().max() < 1e-5, horizon
    # a wrong value at one state breaks exactly the paths that start or end there
    i = int((mask.sum(1) >= 3).nonzero()[0])  # a row of at least 3 steps
    wrong = values.clone()
    wrong[i, 1] += 0.1
    c = pcl_consistency(wrong, log_star, log_r, terminal, mask, 1)
    assert c[i, 1] == pytest.approx(-0.1, abs=1e-5) and c[i, 0] == pytest.approx(0.1, abs=1e-5)
    c[i, :2] = 0.0
    assert c.abs().max() < 1e-5


def test_critic_targets_and_twisted_r_are_exact_at_the_twist(steps):
    """Drawn from q = pi*, every Monte-Carlo target is V*(s_t) itself (Jensen's gap is 0), and the
    twisted r of V* is pi*. (From r's draws the targets are biased: test_methods_exact.)"""
    mask, log_r, terminal, values, log_star = steps
    assert torch.allclose(critic_targets(log_r, log_star, terminal, mask), values, atol=1e-6)
    assert torch.allclose(td_targets(values, log_r, log_star, terminal, mask), values, atol=1e-6)
    assert torch.allclose(twisted_log_prob(values, log_r, terminal, mask), log_star, atol=1e-6)
    lengths = mask.sum(1)
    assert torch.allclose(next_values(values, terminal, mask)[torch.arange(len(mask)), lengths - 1], terminal)


def test_ppo_surrogate_is_dpg_at_the_old_policy_and_clips_beyond():
    torch.manual_seed(0)
    mask = torch.tensor([[True, True, True], [True, True, False]])
    log_old = torch.randn(2, 3) * mask
    advantage = torch.tensor([[2.0, 2.0, 2.0], [-1.0, -1.0, 0.0]])
    log_pi = log_old.clone().requires_grad_(True)
    step = ppo_surrogate(log_pi, log_old, advantage, mask, clip=0.2)
    step.loss.backward()
    # at pi = pi_old: loss -sum_t A_t / B, gradient -A_t / B per step (DPG's), KL 0, nothing clipped
    assert float(step.loss.detach()) == pytest.approx(-(6.0 - 2.0) / 2)
    assert torch.allclose(log_pi.grad, -advantage * mask / 2)
    assert step.approx_kl == pytest.approx(0.0, abs=1e-7) and step.clip_fraction == 0.0
    # ratio e^0.5 > 1.2 on a positive advantage, e^-0.5 < 0.8 on a negative one: no gradient there
    moved = (log_old + torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]])).requires_grad_(True)
    step = ppo_surrogate(moved, log_old, advantage, mask, clip=0.2)
    step.loss.backward()
    assert moved.grad[0, 0] == 0.0 and moved.grad[1, 0] == 0.0 and moved.grad[0, 1] != 0.0
    expected_kl = ((math.exp(0.5) - 1 - 0.5) + (math.exp(-0.5) - 1 + 0.5)) / 5
    assert step.approx_kl == pytest.approx(expected_kl, rel=1e-5) and step.clip_fraction == pytest.approx(2 / 5)


def test_the_exp_critic_loss_is_minimised_at_log_mean_exp_and_the_square_one_at_the_mean():
    """critic_loss's fixed points on one state's targets y: exp -> log E[e^y] (= V* for any q), square -> E[y]."""
    y = torch.tensor([[-3.0], [0.5], [-1.0], [2.0]], dtype=torch.float64)
    mask = torch.ones_like(y, dtype=torch.bool)
    for fit, best in (("exp", torch.logsumexp(y, 0) - math.log(len(y))), ("square", y.mean(0))):
        v = best.expand_as(y).clone().requires_grad_(True)
        critic_loss(v, y, mask, fit).backward()
        assert float(v.grad.sum()) == pytest.approx(0.0, abs=1e-9), fit


def test_the_exp_loss_goes_on_linearly_beyond_its_cap():
    """Beyond y - V = EXP_FIT_MAX the loss keeps the slope e^cap - 1 (a clamp gave 0): one target 60 nats
    above V among nine at V pulls V up, to log E[e^y] = 60 - log 10; a clamped loss left V where it was."""
    d = torch.tensor([EXP_FIT_MAX - 1, EXP_FIT_MAX, EXP_FIT_MAX + 10], dtype=torch.float64, requires_grad=True)
    critic_loss(torch.zeros(3, 1, dtype=torch.float64), d.unsqueeze(1), torch.ones(3, 1, dtype=torch.bool),
                "exp").backward()  # V = 0, y = d: the gradient in y is f'(d) / 3
    slopes = 3 * d.grad
    assert slopes[0] == pytest.approx(math.expm1(EXP_FIT_MAX - 1)) and slopes[1] == pytest.approx(
        math.expm1(EXP_FIT_MAX)) and slopes[2] == pytest.approx(math.expm1(EXP_FIT_MAX))
    y = torch.tensor([[0.0]] * 9 + [[60.0]], dtype=torch.float64)
    mask = torch.ones_like(y, dtype=torch.bool)

    def slope(value: float) -> float:  # d loss / d V at V = value
        v = torch.tensor(value, dtype=torch.float64, requires_grad=True)
        critic_loss(v.expand_as(y), y, mask, "exp").backward()
        return float(v.grad)

    assert slope(0.0) < -1e20  # at V = 0 the far target pulls V up (a clamp: slope 0, V stuck at 0)
    low, high = 0.0, 60.0  # the loss is convex: bisect its slope's root
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if slope(mid) < 0 else (low, mid)
    assert low == pytest.approx(60.0 - math.log(10.0), abs=1e-6)  # log E[e^y]


@pytest.mark.parametrize("proposal", ["r", "other"])
def test_the_exp_critic_fits_v_star_for_any_proposal_by_enumeration(problem, proposal):
    """At states s = '', '1', '01' and q = r or another policy: the expected exp loss over every completion x
    of s, weighted q(x | s) exactly, has zero gradient at V = V*(s) for the Monte-Carlo targets
    y = lambda . phi(x) + sum_{k >= t} (log r - log q)_k, and for the TD targets
    y = log r(a | s) - log q(a | s) + V*(s a) over the next symbol a ~ q: E_q[e^(y - V*)] = 1."""
    r, p_lambda, target, _ = problem
    torch.manual_seed(11)
    q = r if proposal == "r" else LSTMPolicy(12, 1, dropout=0.0).eval()
    tokens = torch.cat([b.long() for b in target.space.batches])
    strings = decode(tokens)
    with eval_mode(r), eval_mode(q):
        log_r, log_q = r.token_log_probs(tokens).double(), q.token_log_probs(tokens).double()
    mask = tokens != PAD
    terminal = terminal_reward(p_lambda, r, tokens, log_r.sum(1)).double()
    targets = critic_targets(log_r, log_q, terminal, mask)
    for s in ("", "1", "01"):
        t = len(s)
        rows = torch.tensor([x.startswith(s) and mask[i, t] for i, x in enumerate(strings)])
        log_q_suffix = (log_q * (torch.arange(tokens.shape[1]) >= t)).sum(1)  # log q(x | s)
        weights = torch.softmax(log_q_suffix[rows], 0)  # q(x | s) over the completions of s (sums to 1)
        v_star = float(twist_values(target, r, [s])[0])
        v = torch.tensor(v_star, dtype=torch.float64, requires_grad=True)
        (weights * (torch.expm1(targets[rows, t] - v) - (targets[rows, t] - v))).sum().backward()
        assert float(v.grad) == pytest.approx(0.0, abs=1e-6), (s, proposal)  # float32 log-probabilities
        # one step on: E_{a ~ q(. | s)} [e^(log r(a|s) - log q(a|s) + V*(s a) - V*(s))] = 1
        children = {a: float(twist_values(target, r, [s + a])[0]) for a in "01"}
        row = next(i for i, x in enumerate(strings) if x == s)  # s itself: its EOS step is the terminal child
        with eval_mode(r), eval_mode(q):
            probe = torch.cat([tokens[row: row + 1, :t], torch.tensor([[EOS]])], 1)
            r_next = torch.log_softmax(r.head(r.token_states(probe)), -1)[0, t].double()
            q_next = torch.log_softmax(q.head(q.token_states(probe)), -1)[0, t].double()
        next_v = torch.tensor([children["0"], children["1"], float(terminal[row])], dtype=torch.float64)
        mean = float((q_next.exp() * torch.exp(r_next - q_next + next_v - v_star)).sum())
        assert mean == pytest.approx(1.0, abs=1e-6), (s, proposal)


def test_per_step_log_probs_agree_between_sampler_fused_kernel_and_nn_lstm():
    torch.manual_seed(0)
    pi = LSTMPolicy(16, 2, dropout=0.3).eval()
    samples = pi.sample(64, 12, torch.Generator().manual_seed(1))
    fused = pi.token_log_probs(samples.tokens)
    pi.fused_kernel = False
    assert torch.allclose(pi.token_log_probs(samples.tokens), fused, atol=1e-5)
    assert torch.allclose(samples.token_log_prob, fused, atol=1e-5)
    assert torch.allclose(fused.sum(1), samples.log_prob, atol=1e-5)
    pi.fused_kernel = None
    assert pi.token_states(torch.full((2, 3), PAD)).abs().sum() == 0  # an all-PAD batch: zeros
