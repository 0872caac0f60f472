"""subtb's balance and ctl's contrastive loss against exact answers: the enumerated twist V*, pi* = p
(tests/test_twist.py's problem) and brute-force computations of the same sums."""

import math

import pytest
import torch

from gam_rl.methods.ctl import ctl_loss, prefix_log_weights, twist_log_psi
from gam_rl.methods.subtb import subtb_loss
from gam_rl.policy import eval_mode
from gam_rl.tokens import EOS, PAD
from tests.test_twist import problem, steps  # noqa: F401 (fixtures)


def brute_subtb(values, log_pi, log_r, terminal, mask, weight):
    """The same loss by explicit loops over rows and pairs (t, u), t < u <= L."""
    rows = []
    for i in range(len(mask)):
        length = int(mask[i].sum())
        w = [float(values[i, t]) for t in range(length)] + [float(terminal[i])]
        total = num = 0.0
        for t in range(length + 1):
            for u in range(t + 1, length + 1):
                delta = w[t] + sum(float(log_pi[i, k] - log_r[i, k]) for k in range(t, u)) - w[u]
                total += weight ** (u - t) * delta**2
                num += weight ** (u - t)
        rows.append(total / num)
    return sum(rows) / len(rows)


@pytest.mark.parametrize("weight", [1.0, 0.9, 0.3])
def test_subtb_loss_is_the_weighted_mean_square_residual_of_every_sub_trajectory(steps, weight):  # noqa: F811
    mask, log_r, terminal, values, log_star = steps
    torch.manual_seed(0)
    noisy_v = values + 0.3 * torch.randn_like(values) * mask
    noisy_pi = log_star + 0.2 * torch.randn_like(log_star) * mask
    got = float(subtb_loss(noisy_v, noisy_pi, log_r, terminal, mask, weight))
    assert got == pytest.approx(brute_subtb(noisy_v, noisy_pi, log_r, terminal, mask, weight), rel=1e-9)


def test_subtb_balance_vanishes_exactly_at_the_twist_and_nowhere_near(steps):  # noqa: F811
    mask, log_r, terminal, values, log_star = steps
    assert float(subtb_loss(values, log_star, log_r, terminal, mask, 0.9)) < 1e-10
    shifted = values.clone()
    shifted[:, 0] += 0.1  # a wrong log Z alone: every pair (0, u) is off by 0.1
    assert float(subtb_loss(shifted, log_star, log_r, terminal, mask, 1.0)) > 1e-4
    # and pi = r (not p) with the exact V* is out of balance
    assert float(subtb_loss(values, log_r, log_r, terminal, mask, 0.9)) > 1e-3


def test_ctl_prefix_weights_are_the_twisted_target_over_the_proposal(problem):  # noqa: F811
    """log w_t = log r(s_1:t) + log psi(s_1:t) - log q(s_1:t) with psi from pi's logits, by direct sums; after
    the last step the complete string's log P(x) - log q(x)."""
    r, p_lambda, target, tokens = problem
    torch.manual_seed(1)
    pi = type(r)(12, 1, dropout=0.0).eval()
    mask = tokens != PAD
    with eval_mode(r), eval_mode(pi):
        log_r_all = torch.log_softmax(r.head(r.token_states(tokens)), -1).double()
        logits = pi.head(pi.token_states(tokens)).double()
        log_q = pi.token_log_probs(tokens).double()
    log_psi = twist_log_psi(logits, log_r_all, tokens)
    picked = tokens.clamp(max=EOS).unsqueeze(2)
    log_r = log_r_all.gather(2, picked).squeeze(2) * mask
    complete = p_lambda.log_potential(tokens).double() - log_q.sum(1)
    width = tokens.shape[1] + 2
    got = prefix_log_weights(log_psi, log_r, log_q, mask, complete, width)
    for i in range(len(tokens)):
        length = int(mask[i].sum())
        for t in range(width):
            if t < length:
                a = int(tokens[i, t].clamp(max=EOS))
                psi = float(logits[i, t, a] - log_r_all[i, t, a])
                want = float(log_r[i, : t + 1].sum() + psi - log_q[i, : t + 1].sum())
            else:
                want = float(complete[i])
            assert float(got[i, t]) == pytest.approx(want, abs=1e-9), (i, t)


def test_ctl_gradient_is_the_contrastive_difference_of_twist_gradients():
    """d loss / d log psi = -1/M at the positives' steps and +wbar_{i,t} at the negatives', wbar the softmax
    over the draw at each t; zero off the steps."""
    torch.manual_seed(2)
    pos = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    neg = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    pos_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    neg_mask = torch.rand(5, 4) > 0.3
    log_w = torch.randn(5, 4, dtype=torch.float64)
    ctl_loss(pos, pos_mask, neg, neg_mask, log_w).backward()
    assert torch.allclose(pos.grad, -pos_mask.double() / 3)
    assert torch.allclose(neg.grad, torch.softmax(log_w, 0) * neg_mask)
    assert math.isclose(float(torch.softmax(log_w, 0)[:, 2].sum()), 1.0)


def test_ctl_trains_on_positives_longer_than_its_draws():
    """Rows of D longer than every draw of pi (an r that ends early): the draw's per-symbol log q is padded
    to the positives' width, and an update runs to a finite loss."""
    from gam_rl.features import Features
    from gam_rl.methods.ctl import CTLConfig
    from gam_rl.potentials import gam
    from gam_rl.tokens import encode
    from tests.conftest import long_proposal, train_method

    r = long_proposal(seed=1, hidden=8, bias=-2.0)  # EOS likely at once: short draws
    p_lambda = gam(r, Features("1001111", "101"), torch.tensor([-1.0, 0.5, 0.2, 0.3, 0.1]))
    data = encode(["1011011101", "0101101011", "1111010100"])
    pi = type(r)(8, 1, dropout=0.0)
    pi.load_state_dict(r.state_dict())
    cfg = CTLConfig(name="ctl", init="r", positive_source="data", minibatch=16, updates_per_epoch=3, max_epochs=1,
                    patience=1, z_samples=50)
    fit = train_method(cfg, pi.train(), r, p_lambda, data, max_len=12, symbols=11, ce_valid_r=1e9, seed=0,
                       train=data)
    assert fit.results["t2_updates"] == 3 and math.isfinite(fit.learned_log_z)
    assert fit.results["ctl_positives"] == 3 and fit.results["ctl_positive_proposals"] == 0
