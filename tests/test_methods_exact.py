"""Every Training-2 method, old and new, judged by exact divergences on an enumerable problem:
from the same start (pi = r), each lowers KL(p_lambda || pi) below a stated bound within a
stated number of draws, except pg, which maximises E_pi[P] and collapses (the paper's finding)."""

import dataclasses

import pytest
import torch

from gam_rl.exact import ExactTarget, OutputSpace, learned_value_errors
from gam_rl.features import Features
from gam_rl.methods.ac_dpg import ACDPGConfig, ACDPGModule
from gam_rl.methods.contract import Training2Inputs
from gam_rl.methods.ctl import CTLConfig
from gam_rl.methods.distill import DistillConfig
from gam_rl.methods.dpg import DPGConfig
from gam_rl.methods.draws import ProposalDraws
from gam_rl.methods.fdpg import FDPGConfig
from gam_rl.methods.pcl import PCLConfig
from gam_rl.methods.pg import PGConfig
from gam_rl.methods.ppo_dpg import PPODPGConfig
from gam_rl.methods.subtb import SubTBConfig
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.stages.mle import MLEConfig
from gam_rl.tokens import encode
from tests.conftest import train_method

MAX_LEN = 8  # 511 outputs
UPDATES, MINIBATCH = 60, 128  # 7,680 draws per DPG-family method
BOUND = 0.25  # every method ends below 0.25 x KL(p_lambda || r) = 1.37 nats (measured: 0.12-0.18 x)


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    r = LSTMPolicy(16, 1, dropout=0.0).eval()
    features = Features(["motif", "first_bit", "M"], "101", max_len=MAX_LEN)
    p_lambda = gam(r, features, torch.tensor([-2.5, 1.0, 2.0]))  # motif wanted, a leading 1, longer strings
    target = ExactTarget.of(p_lambda, OutputSpace(MAX_LEN), "cpu")
    valid = encode(["1010", "0101", "11011", "1101", "10100", "101", "0101101", "1110101"])
    return r, p_lambda, target, valid


def dpg_family(cls=DPGConfig, **options):
    base = dict(name="m", init="r", lr=0.01, minibatch=MINIBATCH, updates_per_epoch=UPDATES // 4, max_epochs=4,
                patience=4, clip=5.0)
    if "normalise" in {f.name for f in dataclasses.fields(cls)}:
        base["normalise"] = "running_z"
    return cls(**{**base, **options})


METHODS = {
    "dpg_off": dpg_family(algorithm="dpg_off"),
    "dpg_on": dpg_family(algorithm="dpg_on"),
    "fdpg_kl": dpg_family(FDPGConfig, divergence="kl"),
    "fdpg_rkl": dpg_family(FDPGConfig, divergence="rkl"),
    "fdpg_js": dpg_family(FDPGConfig, divergence="js"),
    "fdpg_tv": dpg_family(FDPGConfig, divergence="tv"),
    "kl_control": dpg_family(FDPGConfig, divergence="rkl", on_policy=True, baseline=True),
}


def start(r: LSTMPolicy) -> LSTMPolicy:
    pi = LSTMPolicy(16, 1, dropout=0.0)
    pi.load_state_dict(r.state_dict())
    return pi.train()


SEEDS = (1, 2, 3)  # the draws' seeds every trained method is judged on, each within the bounds
REVERSE_BOUND = 0.35  # KL(pi || p_lambda) in nats at every seed (measured 0.14-0.27 for the DPG family)


def run_dpg(problem, cfg, seed: int = 1):
    r, p_lambda, target, valid = problem
    pi = start(r)
    # CE(V, q) = +inf: the swap gate moves q to pi at the first check, so the kl and js methods
    # here sample pi's copies as the tuned schedules do, and CE(V) on a tiny V decides nothing else
    fit = train_method(cfg, pi, r, p_lambda, valid, max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1e9, seed=seed)
    return fit, target.policy_divergences(pi)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_lowers_exact_kl_from_r(problem, name):
    """On three draw seeds, each: KL(p_lambda || pi) below BOUND x KL(p_lambda || r) (measured 0.09-0.19 x)
    and KL(pi || p_lambda) below REVERSE_BOUND: a pi that covers p but is spread wide fails the second."""
    r, _, target, _ = problem
    start_kl = target.policy_divergences(r, "r")["kl_p_r"]
    for seed in SEEDS:
        fit, final = run_dpg(problem, METHODS[name], seed)
        assert fit.draws <= UPDATES * MINIBATCH
        assert final["kl_p_pi"] < BOUND * start_kl and final["kl_pi_p"] < REVERSE_BOUND, (name, seed, start_kl, final)


def test_fdpg_kl_trains_exactly_as_dpg_off(problem):
    """Same draws, same updates: the divergence kl of f-DPG is DPG_off, to float rounding."""
    _, dpg = run_dpg(problem, METHODS["dpg_off"])
    _, fdpg = run_dpg(problem, METHODS["fdpg_kl"])
    assert fdpg == pytest.approx(dpg, rel=1e-4)


def test_distillation_by_rs_and_by_qrs_lowers_exact_kl(problem):
    r, p_lambda, target, valid = problem
    start_kl = target.policy_divergences(r, "r")["kl_p_r"]
    mle = MLEConfig(lr=0.01, batch_size=100, max_epochs=8, patience=3)
    for options in (dict(sampler="rs"), dict(sampler="qrs", max_tv=0.02, pilot=5000)):
        cfg = DistillConfig(name="distill", init="r", size=1000, valid_size=200, proposal_batch=2000, mle=mle,
                            **options)
        pi = start(r)
        fit = train_method(cfg, pi, r, p_lambda, valid, max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1e9, seed=2)
        final = target.policy_divergences(pi)
        assert fit.draws < 60_000 and fit.pi is pi
        assert final["kl_p_pi"] < BOUND * start_kl, (options, start_kl, final)


def test_pg_collapses_where_kl_control_does_not(problem):
    """Reward P (pg) pulls pi onto P's mode: KL(p_lambda || pi) grows from r's; the KL-regularised
    reward (kl_control) of the same draws does not."""
    r, _, target, _ = problem
    start_kl = target.policy_divergences(r, "r")["kl_p_r"]
    _, pg = run_dpg(problem, dpg_family(PGConfig, algorithm="pg", lr=0.05))
    _, control = run_dpg(problem, dataclasses.replace(METHODS["kl_control"], lr=0.05))
    assert pg["kl_p_pi"] > start_kl > BOUND * start_kl > control["kl_p_pi"], (start_kl, pg, control)


# ---- the twist methods (methods/twist.py): pcl, ac_dpg, ppo_dpg ------------------------------------

# exact KL(p_lambda || pi) below BOUND x KL(p_lambda || r) (measured: ppo_dpg 0.058 x, pcl 0.127 x, ac_dpg
# 0.254 x), and |learned log Z - log Z| below LOG_Z_BOUND (measured: ac_dpg 0.011, pcl 0.18)
TWIST_BOUND = {"ppo_dpg": 0.1, "pcl": 0.2, "ac_dpg": 0.35}
LOG_Z_BOUND = {"ac_dpg": 0.05, "pcl": 0.25}


TWIST = {
    "pcl": dpg_family(PCLConfig, algorithm="pcl", critic="separate", critic_lr=0.02, critic_warmup=20),
    "ac_dpg": dpg_family(ACDPGConfig, algorithm="ac_dpg", critic="separate", critic_lr=0.02, critic_warmup=100),
    "ppo_dpg": dpg_family(PPODPGConfig, algorithm="ppo_dpg", minibatch=64, proposal_batch=MINIBATCH, ppo_epochs=2,
                          normalise="draw_z"),
}


def run_twist(problem, cfg, seed: int = 1):
    r, p_lambda, target, valid = problem
    pi = start(r)
    fit = train_method(cfg, pi, r, p_lambda, valid, max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1e9, seed=seed)
    learned = fit.exact_extras(target) if fit.exact_extras is not None else {}
    return fit, target.policy_divergences(pi), learned


# KL(pi || p_lambda) at every seed (measured: ac_dpg 0.43-0.46, pcl 0.17-0.19, ppo_dpg 0.06-0.11)
TWIST_REVERSE_BOUND = {"ppo_dpg": 0.2, "pcl": 0.3, "ac_dpg": 0.6}


@pytest.mark.parametrize("name", sorted(TWIST))
def test_twist_method_lowers_exact_kl(problem, name):
    """Within the DPG family's draws (plus the critic's warm-up), both KLs; the learned log Z against the exact
    one. Seed 1 here; all three seeds under the `slow` marker (make test-slow): these learners train a
    second network and take 2-6 s a seed."""
    check_twist(problem, name, 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TWIST))
def test_twist_method_lowers_exact_kl_on_every_seed(problem, name):
    for seed in SEEDS[1:]:
        check_twist(problem, name, seed)


def check_twist(problem, name: str, seed: int) -> None:
    r, _, target, _ = problem
    start_kl = target.policy_divergences(r, "r")["kl_p_r"]
    fit, final, learned = run_twist(problem, TWIST[name], seed)
    assert fit.draws <= (UPDATES + TWIST[name].critic_warmup) * MINIBATCH
    assert final["kl_p_pi"] < TWIST_BOUND[name] * start_kl, (name, seed, start_kl, final)
    assert final["kl_pi_p"] < TWIST_REVERSE_BOUND[name], (name, seed, final)
    if name in LOG_Z_BOUND:  # V(empty prefix), recorded in the results, is log Z
        assert fit.learned_log_z == pytest.approx(learned["learned_log_z"], abs=1e-4)
        assert abs(learned["learned_log_z_error"]) < LOG_Z_BOUND[name], learned
    else:
        assert fit.exact_extras is None and fit.learned_log_z is None


def test_the_square_critic_is_jensen_biased_below_log_z(problem):
    """The critic alone (its warm-up), on draws of r, with the square loss: its fixed point is E_r[y],
    Jensen's gap below V*, so V(empty prefix) lands well below log Z (measured: 0.9 nats below). The
    exp loss's fixed point is V* for any proposal: ac_dpg above learns log Z within 0.05 with it."""
    r, p_lambda, target, valid = problem
    cfg = dpg_family(ACDPGConfig, algorithm="ac_dpg", critic="head", critic_lr=0.05, critic_fit="square")
    draws = ProposalDraws(r, p_lambda, minibatch=MINIBATCH, proposal_batch=None, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=MAX_LEN,
                          generator=torch.Generator().manual_seed(1))
    pi = start(r)
    inputs = Training2Inputs(pi=pi, r=r, p_lambda=p_lambda, true_process=None, train=valid, valid=valid,
                             max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1e9, ce_valid_p_lambda=None, log_z_hat=None,
                             seed=1)
    module = ACDPGModule(pi, draws, cfg, inputs, target=p_lambda, target_ce_valid=None, valid_log_p=None)
    module.warm_up(100)
    assert learned_value_errors(target, r, module.value_function())["learned_log_z_error"] < -0.3


# ---- the plug-in methods added as one file and one YAML each: subtb, ctl --------------------------------

# over three draw seeds, every seed: exact KL(p_lambda || pi) below 0.25 x KL(p_lambda || r) (measured: subtb
# 0.12-0.15 x, ctl 0.13-0.17 x), KL(pi || p_lambda) below 0.35 nats (measured 0.18-0.24, 0.20-0.24), and
# the learned log Z: subtb's V(empty prefix), pulled below log Z by about KL(pi || p) while pi != p (its
# balance is a square in log space; measured -0.26 to -0.27), ctl's importance-sampled from pi (+-0.02)
NEW = {
    "subtb": (dpg_family(SubTBConfig, algorithm="subtb", lr=0.03, critic="separate", critic_lr=0.05,
                         critic_warmup=20), 0.5),
    "ctl": (dpg_family(CTLConfig, algorithm="ctl", positives=5000, proposal_batch_rs=2000, z_samples=5000), 0.05),
}


@pytest.mark.parametrize("name", sorted(NEW))
def test_plugin_method_lowers_exact_kl(problem, name):
    """Seed 1; the other two under the `slow` marker (make test-slow)."""
    check_plugin(problem, name, SEEDS[:1])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(NEW))
def test_plugin_method_lowers_exact_kl_on_every_seed(problem, name):
    check_plugin(problem, name, SEEDS[1:])


def check_plugin(problem, name: str, seeds) -> None:
    r, p_lambda, target, valid = problem
    start_kl = target.policy_divergences(r, "r")["kl_p_r"]
    cfg, log_z_bound = NEW[name]
    for seed in seeds:
        pi = start(r)
        fit = train_method(cfg, pi, r, p_lambda, valid, max_len=MAX_LEN, symbols=MAX_LEN, ce_valid_r=1e9, seed=seed)
        final = target.policy_divergences(pi)
        assert final["kl_p_pi"] < BOUND * start_kl and final["kl_pi_p"] < 0.35, (name, seed, start_kl, final)
        assert abs(fit.learned_log_z - target.log_z) < log_z_bound, (name, seed, fit.learned_log_z, target.log_z)
        if name == "subtb":  # V(empty prefix) is the learned log Z, and the exact section has its prefix errors
            assert fit.exact_extras(target)["learned_log_z"] == pytest.approx(fit.learned_log_z, abs=1e-6)
