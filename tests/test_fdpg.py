"""f-DPG and KL-control against exact answers: every f' gives the exact gradient of its
divergence, kl is DPG's update, and KL-control is on-policy reverse-KL f-DPG."""

import math

import pytest
import torch

from gam_rl.exact import OutputSpace, kl, tv
from gam_rl.features import Features
from gam_rl.methods.dpg import dpg_loss
from gam_rl.methods.draws import ProposalDraws, WeightedDraw
from gam_rl.methods.fdpg import (
    DIVERGENCES,
    FDPGConfig,
    draw_log_z,
    f_divergence,
    fdpg_coefficients,
    fdpg_fprime,
    fdpg_loss,
    stalled,
)
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import TrueProcess, gam
from gam_rl.process import MotifProcess
from tests.exact import all_outputs

MAX_LEN = 6


def policy(seed: int, hidden: int = 8) -> LSTMPolicy:
    torch.manual_seed(seed)
    return LSTMPolicy(hidden, 1, dropout=0.0)


def gam_target(r: LSTMPolicy):
    features = Features(["motif", "first_bit", "M"], "101", max_len=MAX_LEN)
    return gam(r, features, torch.tensor([-2.0, 0.7, 1.5])), features


def grads(loss: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
    module.zero_grad()
    loss.backward()
    return torch.cat([p.grad.flatten().clone() for p in module.parameters()])


def full_space_draw(space: torch.Tensor, q: LSTMPolicy, log_potential: torch.Tensor) -> WeightedDraw:
    """Every output once, with share h(x) = q(x): sum_x h(x) g(x) = E_q[g], exactly."""
    with eval_mode(q):
        log_q = q.log_prob(space).double()
    return WeightedDraw(space, log_potential.double() - log_q, log_q, log_q.clone(), torch.ones(len(space)))


# every divergence on P_lambda; on a target with zeros (the true process) all but rkl, which is
# infinite there (FDPGConfig.problems refuses it)
CASES = [(d, "gam") for d in sorted(DIVERGENCES)] + [(d, "true") for d in sorted(DIVERGENCES)
                                                    if not DIVERGENCES[d].full_support]


@pytest.mark.parametrize("divergence, target_kind", CASES)
def test_each_fprime_gives_the_exact_gradient_of_its_divergence(divergence, target_kind):
    """E_q[(pi/q) f'(pi/p) grad log pi] over every output (h = q) = grad_theta D_f(pi || p), by autograd
    on the enumerated D_f."""
    space = all_outputs(MAX_LEN)
    r, pi, q = policy(0), policy(1), policy(2)
    if target_kind == "gam":
        potential = gam_target(r)[0]
    else:
        potential = TrueProcess(MotifProcess("11", 4))
    log_potential = potential.log_potential(space).double()
    log_z = float(torch.logsumexp(log_potential, 0))
    log_p = log_potential - log_z

    exact = f_divergence(divergence, pi.log_prob(space).double(), log_p)
    g_exact = grads(exact, pi)
    draw = full_space_draw(space, q, log_potential)
    g_fdpg = grads(fdpg_loss(pi.log_prob(space), draw, divergence, log_z=log_z), pi)
    assert torch.allclose(g_fdpg, g_exact.float(), rtol=1e-4, atol=1e-6)
    assert g_exact.abs().max() > 1e-3  # not a vacuous comparison


def test_f_divergence_values_are_the_named_divergences():
    space = all_outputs(MAX_LEN)
    r, pi = policy(0), policy(1)
    log_potential = gam_target(r)[0].log_potential(space).double()
    log_p = log_potential - torch.logsumexp(log_potential, 0)
    with torch.no_grad():
        log_pi = pi.log_prob(space).double()
    m = torch.logaddexp(log_p, log_pi) - math.log(2.0)  # log of the mixture (p + pi) / 2
    expected = {"kl": kl(log_p, log_pi), "rkl": kl(log_pi, log_p), "tv": tv(log_p, log_pi),
                "js": 0.5 * kl(log_pi, m) + 0.5 * kl(log_p, m)}
    for name, value in expected.items():
        assert float(f_divergence(name, log_pi, log_p)) == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_kl_fdpg_is_dpg_off_exactly():
    """The same weighted draw (sampled, thinned, with a running Z-hat): f-DPG with divergence kl
    and DPG_off give the same loss and the same gradient."""
    r, pi = policy(0, 16), policy(1, 16)
    potential = gam_target(r)[0]
    draws = ProposalDraws(r, potential, minibatch=64, proposal_batch=400, keep_per_draw=64, replay=0,
                          steps_per_draw=1, max_len=MAX_LEN,
                          generator=torch.Generator().manual_seed(0))
    draw = draws.fresh()
    log_z = draws.running_z.log_z
    dpg = dpg_loss(pi.log_prob(draw.tokens), draw, log_norm=log_z)
    g_dpg = grads(dpg, pi)
    fdpg = fdpg_loss(pi.log_prob(draw.tokens), draw, "kl", log_z=log_z)
    g_fdpg = grads(fdpg, pi)
    assert float(fdpg.detach()) == pytest.approx(float(dpg.detach()), rel=1e-6)
    assert torch.allclose(g_fdpg, g_dpg, rtol=1e-5, atol=1e-8)


def test_kl_control_is_reinforce_on_the_kl_regularised_reward():
    """On pi's own samples, rkl f-DPG with the baseline = REINFORCE on R(x) = lambda . phi(x) -
    log pi(x)/r(x) with the leave-one-out baseline, written here from its definition; log Z-hat cancels."""
    r, pi = policy(0, 16), policy(1, 16)
    potential, features = gam_target(r)
    lam = torch.tensor([-2.0, 0.7, 1.5])
    samples = pi.sample(300, MAX_LEN, torch.Generator().manual_seed(1))
    log_w = potential.log_weight(pi, samples).double()
    n = len(samples)
    draw = WeightedDraw(samples.tokens, log_w, samples.log_prob.double(), torch.full((n,), -math.log(n),
                        dtype=torch.float64), torch.full((n,), 1.0 / n, dtype=torch.float64))
    with torch.no_grad():
        reward = (features(samples.tokens) @ lam).double() - samples.log_prob.double() + r.log_prob(samples.tokens)
    # the leave-one-out baseline: R_i - mean_{j != i} R_j = n / (n - 1) (R_i - mean R)
    loo = (reward - (reward.sum() - reward) / (n - 1)) / n
    reinforce = -(loo.float() * pi.log_prob(samples.tokens)).sum()  # ascent on E_pi[R]
    g_reinforce = grads(reinforce, pi)
    for log_z in (0.0, 3.7):
        loss = fdpg_loss(pi.log_prob(samples.tokens), draw, "rkl", log_z=log_z, baseline=True)
        assert torch.allclose(grads(loss, pi), g_reinforce, rtol=1e-4, atol=1e-7)


def test_kl_control_objective_is_log_z_minus_reverse_kl():
    """E_pi[lambda . phi - log pi/r] = log Z - KL(pi || p_lambda) exactly: its maximiser is p_lambda."""
    space = OutputSpace(MAX_LEN)
    r, pi = policy(0), policy(1)
    potential, features = gam_target(r)
    tokens = torch.cat([b.long() for b in space.batches])
    log_potential = space.log_potential(potential)
    log_z = float(torch.logsumexp(log_potential, 0))
    log_pi, log_r = space.log_prob(pi), space.log_prob(r)
    reward = (features(tokens) @ torch.tensor([-2.0, 0.7, 1.5])).double() - log_pi + log_r
    objective = float((log_pi.exp() * reward).sum())
    assert objective == pytest.approx(log_z - kl(log_pi, log_potential - log_z), abs=1e-6)


@pytest.mark.parametrize("options, key", [
    (dict(divergence="rkl", target="true"), "method.divergence='rkl' with method.target='true'"),
    (dict(divergence="js", normalise="none"), "method.normalise='none' with method.divergence='js'"),
    (dict(divergence="tv", target="true", proposal_batch=1000, keep_per_draw=100), "thinning"),
])
def test_fdpg_refuses_combinations_that_cannot_work(options, key):
    cfg = FDPGConfig(name="fdpg", **options)
    assert any(key in problem for problem in cfg.problems())


def test_fdpg_kl_without_z_is_allowed():
    assert FDPGConfig(name="fdpg", divergence="kl", normalise="none").problems() == []



def exact_expected_update(divergence: str, draw_size: int, on_policy: bool, baseline: str, z: str = "exact"):
    """sum_i c_i grad log pi(x_i) averaged over every draw of `draw_size` i.i.d. outputs of q (q = pi
    on-policy), weighted by its exact probability, on a space of 15 outputs (max_len 3; 3,375 draws of 3),
    against grad D_f(pi || p) by autograd on the enumerated divergence (p exact: log Z known).
    baseline: none | loo (fdpg_coefficients) | whole (the mean over the draw, item i included: the old one).
    z: exact (log Z) | low (log Z + delta, delta 1 nat below every log(p/pi): every t = pi/p-hat < 1) |
    draw (each draw's own, draw_log_z). Returns expected, exact, and per draw: draws (D, N), coef, log_z."""
    import itertools
    from types import SimpleNamespace

    tiny = 3
    space = torch.cat([b.long() for b in OutputSpace(tiny).batches])
    r, pi = policy(0, 4), policy(1, 4)
    pi.fused_kernel = False  # one backward per output through the same forward (retain_graph)
    q = pi if on_policy else policy(2, 4)
    potential = gam(r, Features(["motif", "first_bit", "M"], "101", max_len=tiny), torch.tensor([-2.0, 0.7, 1.5]))
    with torch.no_grad():
        log_potential = potential.log_potential(space).double()
        log_q = q.log_prob(space).double()
    log_z = float(torch.logsumexp(log_potential, 0))
    log_pi = pi.log_prob(space)  # differentiable
    jac = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(lp, list(pi.parameters()),
                                                                           retain_graph=True)]) for lp in log_pi])
    exact = torch.cat([g.flatten() for g in torch.autograd.grad(
        f_divergence(divergence, log_pi.double(), log_potential - log_z), list(pi.parameters()))]).double()
    draws = torch.tensor(list(itertools.product(range(len(space)), repeat=draw_size)))  # (D, N)
    prob = log_q[draws].sum(1).exp()  # each draw's exact probability under q
    lp = log_pi.detach().double()[draws]
    log_h = torch.full(draws.shape, -math.log(draw_size), dtype=torch.float64)
    if z == "low":
        log_z_hat = log_z + float((log_potential - log_z - log_pi.detach().double()).min()) - 1.0
    elif z == "draw":
        log_z_hat = draw_log_z(lp, log_q[draws], (log_potential - log_q)[draws], log_h)  # (D, 1)
    else:
        log_z_hat = log_z
    args = (lp, log_q[draws], (log_potential - log_q)[draws], log_h, divergence)
    if baseline == "whole":
        plain = fdpg_coefficients(*args, log_z=log_z_hat)
        rho = torch.exp(lp - log_q[draws] - math.log(draw_size))
        fprime = plain / rho
        coef = rho * (fprime - (rho * fprime).sum(1, keepdim=True) / rho.sum(1, keepdim=True))
    else:
        coef = fdpg_coefficients(*args, log_z=log_z_hat, baseline=baseline == "loo")
    expected = (prob.unsqueeze(1) * coef).flatten() @ jac.double()[draws.flatten()]
    return SimpleNamespace(expected=expected, exact=exact, draws=draws, coef=coef, log_z=log_z_hat,
                           fprime=fdpg_fprime(*args[:3], divergence, log_z=log_z_hat))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_the_leave_one_out_baseline_leaves_the_exact_expected_update(divergence, on_policy):
    """By enumeration of every draw of 3: the plain and the leave-one-out updates are unbiased, exactly;
    the mean-over-the-draw baseline (item i included, the old one) is not (off by about 1/N of the update)."""
    plain, exact = (lambda u: (u.expected, u.exact))(exact_expected_update(divergence, 3, on_policy, "none"))
    loo = exact_expected_update(divergence, 3, on_policy, "loo").expected
    whole = exact_expected_update(divergence, 3, on_policy, "whole").expected
    scale = float(exact.norm())
    assert float((plain - exact).norm()) < 1e-5 * scale  # float32 gradients of log pi
    assert float((loo - exact).norm()) < 1e-5 * scale, (divergence, on_policy)
    assert float((whole - exact).norm()) > 0.05 * scale, (divergence, on_policy)  # the bias the test catches


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("on_policy", [True, False], ids=["on_policy", "off_policy"])
def test_tv_stalls_on_a_low_z_hat_and_not_on_the_draws_own(on_policy):
    """By enumeration of every draw of 3 on 15 outputs: with log Z-hat below every log(p/pi) (an
    underestimated Z), every tv sign is -1, and with the baseline every draw's update is exactly 0 (the
    stall of docs/methods.md). With each draw's own Z-hat (normalise=draw_z) no draw of two or more distinct
    outputs has one sign (sum_i rho_i (1 - 1/t_i) = 0: draw_log_z), and the expected update points along
    grad TV(pi, p): cosine 0.985, norm 1.25-1.29 times (the ratio estimator's O(1/N) bias at N = 3)."""
    low = exact_expected_update("tv", 3, on_policy, "loo", z="low")
    assert (low.fprime == -0.5).all()
    assert (low.coef == 0).all() and (low.expected == 0).all()
    assert all(stalled(f) for f in low.fprime)
    own = exact_expected_update("tv", 3, on_policy, "loo", z="draw")
    distinct = torch.tensor([len(set(d.tolist())) > 1 for d in own.draws])
    assert not any(stalled(f) for f in own.fprime[distinct])
    assert cosine(own.expected, own.exact) > 0.95  # 0.985
    assert 0.5 < float(own.expected.norm() / own.exact.norm()) < 2  # 1.25 to 1.29: the ratio's bias at N = 3


def test_the_draws_own_z_hat_is_the_mean_weight_on_pi_s_own_draw():
    """draw_log_z: sum_i h_i w_i / sum_i h_i pi/q; on pi's own draw (pi = q, shares 1/N) the mean weight, as
    ppo_dpg's draw_z; batched along the last dimension; a draw of zero weights gives 0 (Z taken as 1)."""
    log_w = torch.tensor([[-1.0, 0.5, 2.0], [0.0, -3.0, 1.0]], dtype=torch.float64)
    log_q = torch.log(torch.tensor([[0.2, 0.3, 0.1], [0.5, 0.1, 0.1]], dtype=torch.float64))
    log_h = torch.full((2, 3), -math.log(3), dtype=torch.float64)
    on = draw_log_z(log_q, log_q, log_w, log_h)
    assert torch.allclose(on.squeeze(1), torch.logsumexp(log_w, 1) - math.log(3))
    log_pi = log_q + torch.tensor([[0.3, -0.2, 0.1], [0.0, 0.4, -1.0]], dtype=torch.float64)
    off = draw_log_z(log_pi, log_q, log_w, log_h)
    assert torch.allclose(off.squeeze(1), torch.logsumexp(log_w, 1) - torch.logsumexp(log_pi - log_q, 1))
    zero = draw_log_z(log_pi[0], log_q[0], torch.full((3,), -math.inf, dtype=torch.float64), log_h[0])
    assert float(zero) == 0.0


def stall_module(normalise: str, log_norm: float | None = None):
    """An FDPGModule of tv with the baseline on draws of r, pi starting as r (no trainer), its running Z-hat
    optionally replaced."""
    from gam_rl.methods.contract import Training2Inputs
    from gam_rl.methods.fdpg import FDPGModule

    r, pi = policy(0), policy(0)  # pi starts as r (init=r)
    potential, _ = gam_target(r)
    draws = ProposalDraws(r, potential, minibatch=64, proposal_batch=None, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=MAX_LEN, generator=torch.Generator().manual_seed(0))
    cfg = FDPGConfig(name="fdpg_tv", divergence="tv", baseline=True, minibatch=64, normalise=normalise, init="r")
    space = all_outputs(MAX_LEN)
    inputs = Training2Inputs(pi=pi, r=r, p_lambda=potential, true_process=None, train=space, valid=space,
                             max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1.0, ce_valid_p_lambda=None, log_z_hat=None)
    module = FDPGModule(pi, draws, cfg, inputs, potential, target_ce_valid=None, valid_log_p=None)
    if log_norm is not None:
        module.log_norm = lambda: log_norm
    return module


def test_the_stall_is_counted_in_results_and_warned_about(caplog):
    """fdpg_stalled_updates: the fraction of updates whose f' was the same for every item. A running Z-hat
    e^-30 too low stalls every update (its gradient is exactly 0), and fdpg_log_z_gap (the draw's own log
    Z-hat minus the running one) shows it 30 nats off, with warnings at the end of training; the running
    Z-hat itself and the draw's own stall none (no gap with the draw's own: it is the one used)."""
    import logging

    low = stall_module("running_z", log_norm=-30.0)
    for _ in range(3):
        loss = low.training_step(0, 0)
        assert grads(loss, low.pi).abs().max() == 0
    assert low.results()["fdpg_stalled_updates"] == 1.0
    assert low.results()["fdpg_log_z_gap"] == pytest.approx(30 + low.draws.running_z.log_z, abs=1.0)
    with caplog.at_level(logging.WARNING, logger="gam_rl"):
        low.on_train_end()
    assert "3 of 3 updates (100%) stalled" in caplog.text and "method.normalise=draw_z" in caplog.text
    assert "nats above the running one" in caplog.text
    running, own = stall_module("running_z"), stall_module("draw_z")
    for module in (running, own):
        for _ in range(3):
            assert grads(module.training_step(0, 0), module.pi).abs().max() > 0
        assert module.results()["fdpg_stalled_updates"] == 0.0
    assert abs(running.results()["fdpg_log_z_gap"]) < 0.5 and own.results()["fdpg_log_z_gap"] is None  # 0.09
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gam_rl"):
        running.on_train_end()
        own.on_train_end()
    assert caplog.text == ""


def test_fdpg_takes_the_draws_own_z_hat():
    assert FDPGConfig(name="fdpg_tv", divergence="tv", normalise="draw_z").problems() == []
    assert FDPGConfig(name="fdpg_tv", divergence="tv", normalise="none").problems()


def test_fdpg_weights_come_from_pi_without_dropout(monkeypatch):
    """With dropout, the coefficients read pi's eval-mode log-probabilities (the same for every mask), and the
    gradient the training pass's: FDPGModule hands fdpg_loss both."""
    from gam_rl.methods import fdpg
    from gam_rl.methods.contract import Training2Inputs
    from gam_rl.methods.fdpg import FDPGModule

    r = policy(0)
    torch.manual_seed(3)
    pi = LSTMPolicy(8, 1, dropout=0.5).train()
    potential, _ = gam_target(r)
    draws = ProposalDraws(r, potential, minibatch=64, proposal_batch=None, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=MAX_LEN,
                          generator=torch.Generator().manual_seed(0))
    cfg = FDPGConfig(name="fdpg_rkl", divergence="rkl", baseline=True, minibatch=64)
    space = all_outputs(MAX_LEN)
    inputs = Training2Inputs(pi=pi, r=r, p_lambda=potential, true_process=None, train=space, valid=space,
                             max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1.0, ce_valid_p_lambda=None, log_z_hat=None)
    module = FDPGModule(pi, draws, cfg, inputs, potential, target_ce_valid=None, valid_log_p=None)
    seen = []
    monkeypatch.setattr(fdpg, "fdpg_loss", lambda log_pi, draw, div, **kw: seen.append((log_pi, draw, kw)) or
                        log_pi.sum())
    draw = draws.next_batch()
    monkeypatch.setattr(draws, "next_batch", lambda: draw)
    for _ in range(2):
        module.training_step(0, 0)
    with eval_mode(pi):
        clean = pi.log_prob(draw.tokens)
    (a, _, kw_a), (b, _, kw_b) = seen
    assert not torch.allclose(a, b)  # two dropout masks in the training passes
    assert torch.allclose(kw_a["weight_log_pi"], clean) and torch.allclose(kw_b["weight_log_pi"], clean)
    assert pi.training  # eval mode only for the weights' pass
    # f' is computed once per update (the stall check's), from the same eval-mode weights, and handed over
    fprime = fdpg.fdpg_fprime(clean.double(), draw.log_q, draw.log_w, "rkl", log_z=module.log_norm())
    assert torch.allclose(kw_a["fprime"], fprime) and torch.allclose(kw_b["fprime"], fprime)
