"""Exact evaluation (gam_rl/exact.py): the enumerated space, the prefix-tree scorer, exact Z and
divergences against brute force, the importance-sampled Z within its standard errors, eval.exact
refused above the cap, and a toy run that records the exact numbers."""

import csv
import json
import math
import subprocess
import sys

import pytest
import torch

from gam_rl.estimators import importance_z
from gam_rl.exact import (
    MAX_OUTPUTS,
    ExactTarget,
    OutputSpace,
    exact_results,
    kl,
    max_len_problem,
    num_outputs,
    output_batches,
    qrs_divergences,
    tv,
)
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import gam
from gam_rl.process import MotifProcess
from gam_rl.tokens import EOS, decode, encode
from tests.exact import all_outputs
from tests.test_config import preflight


def test_the_space_is_every_output_once_in_integer_order():
    tokens = torch.cat(list(output_batches(4, batch_size=3)))  # chunks smaller than a level
    assert len(tokens) == num_outputs(4) == 31
    strings = decode(tokens)
    finished = (tokens == 2).any(dim=1)
    assert int(finished.sum()) == 15 and len(set(zip(strings, finished.tolist(), strict=True))) == 31
    assert strings[:7] == ["", "0", "1", "00", "01", "10", "11"] and strings[-1] == "1111" and not finished[-1]
    assert max_len_problem(19) is None and num_outputs(19) <= MAX_OUTPUTS < num_outputs(20)
    assert "max_len=20" in max_len_problem(20) and "eval.exact=false" in max_len_problem(20)


def test_the_prefix_tree_scores_every_output_as_the_policy_does():
    torch.manual_seed(0)
    policy = LSTMPolicy(12, 2, dropout=0.3)
    space = OutputSpace(7)
    with eval_mode(policy):
        direct = space.score(policy.log_prob)
    tree = space.log_prob(policy)
    assert torch.allclose(tree, direct, atol=1e-5)
    assert float(torch.logsumexp(tree, 0)) == pytest.approx(0.0, abs=1e-5)  # a distribution over the space


def small_gam(max_len: int = 7):
    torch.manual_seed(1)
    r = LSTMPolicy(12, 1, dropout=0.0)
    features = Features(["motif", "first_bit", "M"], "11", max_len=max_len)
    return r, gam(r, features, torch.tensor([-2.0, 0.5, 1.0]))


def test_exact_z_and_divergences_match_brute_force():
    r, p_lambda = small_gam()
    space = OutputSpace(7)
    process = MotifProcess("11", 4)
    target = ExactTarget.of(p_lambda, space, "cpu", process.log_prob)
    tokens = torch.cat([b.long() for b in space.batches])
    with torch.no_grad():
        log_potential = p_lambda.log_potential(tokens).double()
    assert target.log_z == pytest.approx(float(torch.logsumexp(log_potential, 0)), abs=1e-6)
    # p_true: uniform over the 8 strings of 4 bits with 11, then EOS
    assert int(torch.isfinite(target.log_p_true).sum()) == 8 == process.num_strings
    log_r = space.log_prob(r)
    brute = {"kl_p_r": float((target.log_p.exp() * (target.log_p - log_r)).sum()),
             "kl_r_p": float((log_r.exp() * (log_r - target.log_p)).sum()),
             "tv_p_r": 0.5 * float((target.log_p.exp() - log_r.exp()).abs().sum()),
             "kl_true_r": float(-math.log(8) - log_r[torch.isfinite(target.log_p_true)].mean())}
    got = target.policy_divergences(r, "r")
    for key, value in brute.items():
        assert got[key] == pytest.approx(value, rel=1e-6), key
    assert kl(target.log_p, target.log_p) == 0.0 and tv(target.log_p, log_r) == pytest.approx(got["tv_p_r"])


def test_importance_sampled_z_is_within_three_standard_errors_of_the_exact_one():
    r, p_lambda = small_gam()
    exact = ExactTarget.of(p_lambda, OutputSpace(7), "cpu")
    for seed in (0, 1, 2):
        z = importance_z(r, p_lambda, 20000, 5000, 7, torch.Generator().manual_seed(seed))
        error_se = (z.z - math.exp(exact.log_z)) / (z.rel_se * z.z)
        assert abs(error_se) <= 3.0, (seed, error_se)


def test_exact_results_errors_in_standard_errors():
    r, p_lambda = small_gam()
    target = ExactTarget.of(p_lambda, OutputSpace(7), "cpu")
    test = encode(["11", "0110", "111", "1"])
    with torch.no_grad():
        log_p_test = p_lambda.log_potential(test)
    z = math.exp(target.log_z)
    ce_exact = -float((log_p_test.double() - target.log_z).mean()) / 5
    out = exact_results(target, r, None, log_p_test, 5,
                        {"z_hat": 1.1 * z, "z_rel_se": 0.05, "ce_test_p_lambda": ce_exact + 0.002,
                         "ce_test_p_lambda_se": 0.001})
    assert out["z_hat_error_se"] == pytest.approx(0.1 / (0.05 * 1.1))  # (Z-hat - Z) / (rel_se Z-hat)
    assert out["ce_test_p_lambda_error_se"] == pytest.approx(2.0)
    assert out["ce_test_p_lambda"] == pytest.approx(ce_exact) and "kl_p_pi" not in out


def test_eval_exact_above_the_cap_is_refused_before_any_work():
    problems = preflight(["eval.exact=true"])  # the cpu profile's max_len 61
    assert any("eval.exact=true with max_len=61" in p for p in problems), problems
    assert preflight(["profile=toy"]) == []


def test_a_toy_run_records_the_exact_numbers(tmp_path):
    """The toy profile end to end with a twist method (ac_dpg)."""
    run_dir = tmp_path / "toy"
    quick = ["r.max_epochs=3", "training1.max_epochs=3", "z.samples=20000", "eval.samples=200", "model.hidden=16",
             "method.max_epochs=2", "method.updates_per_epoch=5", "method.minibatch=100", "method.critic_warmup=2"]
    # ac_dpg: the exact section also holds its critic's learned log Z and prefix values
    proc = subprocess.run([sys.executable, "-m", "gam_rl.cli", "profile=toy", "logger=csv", "method=ac_dpg",
                           f"hydra.run.dir={run_dir}", *quick], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((run_dir / "results.json").read_text())
    exact = results["exact"]
    assert exact["outputs"] == num_outputs(16) and exact["max_len"] == 16
    assert exact["log_z"] == pytest.approx(results["log_z_hat"], abs=0.1)
    assert abs(exact["z_hat_error_se"]) <= 3.0 and abs(exact["ce_test_p_lambda_error_se"]) <= 3.0
    assert exact["ce_test_pi"] == pytest.approx(results["ce_test_pi"], rel=1e-5)
    for key in ("kl_p_pi", "kl_pi_p", "tv_p_pi", "kl_true_pi", "kl_p_r", "kl_r_p", "tv_p_r", "kl_true_r", "kl_true_p"):
        assert math.isfinite(exact[key]) and exact[key] >= 0.0, key
    rows = list(csv.DictReader(open(run_dir / "metrics.csv")))
    assert {r["name"] for r in rows if r["stage"] == "exact"} >= {"kl_p_pi", "log_z", "z_hat_error_se"}
    curve = [r for r in rows if r["stage"] == "dpg" and r["name"] == "exact_kl_p_pi"]
    draws = [r for r in rows if r["stage"] == "dpg" and r["name"] == "draws"]
    assert len(curve) == 2 and [r["step"] for r in curve] == [r["step"] for r in draws]
    # the kept pi is the best check's (CE(V)), or r when no check beat it: its exact KL is one of those
    assert any(float(r["value"]) == pytest.approx(exact["kl_p_pi"], rel=1e-4) for r in curve) or (
        results["t2_kept_start"] and exact["kl_p_pi"] == pytest.approx(exact["kl_p_r"], rel=1e-6))
    assert results["method"] == "ac_dpg_separate" and results["t2_learned_log_z"] == pytest.approx(
        exact["learned_log_z"], abs=1e-4)
    # log Z again, independently of the exact section's prefix tree: r from r.pt and lambda from results.json,
    # log sum_x r(x) exp(lambda . phi(x)) over every output as one tensor
    saved = torch.load(run_dir / "r.pt")
    r = LSTMPolicy(**saved["config"]).eval()
    r.load_state_dict(saved["state_dict"])
    outputs = all_outputs(16)
    features = Features("1001111", "10011", max_len=16)
    lam = torch.tensor(list(results["lambda"].values())).double()
    with torch.no_grad():
        log_p = torch.cat([r.log_prob(b).double() + (features(b).double() @ lam)
                           for b in outputs.split(16384)])
    log_z = float(torch.logsumexp(log_p, 0))
    assert exact["log_z"] == pytest.approx(log_z, abs=1e-5)
    assert exact["learned_log_z_error"] == pytest.approx(results["t2_learned_log_z"] - log_z, abs=1e-4)
    # the run's twist.pt gives back the same values: V(empty prefix) is the learned log Z
    from gam_rl.methods.saved_twist import load_twist

    assert float(load_twist(run_dir, r)(torch.tensor([[EOS]]))[0, 0]) == pytest.approx(
        results["t2_learned_log_z"], abs=1e-5)
    assert exact["learned_values_prefixes"] == 15 and math.isfinite(exact["learned_values_max_error"])
    assert len([r for r in rows if r["stage"] == "dpg" and r["name"] == "learned_log_z"]) == 2


def test_qrs_divergences_are_zero_at_the_bound_and_grow_below_it():
    r, p_lambda = small_gam()
    target = ExactTarget.of(p_lambda, OutputSpace(7), "cpu")
    log_r = target.space.log_prob(r)
    log_w_max = float((target.log_p + target.log_z - log_r).max())  # max P/r over the space
    at_bound = qrs_divergences(target, log_r, log_w_max)
    assert at_bound["qrs_tv"] == pytest.approx(0.0, abs=1e-9) and at_bound["qrs_kl"] == pytest.approx(0.0, abs=1e-9)
    assert at_bound["qrs_acceptance"] == pytest.approx(math.exp(target.log_z - log_w_max))  # Z / beta: rejection
    lower = [qrs_divergences(target, log_r, log_w_max - d) for d in (0.5, 1.5, 3.0)]
    assert 0 < lower[0]["qrs_tv"] < lower[1]["qrs_tv"] < lower[2]["qrs_tv"]  # cheaper, further from p
    assert at_bound["qrs_acceptance"] < lower[0]["qrs_acceptance"] < lower[2]["qrs_acceptance"] <= 1.0


def test_the_exact_section_reaches_the_wandb_summary():
    from gam_rl.cli import wandb_summary

    summary = wandb_summary({"ce_test_pi": 0.5, "exact": {"kl_p_pi": 0.1, "log_z": -1.0, "outputs": 131071}})
    assert summary["exact/kl_p_pi"] == 0.1 and summary["exact/log_z"] == -1.0 and summary["ce_test_pi"] == 0.5
