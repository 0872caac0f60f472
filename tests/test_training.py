"""Training-1 and Training-2 on problems small enough to enumerate every output."""

import numpy as np
import pytest
import torch

from gam_rl.features import Features
from gam_rl.metrics import eval_mode
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import GAMPotential, TrueProcessPotential
from gam_rl.process import MotifProcess
from gam_rl.stages.training1 import fit_lambda
from gam_rl.stages.training2 import DPGModule, DPGOptions, train_distill, train_dpg
from gam_rl.tokens import encode
from tests.exact import all_outputs, entropy, exact_distribution, kl


def proposal(seed=0, hidden=8):
    torch.manual_seed(seed)
    r = LSTMPolicy(hidden, 1, dropout=0.0).eval()
    with torch.no_grad():
        r.head.bias.copy_(torch.tensor([0.9, 0.9, -0.9]))  # long-ish sequences
    return r


@pytest.mark.parametrize("estimator,reuse", [("snis_r", "epoch"), ("rs", "epoch"), ("snis_r", "run")])
def test_training1_matches_data_moments_exactly_enumerated(estimator, reuse):
    n, motif, max_len = 7, "110", 9
    process = MotifProcess(motif, n)
    data = encode(process.sample_strings(1000, np.random.default_rng(0)))
    r = proposal()
    features = Features("0001111", motif)  # first bit + distractors: finite lambdas fit them
    fit = fit_lambda(r, features, data, estimator=estimator, lr=4.0, chunk=500, samples_per_step=4000,
                     buffer=40000, max_len=max_len, max_epochs=40, patience=40, seed=1, reuse=reuse)
    space = all_outputs(max_len)
    with torch.no_grad():
        log_p, _ = exact_distribution(GAMPotential(r, features, fit.lam).log_potential(space))
        exact_model = (log_p.exp().unsqueeze(1) * features(space).double()).sum(0)
    mismatch = float((exact_model - features(data).double().mean(0)).abs().sum())
    # Tolerance: each step's estimate has a standard error of about 1/sqrt(ESS) ~ 0.01-0.02 per
    # feature, and lr / epoch averages the noise down; 4 features -> L1 below 0.05 leaves
    # headroom. At lambda = 0 the mismatch is far larger (checked below).
    assert mismatch < 0.05, (mismatch, fit.lam)
    with torch.no_grad():
        log_r, _ = exact_distribution(r.log_prob(space))
    start = float(((log_r.exp().unsqueeze(1) * features(space).double()).sum(0)
                   - features(data).double().mean(0)).abs().sum())
    assert start > 0.3


def true_target_problem():
    process = MotifProcess("11", 6)  # p uniform over 43 strings
    potential = TrueProcessPotential(process)
    space = all_outputs(8)
    log_p, _ = exact_distribution(potential.log_potential(space))
    valid = encode(process.sample_strings(400, np.random.default_rng(5)))
    return process, potential, space, log_p, valid


def small_schedule(**options) -> DPGOptions:
    """DPG_off on the 43-string problem: 25 updates of 256 sequences per check."""
    base = dict(algorithm="dpg_off", lr=0.02, minibatch=256, updates_per_epoch=25, max_epochs=16, patience=16,
                clip=1.0, max_len=8)
    return DPGOptions(**{**base, **options})


def policy_kl(log_p, pi, space):
    with eval_mode(pi):
        return kl(log_p, pi.log_prob(space))


def test_dpg_off_learns_the_target_and_swaps_only_to_better_policies():
    _, potential, space, log_p, valid = true_target_problem()
    r = proposal(seed=2, hidden=16)
    torch.manual_seed(3)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    kl_r = policy_kl(log_p, r, space)
    fit = train_dpg(pi, r, potential, valid, small_schedule(), symbols_per_seq=7,
                    ce_valid_proposal=-float(r.log_prob(valid).mean()) / 7, seed=4)
    kl_pi = policy_kl(log_p, pi, space)
    # Threshold: from KL(p || r) of several nats, DPG must get within 0.25 nats of p
    # (a policy putting 78% of its mass on p's support in the right proportions).
    assert kl_r > 2.0 and kl_pi < 0.25, (kl_r, kl_pi)
    assert len(fit.swaps) >= 1
    ce_q = [s["ce_valid_q"] for s in fit.swaps]
    assert all(s["ce_valid_pi"] < s["ce_valid_q"] for s in fit.swaps)  # never to a worse policy
    assert all(a > b for a, b in zip(ce_q, ce_q[1:], strict=False))
    assert fit.samples == fit.updates * 256


def test_pg_concentrates_its_mass_below_the_target_entropy():
    _, potential, space, log_p, valid = true_target_problem()
    r = proposal(seed=2, hidden=16)
    torch.manual_seed(3)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    train_dpg(pi, r, potential, valid, small_schedule(algorithm="pg", max_epochs=12, patience=12), symbols_per_seq=7,
              ce_valid_proposal=10.0, seed=4)
    with eval_mode(pi):
        pi_entropy = entropy(pi.log_prob(space).double())
    assert pi_entropy < entropy(log_p) - 0.5, (pi_entropy, entropy(log_p))


def test_distill_reaches_small_kl_to_p_lambda():
    max_len = 7
    r = proposal(seed=6, hidden=8)
    features = Features("1000000", "11")
    gam = GAMPotential(r, features, torch.tensor([-5.0]))
    space = all_outputs(max_len)
    with torch.no_grad():
        log_p, _ = exact_distribution(gam.log_potential(space))
    torch.manual_seed(7)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    empty = torch.empty(0, 1, dtype=torch.long)
    fit = train_distill(pi, gam, empty, empty, size=6000, valid_size=1000, max_len=max_len, proposal_batch=5000,
                        max_proposals=10**7, lr=0.02, batch_size=500, max_epochs=40, patience=5, clip=1.0,
                        symbols_per_seq=max_len, seed=8)
    kl_pi, kl_r = policy_kl(log_p, pi, space), policy_kl(log_p, r, space)
    # Threshold: MLE on 6000 exact draws over ~250 outcomes; the sampling noise alone costs about
    # (#outcomes / 2N) ~ 0.02 nats, so 0.1 nats means the fit itself is close.
    assert kl_pi < 0.1 and kl_r > 0.4, (kl_pi, kl_r)
    assert 0 < fit.acceptance_rate < 1


def test_dpg_off_with_replay_reaches_the_target_with_fewer_samples():
    _, potential, space, log_p, valid = true_target_problem()
    r = proposal(seed=2, hidden=16)
    torch.manual_seed(3)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    fit = train_dpg(pi, r, potential, valid, small_schedule(proposal_batch=1024, replay=2048, steps_per_draw=4),
                    symbols_per_seq=7, ce_valid_proposal=-float(r.log_prob(valid).mean()) / 7, seed=4)
    # the same threshold as plain DPG_off, with a quarter of its 102400 proposal draws
    assert policy_kl(log_p, pi, space) < 0.25
    assert fit.samples == 100 * 1024 and len(fit.swaps) >= 1


@pytest.mark.parametrize("kept, baseline, clip", [(128, False, None), (1024, True, 1.0)], ids=["thinned", "baseline"])
def test_dpg_off_named_options_together_reach_the_target(kept, baseline, clip):
    """Warm start, running-Z normalisation, replay and the KL-gated swap, with either thinning to
    few items per draw (and no grad clipping, dpg.clip=null) or the pi/q baseline
    (together they are biased on a target with zeros): the same threshold as the paper's DPG_off."""
    _, potential, space, log_p, valid = true_target_problem()
    r = proposal(seed=2, hidden=16)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    pi.load_state_dict(r.state_dict())  # init = r
    options = small_schedule(proposal_batch=1024, keep_per_draw=kept, replay=2048, steps_per_draw=4,
                             normalise="running_z", baseline=baseline, swap_gate="kl_is", clip=clip)
    fit = train_dpg(pi, r, potential, valid, options, symbols_per_seq=7,
                    ce_valid_proposal=-float(r.log_prob(valid).mean()) / 7, seed=4)
    assert policy_kl(log_p, pi, space) < 0.25
    assert len(fit.swaps) >= 1
    # the KL gate swaps only on an estimated gain beyond two standard errors, on >= 30 effective samples
    assert all(s["gate"] == "kl_is" and s["kl_gain"] > 2 * s["kl_gain_se"] > 0 and s["kl_gate_ess"] >= 30
               for s in fit.swaps)
    # running Z-hat = mean of P/q over every draw: E_q[P/q] = Z for each proposal q
    assert fit.log_z_running == pytest.approx(potential.log_z, abs=0.1)


def test_dpg_rejects_biased_or_inconsistent_option_combinations():
    _, potential, _, _, valid = true_target_problem()
    r = proposal(seed=2, hidden=16)
    with pytest.raises(ValueError, match="dpg.replay=100"):
        small_schedule(replay=100)  # smaller than one minibatch
    with pytest.raises(ValueError, match="baseline"):  # thinning drops the zero-weight items the baseline needs
        train_dpg(LSTMPolicy(16, 1, dropout=0.0), r, potential, valid,
                  small_schedule(proposal_batch=1024, baseline=True), symbols_per_seq=7, ce_valid_proposal=1.0)


def test_running_z_is_one_until_a_draw_has_a_nonzero_weight():
    # true target: a draw of q may miss the support entirely; log Z-hat = log 0 would make w / Z-hat NaN
    _, potential, _, _, valid = true_target_problem()
    module = DPGModule(LSTMPolicy(16, 1, dropout=0.0), proposal(seed=2, hidden=16), potential,
                       small_schedule(normalise="running_z"), symbols_per_seq=7, ce_valid_proposal=1.0)
    module._w_count = 1024  # one draw, every weight 0
    assert module.log_z_running == 0.0
