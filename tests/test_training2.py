"""Training-2 (DPG family, distillation) on problems small enough to enumerate every output."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch

from gam_rl.features import Features
from gam_rl.methods.contract import Training2Inputs
from gam_rl.methods.distill import DistillConfig, distill
from gam_rl.methods.dpg import DPGConfig, DPGModule, dpg_loss
from gam_rl.methods.draws import ProposalDraws, RunningZ
from gam_rl.methods.pg import PGConfig, pg_loss
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import TrueProcess, gam, tilt_of
from gam_rl.process import MotifProcess
from gam_rl.stages.mle import MLEConfig
from gam_rl.tokens import encode
from tests.conftest import long_proposal, train_method
from tests.exact import all_outputs, entropy, exact_distribution, kl


def true_target_problem():
    process = MotifProcess("11", 6)  # p uniform over 43 strings
    potential = TrueProcess(process)
    space = all_outputs(8)
    log_p, _ = exact_distribution(potential.log_potential(space))
    valid = encode(process.sample_strings(400, np.random.default_rng(5)))
    return process, potential, space, log_p, valid


def small_schedule(cls=DPGConfig, **options) -> DPGConfig:
    """DPG_off on the 43-string problem: 25 updates of 256 sequences per check."""
    base = dict(name="dpg_off", algorithm="dpg_off", lr=0.02, minibatch=256, updates_per_epoch=25, max_epochs=16,
                patience=16, clip=1.0)
    if cls is PGConfig:
        base.update(name="pg", algorithm="pg")
    return cls(**{**base, **options})


def ce_valid(policy, valid):
    with eval_mode(policy):
        return -float(policy.log_prob(valid).mean()) / 7


def policy_kl(log_p, pi, space):
    with eval_mode(pi):
        return kl(log_p, pi.log_prob(space))


def run_dpg(cfg, pi=None, r=None, seed=4):
    _, potential, space, log_p, valid = true_target_problem()
    r = r or long_proposal(seed=2, hidden=16)
    if pi is None:
        torch.manual_seed(3)
        pi = LSTMPolicy(16, 1, dropout=0.0)
    fit = train_method(cfg, pi, r, potential, valid, max_len=8, symbols=7, ce_valid_r=ce_valid(r, valid), seed=seed)
    return fit, pi, r, potential, space, log_p


def test_dpg_off_learns_the_target_and_swaps_only_to_better_policies():
    fit, pi, r, _, space, log_p = run_dpg(small_schedule())
    kl_r, kl_pi = policy_kl(log_p, r, space), policy_kl(log_p, pi, space)
    # Threshold: from KL(p || r) of several nats, DPG must get within 0.25 nats of p
    # (a policy putting 78% of its mass on p's support in the right proportions).
    assert kl_r > 2.0 and kl_pi < 0.25, (kl_r, kl_pi)
    swaps = fit.results["swaps"]
    assert len(swaps) >= 1
    ce_q = [s["ce_valid_q"] for s in swaps]
    assert all(s["ce_valid_pi"] < s["ce_valid_q"] for s in swaps)  # never to a worse policy
    assert all(a > b for a, b in zip(ce_q, ce_q[1:], strict=False))
    assert fit.draws == fit.results["t2_updates"] * 256


def test_pg_concentrates_its_mass_below_the_target_entropy():
    _, pi, _, _, space, log_p = run_dpg(small_schedule(PGConfig, max_epochs=12, patience=12))
    with eval_mode(pi):
        pi_entropy = entropy(pi.log_prob(space).double())
    assert pi_entropy < entropy(log_p) - 0.5, (pi_entropy, entropy(log_p))


def test_distill_reaches_small_kl_to_p_lambda():
    max_len = 7
    r = long_proposal(seed=6, hidden=8)
    p_lambda = gam(r, Features("1000000", "11"), torch.tensor([-5.0]))
    space = all_outputs(max_len)
    with torch.no_grad():
        log_p, _ = exact_distribution(p_lambda.log_potential(space))
    torch.manual_seed(7)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    empty = torch.empty(0, 1, dtype=torch.long)
    cfg = DistillConfig(name="distill", size=6000, valid_size=1000, proposal_batch=5000, max_proposals=1e7,
                        mle=MLEConfig(lr=0.02, batch_size=500, max_epochs=40, patience=5, clip=1.0))
    fit = distill(pi, r, p_lambda, empty, empty, cfg, max_len=max_len, symbols_per_seq=max_len, seed=8)
    kl_pi, kl_r = policy_kl(log_p, pi, space), policy_kl(log_p, r, space)
    # Threshold: MLE on 6000 exact draws over ~250 outcomes; the sampling noise alone costs about
    # (#outcomes / 2N) ~ 0.02 nats, so 0.1 nats means the fit itself is close.
    assert kl_pi < 0.1 and kl_r > 0.4, (kl_pi, kl_r)
    assert 0 < fit.acceptance_rate < 1


def test_dpg_off_with_replay_reaches_the_target_with_fewer_samples():
    fit, pi, _, _, space, log_p = run_dpg(small_schedule(proposal_batch=1024, replay=2048, steps_per_draw=4))
    # the same threshold as plain DPG_off, with a quarter of its 102400 proposal draws
    assert policy_kl(log_p, pi, space) < 0.25
    assert fit.draws == 100 * 1024 and len(fit.results["swaps"]) >= 1


@pytest.mark.parametrize("kept, baseline, clip", [(128, False, None), (1024, True, 1.0)], ids=["thinned", "baseline"])
def test_dpg_off_named_options_together_reach_the_target(kept, baseline, clip):
    """Warm start, running-Z normalisation, replay and the KL-gated swap, with either thinning to
    few items per draw (and no grad clipping) or the pi/q baseline (together they are biased on a
    target with zeros): the same threshold as the paper's DPG_off."""
    r = long_proposal(seed=2, hidden=16)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    pi.load_state_dict(r.state_dict())  # init = r
    cfg = small_schedule(proposal_batch=1024, keep_per_draw=kept, replay=2048, steps_per_draw=4,
                         normalise="running_z", baseline=baseline, swap_gate="kl_is", clip=clip)
    assert cfg.problems() == []
    fit, pi, _, potential, space, log_p = run_dpg(cfg, pi=pi, r=r)
    assert policy_kl(log_p, pi, space) < 0.25
    assert len(fit.results["swaps"]) >= 1
    # the KL gate swaps only on an estimated gain beyond two standard errors, on >= 30 effective samples
    assert all(s["gate"] == "kl_is" and s["kl_gain"] > 2 * s["kl_gain_se"] > 0 and s["kl_gate_ess"] >= 30
               for s in fit.results["swaps"])
    # running Z-hat = mean of P/q over every draw: E_q[P/q] = Z for each proposal q
    assert fit.results["dpg_log_z_running"] == pytest.approx(potential.log_z, abs=0.1)


def test_adaptive_draw_size_follows_the_effective_sample_size():
    """next_draw_size: N' = ess_per_draw N / ESS, growing at once, shrinking at most by half and only once
    ESS / N >= shrink_at_ess_fraction, within [min_proposal_batch, proposal_batch]; without ess_per_draw
    always proposal_batch."""
    _, potential, _, _, _ = true_target_problem()
    draws = ProposalDraws(long_proposal(seed=2, hidden=16), potential, minibatch=64, proposal_batch=8000,
                          keep_per_draw=128, replay=0, steps_per_draw=1, max_len=8,
                          generator=torch.Generator().manual_seed(0), ess_per_draw=500, min_proposal_batch=1000)
    assert draws.next_draw_size(8000.0, 8000) == 4000  # q = p: halves
    assert draws.next_draw_size(1000.0, 1000) == 1000  # ... down to the floor
    assert draws.next_draw_size(250.0, 2000) == 4000  # ESS 1/8 of N: 500 / (1/8) at once
    assert draws.next_draw_size(5.0, 2000) == 8000 and draws.next_draw_size(0.0, 2000) == 8000  # capped; no weight
    # ESS / N under the default 0.5: q still far from p, the size holds (500 / 0.3 would shrink it to 1667)
    assert draws.next_draw_size(1200.0, 4000) == 4000
    assert draws.next_draw_size(2000.0, 4000) == 2000  # ESS / N = 0.5: shrinks (by half at most)
    eager = ProposalDraws(long_proposal(seed=2, hidden=16), potential, minibatch=64, proposal_batch=8000,
                          keep_per_draw=128, replay=0, steps_per_draw=1, max_len=8,
                          generator=torch.Generator().manual_seed(0), ess_per_draw=500, min_proposal_batch=1000,
                          shrink_at_ess_fraction=0.25)
    assert eager.next_draw_size(1200.0, 4000) == 2000  # ESS / N = 0.3 >= 0.25: shrinks by half at most
    fixed = ProposalDraws(long_proposal(seed=2, hidden=16), potential, minibatch=64, proposal_batch=8000,
                          keep_per_draw=128, replay=0, steps_per_draw=1, max_len=8,
                          generator=torch.Generator().manual_seed(0))
    assert fixed.next_draw_size(8000.0, 8000) == 8000
    first = draws.fresh()  # a real draw: sized by proposal_batch, the next one by its ESS
    assert draws.samples_drawn == 8000 and draws.last_draw_size == 8000 and len(first) <= 8000
    assert draws.draw_size == draws.next_draw_size(draws.last_ess, 8000)


def test_dpg_off_with_adaptive_draws_reaches_the_target_with_fewer_samples():
    """Thinned, replayed DPG_off whose draws shrink once swaps bring q close to p: the same KL threshold
    as with fixed draws of 4096, and fewer samples drawn (a wrong share or ESS rule misses either)."""
    options = dict(proposal_batch=4096, keep_per_draw=256, replay=2048, steps_per_draw=4, normalise="running_z")
    fixed, pi_fixed, _, _, space, log_p = run_dpg(small_schedule(**options))
    adaptive, pi_adaptive, _, _, _, _ = run_dpg(small_schedule(**options, ess_per_draw=512))
    assert policy_kl(log_p, pi_adaptive, space) < 0.25 and policy_kl(log_p, pi_fixed, space) < 0.25
    assert adaptive.draws < 0.7 * fixed.draws, (adaptive.draws, fixed.draws)


def gam_problem():
    """P_lambda = r exp(-5 [x contains 11]) over at most 7 symbols: exactly enumerable."""
    r = long_proposal(seed=6, hidden=8)
    p_lambda = gam(r, Features("1000000", "11"), torch.tensor([-5.0]))
    space = all_outputs(7)
    with torch.no_grad():
        log_p, log_z = exact_distribution(p_lambda.log_potential(space))
    valid = space[torch.multinomial(log_p.exp(), 500, replacement=True, generator=torch.Generator().manual_seed(9))]
    return r, p_lambda, space, log_p, log_z, valid


def test_gap_to_p_lambda_and_its_noise_are_the_paired_statistics_over_v():
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    with torch.no_grad():
        valid_log_p = p_lambda.log_potential(valid).double() - log_z
    cfg = small_schedule(stop_within_noise=1.0)
    draws = ProposalDraws(r, p_lambda, minibatch=8, proposal_batch=None, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=7, generator=torch.Generator())
    pi = LSTMPolicy(8, 1, 0.0)
    inputs = Training2Inputs(pi=pi, r=r, p_lambda=p_lambda, true_process=None, train=valid, valid=valid, max_len=7,
                             symbols=7, ce_valid_r=1.0, ce_valid_p_lambda=None, log_z_hat=log_z, log_z_se=0.03)
    module = DPGModule(pi, draws, cfg, inputs, p_lambda, target_ce_valid=None, valid_log_p=valid_log_p)
    with torch.no_grad():
        log_r = r.log_prob(valid).double()
    gap, se = module.gap_to_target(log_r)
    diff = (valid_log_p - log_r).numpy()
    assert gap == pytest.approx(diff.mean() / 7, rel=1e-12)  # = CE(V, r) - CE(V, p_lambda) per symbol
    assert se == pytest.approx(math.sqrt(diff.var(ddof=1) / 500 + 0.03**2) / 7, rel=1e-9)
    assert gap > 3 * se  # r is far from p_lambda here; p_lambda itself has gap 0
    assert module.gap_to_target(valid_log_p)[0] == 0.0


def test_dpg_stops_once_pi_is_within_noise_of_p_lambda():
    r, p_lambda, space, log_p, log_z, valid = gam_problem()

    def fit(**options):
        torch.manual_seed(3)
        pi = LSTMPolicy(32, 1, dropout=0.0)  # at 16 hidden units the gap stalled above 2 s.e. in 5 of 10 seeds
        cfg = small_schedule(max_epochs=16, patience=16, **options)
        with eval_mode(r):
            ce_r = -float(r.log_prob(valid).mean()) / 7
        result = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_r, seed=4, log_z=log_z)
        return result, pi

    full, _ = fit()
    stopped, pi = fit(stop_within_noise=2.0)
    hit = stopped.results["dpg_stopped_within_noise"]
    assert full.results["dpg_stopped_within_noise"] is None and hit is not None
    assert hit["gap"] <= 2 * hit["gap_se"] and stopped.results["t2_epochs"] < full.results["t2_epochs"]
    assert stopped.draws < full.draws
    # within two paired s.e. on V (0.003 nats per symbol here, from 0.04 for r) is close on the whole space
    # too: KL(p || r) is 0.46; the stop came at checks 4-10 with KL 0.02-0.05 over 10 draw seeds
    assert policy_kl(log_p, pi, space) < 0.1


def test_the_tilt_test_holds_the_noise_stop_until_pi_puts_the_tilt_where_p_lambda_does(seed=4):
    """With a Z-hat this uncertain (log Z-hat s.e. 1 nat, as when Z-hat comes from a few hundred
    effective draws) the CE test passes at the first check, where pi's mean of the tilt
    lambda . phi = -5 [no '11'] is still far from p_lambda's; stop_tilt_samples holds the stop until
    that gap is not shown to exceed the tolerance, and the pi returned (the stop's check) is that
    close on the whole space too."""
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    tilt = tilt_of(p_lambda)  # exp(-5 [no '11'])
    with torch.no_grad():
        t = tilt.log_potential(space).double()  # -5 where '11' is absent
    target_mean = float((log_p.exp() * t).sum())

    def fit(**options):
        torch.manual_seed(3)
        pi = LSTMPolicy(32, 1, dropout=0.0)
        cfg = small_schedule(max_epochs=16, patience=16, stop_within_noise=1.0, **options)
        with eval_mode(r):
            ce_r = -float(r.log_prob(valid).mean()) / 7
        result = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_r, seed=seed,
                              log_z=log_z, log_z_se=1.0)
        with eval_mode(pi), torch.no_grad():
            tilt_gap = target_mean - float((pi.log_prob(space).double().exp() * t).sum())
        return result, tilt_gap

    ce_only, ce_only_gap = fit()
    held, held_gap = fit(stop_tilt_samples=4000, stop_tilt_tolerance=0.05)
    assert ce_only.results["dpg_stopped_within_noise"]["tilt"] is None and ce_only.results["dpg_tilt_holds"] == []
    assert ce_only.results["t2_epochs"] == 1 and abs(ce_only_gap) > 0.5, ce_only_gap
    hit, holds = held.results["dpg_stopped_within_noise"], held.results["dpg_tilt_holds"]
    assert holds and all(h["excess"] > 0.05 and not h["passed"] for h in holds)
    assert hit is not None and hit["tilt"]["passed"] and hit["tilt"]["excess"] <= 0.05
    # the tilt's gap is lambda times the feature's: one feature here
    assert hit["tilt"]["tilt_gap"] == pytest.approx(-5.0 * hit["tilt"]["gap"]["motif"], rel=1e-9)
    epochs = held.results["t2_epochs"]
    assert epochs > ce_only.results["t2_epochs"] and held.results["t2_best_epoch"] == epochs  # the stop's check
    # the exact gap of the returned pi: within the tolerance and 4 of the estimate's s.e. (0.005-0.01)
    assert abs(held_gap) <= 0.05 + 4 * hit["tilt"]["tilt_se"], (held_gap, hit)


def r_itself_target(r, space):
    """P = r (lambda = 0) and a V of 20,000 sequences drawn from r: every DPG update only adds noise, and
    CE(V, pi) - CE(V, r) estimates KL(r || pi) > 0 with a paired noise well below it (with 500
    sequences a noisy pi beat r on V in 6 of 10 seeds of the lr_decays schedule; with 20,000, in
    none)."""
    target = gam(r, Features("1000000", "11"), torch.tensor([0.0]))
    with torch.no_grad():
        log_r, _ = exact_distribution(target.log_potential(space))
    valid = space[torch.multinomial(log_r.exp(), 20000, replacement=True, generator=torch.Generator().manual_seed(9))]
    return target, valid


class RecordLr(pl.Callback):
    """The learning rate of every update."""

    def __init__(self):
        self.lrs = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_keep_start_makes_r_check_zero_of_the_plateau():
    """keep_start with init=r: pi stays r when no check beats CE(V, r), stopping after `patience`
    checks; when DPG improves on r at once, the run is the same as without the option."""
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    ce_r = ce_valid(r, valid)

    def fit(target, valid, **options):
        pi = LSTMPolicy(8, 1, 0.0)
        pi.load_state_dict(r.state_dict())  # init=r
        cfg = small_schedule(init="r", max_epochs=8, patience=3, **options)
        result = train_method(cfg, pi, r, target, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4)
        return result, pi

    # the target is r itself (lambda = 0) and V is drawn from it: every check is worse than r
    r_itself, valid_r = r_itself_target(r, space)
    ruined, pi_ruined = fit(r_itself, valid_r, lr=0.05)
    kept, pi_kept = fit(r_itself, valid_r, lr=0.05, keep_start=True)
    # every check is worse than r: r is returned either way (the start is check 0 of every selection), and
    # with keep_start the patience counts from r, so the run stops after `patience` checks
    assert ruined.trained_ce_valid > ce_valid(r, valid_r) and ruined.kept_start
    assert ruined.ce_valid_pi == ce_valid(r, valid_r) and ruined.results["t2_best_epoch"] == 0
    assert all(torch.equal(a, b) for a, b in zip(ruined.pi.state_dict().values(), r.state_dict().values(), strict=True))
    assert ruined.pi is not pi_ruined  # the start in a copy: the method's own pi stays its best check
    assert kept.ce_valid_pi == ce_valid(r, valid_r) and kept.results["t2_best_epoch"] == 0 and kept.kept_start
    assert kept.results["t2_epochs"] == 3 < ruined.results["t2_epochs"]
    assert all(torch.equal(a, b) for a, b in zip(pi_kept.state_dict().values(), r.state_dict().values(), strict=True))
    # a schedule that beats r at check 1 (P_lambda penalises "11"): the start is never the best, nothing changes
    plain, pi_plain = fit(p_lambda, valid)
    started, pi_started = fit(p_lambda, valid, keep_start=True)
    assert plain.ce_valid_pi < ce_r - 0.01 and started.results["t2_best_epoch"] == plain.results["t2_best_epoch"] >= 1
    assert not plain.kept_start and plain.trained_ce_valid == plain.ce_valid_pi
    assert (started.results["t2_epochs"], started.draws, started.ce_valid_pi) == (
        plain.results["t2_epochs"], plain.draws, plain.ce_valid_pi)
    assert all(torch.equal(a, b) for a, b in zip(pi_started.state_dict().values(), pi_plain.state_dict().values(),
                                                 strict=True))
    assert policy_kl(log_p, pi_started, space) < policy_kl(log_p, r, space)


def test_lr_warmup_raises_the_learning_rate_linearly_per_update():
    r, p_lambda, _, _, _, valid = gam_problem()
    record = RecordLr()
    pi = LSTMPolicy(8, 1, 0.0)
    cfg = small_schedule(lr=0.02, lr_warmup=40, updates_per_epoch=30, max_epochs=2, patience=2)
    train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4,
                 callbacks=[record])
    assert record.lrs == pytest.approx([0.02 * min(1.0, (k + 1) / 40) for k in range(60)])


def test_lr_decays_restart_dpg_from_the_best_weights_at_a_lower_lr():
    """lr_decays with keep_start, towards r itself (every check worse than r): after each bad check pi is r
    again and the lr halves, twice; the third bad check stops, with pi = r."""
    class Record(RecordLr):
        def __init__(self):
            super().__init__()
            self.starts_at_r = []

        def on_train_epoch_start(self, trainer, module):
            self.starts_at_r.append(all(torch.equal(a, b) for a, b in zip(
                module.pi.state_dict().values(), r.state_dict().values(), strict=True)))

    r, _, space, _, _, _ = gam_problem()
    r_itself, valid_r = r_itself_target(r, space)
    pi, record = LSTMPolicy(8, 1, 0.0), Record()
    pi.load_state_dict(r.state_dict())
    cfg = small_schedule(init="r", lr=0.2, keep_start=True, patience=1, lr_decays=2, updates_per_epoch=10,
                         max_epochs=8)
    result = train_method(cfg, pi, r, r_itself, valid_r, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid_r), seed=4,
                          callbacks=[record])
    res = result.record()
    assert (res["t2_epochs"], res["t2_best_epoch"], res["t2_lr_decay_epochs"]) == (3, 0, [1, 2])
    assert record.lrs == pytest.approx([0.2] * 10 + [0.1] * 10 + [0.05] * 10)
    assert record.starts_at_r == [True, True, True]
    assert all(torch.equal(a, b) for a, b in zip(pi.state_dict().values(), r.state_dict().values(), strict=True))


def test_ema_decay_checks_keeps_and_returns_the_moving_average_of_the_weights():
    """ema_decay d: after every update theta_avg <- d theta_avg + (1 - d) theta, from pi's starting weights;
    the checks measure theta_avg, and the returned pi is theta_avg at the best check."""

    class Record(pl.Callback):
        def __init__(self, start):
            self.avg = [t.detach().clone() for t in start.parameters()]
            self.at_checks, self.checked_ok = [], []

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            for a, t in zip(self.avg, module.pi.parameters(), strict=True):
                a.mul_(0.9).add_(t.detach(), alpha=0.1)

        def on_validation_epoch_start(self, trainer, module):
            self.checked_ok.append(all(torch.allclose(a, c, atol=1e-6) for a, c in zip(
                self.avg, module.checked.parameters(), strict=True)))
            self.at_checks.append([a.clone() for a in self.avg])

    r, p_lambda, _, _, _, valid = gam_problem()
    pi = LSTMPolicy(8, 1, 0.0)
    pi.load_state_dict(r.state_dict())
    record = Record(pi)
    cfg = small_schedule(init="r", ema_decay=0.9, updates_per_epoch=10, max_epochs=4, patience=4)
    result = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4,
                          callbacks=[record])
    assert record.checked_ok == [True] * 4 and result.results["t2_epochs"] == 4
    trained_last = record.at_checks[-1]
    assert not all(torch.equal(a, b) for a, b in zip(trained_last, record.at_checks[-2], strict=True))  # it moves
    kept = record.at_checks[result.results["t2_best_epoch"] - 1]  # checks count from 1
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(kept, pi.parameters(), strict=True))
    assert result.ce_valid_pi == pytest.approx(ce_valid(pi, valid), abs=1e-5)
    assert any(p.startswith("method.ema_decay=0.9 with method.lr_decays=1")
               for p in small_schedule(ema_decay=0.9, lr_decays=1).problems())


def test_dpg_option_combinations_that_cannot_work_are_named():
    assert any(p.startswith("method.replay=100") for p in small_schedule(replay=100).problems())  # < a minibatch
    assert any(p.startswith("method.swap_gate='kl_is'") for p in small_schedule(swap_gate="kl_is", minibatch=16)
               .problems())
    thinned = small_schedule(proposal_batch=1024, baseline=True, target="true")  # drops the zeros it needs
    assert any(p.startswith("method.baseline=true with thinning") for p in thinned.problems())
    assert small_schedule(proposal_batch=1024, baseline=True).problems() == []  # the GAM: P > 0 everywhere
    with pytest.raises(TypeError):  # pg has no pi/q baseline: the key is not in its schema
        small_schedule(PGConfig, baseline=True)
    assert any(p.startswith("method.ess_per_draw=512") for p in small_schedule(ess_per_draw=512).problems())
    assert any(p.startswith("method.min_proposal_batch=9000")
               for p in small_schedule(proposal_batch=4096, min_proposal_batch=9000).problems())
    assert any("stop_within_noise" in p for p in small_schedule(stop_within_noise=1.0, target="true").problems())
    assert small_schedule(proposal_batch=4096, ess_per_draw=512, stop_within_noise=1.0).problems() == []
    assert any(p.startswith("method.keep_start=true with method.init='fresh'")
               for p in small_schedule(keep_start=True).problems())
    assert small_schedule(keep_start=True, init="r").problems() == []
    assert any(p.startswith("method.lr_decays=2 with method.lr_warmup=100")
               for p in small_schedule(lr_decays=2, lr_warmup=100).problems())


def test_running_z_is_one_until_a_draw_has_a_nonzero_weight():
    # true target: a draw of q may miss the support entirely; log Z-hat = log 0 would make w / Z-hat NaN
    running = RunningZ()
    running.add(torch.full((1024,), -math.inf, dtype=torch.float64))
    assert running.log_z == 0.0 and running.count == 1024
    running.add(torch.zeros(1024, dtype=torch.float64))  # 1024 weights of 1 among 2048 draws
    assert running.log_z == pytest.approx(math.log(0.5))


def test_the_loss_of_a_plain_draw_is_the_papers_update():
    """No thinning, no replay, Z = 1: loss = -(1/N) sum_i P(x_i)/q(x_i) log pi(x_i), x_i ~ q, with q = r
    scored only through exp(lambda . phi) (P_lambda / r), and pg's coefficient P(x) pi(x) / q(x) / N."""
    r = long_proposal(seed=1)
    features = Features("1001111", "101")
    p_lambda = gam(r, features, torch.tensor([-2.0, 0.7, -0.5, 1.0, 0.3]))
    draws = ProposalDraws(r, p_lambda, minibatch=64, proposal_batch=None, keep_per_draw=None, replay=0,
                          steps_per_draw=1, max_len=8,
                          generator=torch.Generator().manual_seed(0))
    draw = draws.next_batch()
    assert len(draw) == 64 and draws.samples_drawn == 64
    torch.manual_seed(5)
    pi = LSTMPolicy(8, 1, dropout=0.0)
    log_pi = pi.log_prob(draw.tokens)
    with torch.no_grad():
        weights = torch.exp(p_lambda.log_potential(draw.tokens) - r.log_prob(draw.tokens).double())
    expected = -(weights.float() * log_pi).sum() / 64
    assert float(dpg_loss(log_pi, draw).detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    reward = weights * torch.exp(log_pi.detach().double())  # P / q * pi
    expected_pg = -(reward.float() * log_pi).sum() / 64
    assert float(pg_loss(log_pi, draw).detach()) == pytest.approx(float(expected_pg.detach()), rel=1e-5)


def test_the_twist_learners_take_the_loops_keep_start_and_lr_warmup():
    """keep_start and lr_warmup are the loop's, for every method on it: a twist learner (manual optimisation)
    whose start no check beats returns r itself, with its value model as it started; its lr rises per step."""
    from gam_rl.methods.ac_dpg import ACDPGConfig

    r, p_lambda, _, _, _, valid = gam_problem()
    pi = LSTMPolicy(8, 1, 0.0)
    pi.load_state_dict(r.state_dict())
    record = RecordLr()
    cfg = ACDPGConfig(name="ac_dpg", init="r", lr=0.05, minibatch=64, updates_per_epoch=10, max_epochs=3, patience=3,
                      clip=1.0, critic="head", keep_start=True, lr_warmup=20)
    assert cfg.problems() == []
    # CE(V, r) given as below any reachable value: no check beats the start
    result = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=-1.0, seed=4,
                          callbacks=[record])
    assert result.results["t2_best_epoch"] == 0 and result.ce_valid_pi == -1.0 and result.kept_start
    assert all(torch.equal(a, b) for a, b in zip(pi.state_dict().values(), r.state_dict().values(), strict=True))
    assert result.learned_log_z == 0.0  # the value head as it started (zero)
    assert record.lrs[:20] == pytest.approx([0.05 * (k + 1) / 20 for k in range(20)])


@pytest.mark.parametrize("method", ["ppo_dpg", "dpg_on"])
def test_on_policy_draws_come_from_pi_as_it_is_at_the_update(monkeypatch, method):
    """Every update of an on-policy method trains on a draw of pi with its current weights: the sampler's
    log q of each draw is pi's own log-probability at that moment (Lightning's prefetch once made it one
    update old), so PPO's ratio and its KL estimate are to the policy that drew the batch."""
    from gam_rl.methods.dpg import DPGModule as Module
    from gam_rl.methods.ppo_dpg import PPODPGConfig, PPODPGModule

    r, p_lambda, _, _, _, valid = gam_problem()
    pi = LSTMPolicy(8, 1, 0.0)
    pi.load_state_dict(r.state_dict())
    gaps = []
    cls, hook = (PPODPGModule, "update") if method == "ppo_dpg" else (Module, "loss")
    original = getattr(cls, hook)

    def checked(self, draw):
        with eval_mode(self.pi):
            gaps.append(float((self.pi.log_prob(draw.tokens).double() - draw.log_q).abs().max()))
        return original(self, draw)

    monkeypatch.setattr(cls, hook, checked)
    if method == "ppo_dpg":
        cfg = PPODPGConfig(name="ppo_dpg", init="r", lr=0.05, minibatch=32, proposal_batch=64, updates_per_epoch=4,
                           max_epochs=2, patience=2, ppo_epochs=2, target_kl=None)
    else:
        cfg = small_schedule(algorithm="dpg_on", name="dpg_on", lr=0.05, minibatch=64, updates_per_epoch=4,
                             max_epochs=2, patience=2)
    train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4)
    assert len(gaps) == 8 and max(gaps) < 1e-4, gaps  # pi moved between updates (lr 0.05), the draws with it


def test_max_draws_stops_the_loop_at_the_check_after_the_cap():
    """method.max_draws (a tuning trial's cap): the updates after the cap are skipped, the check comes at once,
    and the loop stops there: 4 updates of 256 draws pass 1000, so 1024 are drawn, not a whole check's 6400."""
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    torch.manual_seed(3)
    pi = LSTMPolicy(16, 1, dropout=0.0)
    cfg = small_schedule(max_draws=1000)
    fit = train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4)
    assert fit.draws == 1024 and fit.results["t2_stopped_by"] == "max_draws"
    assert fit.results["t2_epochs"] == 1 and len(fit.curve) == 1 and fit.curve[0]["draws"] == 1024


def test_stop_at_target_stops_at_the_first_check_on_the_target_line():
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    with torch.no_grad():
        ce_p = -float((p_lambda.log_potential(valid).double() - log_z).mean()) / 7

    def fit(**options):
        torch.manual_seed(3)
        pi = LSTMPolicy(16, 1, dropout=0.0)
        cfg = small_schedule(target_margin=0.05, **options)
        return train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_valid(r, valid), seed=4,
                            ce_valid_p_lambda=ce_p)

    full, stopped = fit(), fit(stop_at_target=True)
    line = 1.05 * ce_p
    assert full.reached_target is not None and full.results["t2_stopped_by"] is None
    assert stopped.results["t2_stopped_by"] == "target"
    # the same run up to the first check on the line (the draws are seeded), and nothing after it
    assert stopped.reached_target["samples"] == full.reached_target["samples"] == stopped.draws < full.draws
    assert stopped.curve[-1]["ce_valid_pi"] <= line < min(c["ce_valid_pi"] for c in stopped.curve[:-1])
    assert stopped.curve == full.curve[:len(stopped.curve)]


def test_a_start_on_the_target_line_reached_it_after_no_draw():
    """The start is check 0 of the target line: pi = r already within the margin of p_lambda (the line 1.01 x a
    CE(V, p_lambda) at CE(V, r) here) reached it after 0 draws, whatever its checks did; a start above the line
    leaves the method's own record."""
    r, p_lambda, space, log_p, log_z, valid = gam_problem()
    ce_r = ce_valid(r, valid)

    def fit(ce_p):
        pi = LSTMPolicy(8, 1, 0.0)
        pi.load_state_dict(r.state_dict())
        cfg = small_schedule(init="r", max_epochs=2, patience=2)
        return train_method(cfg, pi, r, p_lambda, valid, max_len=7, symbols=7, ce_valid_r=ce_r, seed=4,
                            ce_valid_p_lambda=ce_p)

    on_line = fit(ce_r)
    assert on_line.reached_target == {"samples": 0, "updates": 0, "seconds": 0.0, "ce_valid_pi": ce_r,
                                      "at_start": True}
    below = fit(0.5 * ce_r)  # a line no check reaches
    assert below.reached_target is None
