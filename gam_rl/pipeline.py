"""One run: data -> r -> lambda -> Z -> pi -> evaluation, composed from the stages.

Each stage receives its typed configuration section and what it needs as arguments, and
returns a typed result; the pipeline only composes them, times them and records their
results into `results` (results.json). Training-1 (everything before Training-2) comes from the
Training-1 cache when another method of the same cell has computed it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import lightning.pytorch as pl
import torch

from gam_rl.cpu import flush_denormals
from gam_rl.data import Splits, load_splits
from gam_rl.exact import ExactTarget, OutputSpace, exact_results
from gam_rl.features import Features
from gam_rl.methods import registry
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.metrics import batched_log_prob, evaluate_policy
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import TrueProcess, gam
from gam_rl.process import MotifProcess
from gam_rl.proposals import DefensiveMixture
from gam_rl.run_io import PER_FEATURE_KEYS, RESULT_KEYS, code_version
from gam_rl.schema import Config
from gam_rl.stages.mle import train_mle
from gam_rl.stages.moment_matching import MomentMatchingConfig, moment_matching
from gam_rl.stages.partition import estimate_partition
from gam_rl.training1_cache import STAGES, RecordingLogger, Training1, Training1Cache, default_dir, key_config

log = logging.getLogger("gam_rl")


class Run:
    """Mutable record of one run: results plus per-stage timings and sample counts."""

    def __init__(self, cfg: Config):
        self.results: dict = {key: None for key in RESULT_KEYS}
        self.results.update(status="running", motif=cfg.motif.pattern, features=cfg.features.name,
                            dataset_size=cfg.dataset_size.size, seed=cfg.seed, method=cfg.method.name,
                            profile=cfg.profile, timings={}, samples={}, code=code_version())
        self.stage_now: str | None = None  # the stage running now, for a failure's record

    @contextlib.contextmanager
    def stage(self, name: str):
        log.info("[%s] starting", name)
        self.stage_now, start = name, time.perf_counter()
        try:
            yield
        finally:  # a stage that fails keeps its time and stays stage_now; it never logs "done"
            self.results["timings"][name] = round(time.perf_counter() - start, 3)
        self.stage_now = None
        log.info("[%s] done in %.1f s", name, self.results["timings"][name])

    def count_samples(self, name: str, count: int) -> None:
        self.results["samples"][name] = self.results["samples"].get(name, 0) + int(count)


@dataclass
class Data:
    process: MotifProcess
    splits: Splits
    symbols: int  # n + 1: every CE is in nats per symbol over the n bits and EOS


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run_pipeline(cfg: Config, run: Run, logger, run_dir: Path) -> dict:
    device = resolve_device(cfg.device)
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    res = run.results
    res["device"] = str(device)
    # torch's intra-op threads: float reductions (and so r's early stopping, and every number after it) can
    # differ between thread counts for the same seed; the record says which one made these numbers
    res["threads"] = torch.get_num_threads()
    # subnormal floats flushed to zero (gam_rl/cpu.py: set by every gam-rl job before its first parallel op)
    res["flush_denormal"] = flush_denormals()
    pl.seed_everything(cfg.seed, workers=False, verbose=False)

    data = load_data(cfg, run, device)
    features = Features.from_config(cfg.features, cfg.motif.pattern)
    res["feature_names"], res["training1_estimator"] = features.names, cfg.training1.estimator
    if cfg.training1.proposal is not None:  # snis_mix: whose pi the proposal mixes with r
        res["training1_proposal"] = str(Path(cfg.training1.proposal).resolve())
    t1 = training1_cached(cfg, run, data, features, logger, run_dir, device, accelerator)
    res.update(t1.results())
    for key in PER_FEATURE_KEYS:  # lambda and the moments by feature name, not bare lists
        res[key] = dict(zip(features.names, res[key], strict=True))

    # Training-2 starts from the same RNG state whether Training-1 ran here or came from the cache; its seed is
    # seed + 3 unless the run names its own (training2_seed: another Training-2 on the same r and lambda)
    t2_seed = res["training2_seed"] = cfg.seed + 3 if cfg.training2_seed is None else cfg.training2_seed
    pl.seed_everything(t2_seed, workers=False, verbose=False)
    p_lambda = gam(t1.r, features, t1.lam)  # P_lambda = r exp(lambda . phi)
    exact_target = None
    if cfg.eval.exact:  # every output of the sampler scored once: p_lambda and p_true exactly
        with run.stage("exact_target"):
            exact_target = ExactTarget.of(p_lambda, OutputSpace(cfg.max_len), device, data.process.log_prob)
            log.info("exact: log Z = %.4f over %d outputs (importance-sampled %.4f)", exact_target.log_z,
                     exact_target.space.size, res["log_z_hat"])
    with run.stage("training2"):
        fit = training2(cfg, run, t1, p_lambda, data, logger, accelerator, exact_target)
        pi = fit.pi
        pi.save(run_dir / "pi.pt")
        if fit.twist is not None:  # a twist learner's values: the twist of gam-rl-sample's SMC (twist=RUN_DIR)
            torch.save(fit.twist, run_dir / "twist.pt")
    with run.stage("eval_pi"):
        evaluation = evaluate_policy(pi, data.splits.test, data.process.contains_motif, cfg.eval, data.symbols)
        run.count_samples("eval_pi", cfg.eval.samples)
        res.update(evaluation.results("pi"))
        logger.log("eval", 0, ce_test_pi=evaluation.ce_test, motif_freq_pi=evaluation.motif_freq)
    if exact_target is not None:
        with run.stage("exact"):
            res["exact"] = exact_evaluation(exact_target, t1.r, pi, p_lambda, data, res, fit.exact_extras)
            logger.log("exact", 0, **res["exact"])
            log.info("exact: KL(p_lambda || pi) %.4f, KL(pi || p_lambda) %.4f, TV %.4f (r: %.4f, %.4f, %.4f); "
                     "Z-hat off by %.2f s.e.", *(res["exact"].get(k, math.nan) for k in (
                         "kl_p_pi", "kl_pi_p", "tv_p_pi", "kl_p_r", "kl_r_p", "tv_p_r", "z_hat_error_se")))
    return res


def exact_evaluation(target: ExactTarget, r: LSTMPolicy, pi: LSTMPolicy, p_lambda, data: Data, res: dict,
                     exact_extras=None) -> dict:
    """results.json's `exact` section: the exact numbers of this run (gam_rl/exact.py), and what only
    the method can say exactly (exact_extras: its learned values, its sampler's p_beta)."""
    log_p_test = batched_log_prob(p_lambda.log_potential, data.splits.test.to(r.device))
    out = exact_results(target, r, pi, log_p_test, data.symbols, res)
    if exact_extras is not None:
        out.update(exact_extras(target))
    return out


def load_data(cfg: Config, run: Run, device: torch.device) -> Data:
    with run.stage("data"):
        process = MotifProcess(cfg.motif.pattern, cfg.n)
        splits = load_splits(cfg.motif.pattern, cfg.n, cfg.dataset_size.size, cfg.dataset_size.valid_size,
                             {"train": cfg.data.pools.train, "valid": cfg.data.pools.valid,
                              "test": cfg.data.pools.test}, cfg.data.cache_dir, device)
        run.results.update(data_dir=str(splits.data_dir), valid_size=len(splits.valid), test_size=len(splits.test),
                           symbols=cfg.n + 1,
                           entropy_true=process.entropy_per_symbol, num_motif_strings=process.num_strings)
        log.info("H(p_true) = %.4f nats/symbol (%d strings of length %d contain %s)",
                 process.entropy_per_symbol, process.num_strings, cfg.n, cfg.motif.pattern)
    return Data(process, splits, cfg.n + 1)


def training1_cached(cfg: Config, run: Run, data: Data, features: Features, logger, run_dir: Path,
                     device: torch.device, accelerator: str) -> Training1:
    """Training-1 from the cache, or computed here and stored; run.results["training1_cache"] says which."""
    key_cfg = key_config(cfg, device)
    record = run.results["training1_cache"] = {"enabled": cfg.cache.training1, "hit": False}
    if not cfg.cache.training1:
        return training1(cfg, run, data, features, logger, run_dir, device, accelerator)
    cache = Training1Cache(Path(cfg.cache.training1_dir) if cfg.cache.training1_dir else default_dir())
    with cache.entry(key_cfg) as entry:
        record.update(key=entry.key, dir=str(entry.path), wait_s=round(entry.waited_s, 3))
        t1 = entry.load(lambda: LSTMPolicy.from_config(cfg.model).to(device))
        if t1 is None:
            t1 = training1(cfg, run, data, features, logger, run_dir, device, accelerator)
            entry.save(t1, run_dir / "r.pt", run_dir)
            record["stored"] = True
            log.info("Training-1 cache: stored entry %s", entry.path)
            return t1
    # a hit: the stages' results, curves and r as the computing job left them
    log.info("Training-1 cache: reusing entry %s (computed by %s)", entry.path, entry.source_run_dir)
    record.update(hit=True, stages=list(STAGES), source_run_dir=entry.source_run_dir, source_timings=t1.timings,
                  source_samples=t1.samples)
    for stage in STAGES:
        run.results["timings"][stage], run.results["samples"][stage] = 0.0, 0
    for step, metrics in t1.log_calls:
        logger.log_metrics(metrics, step)
    t1.r.save(run_dir / "r.pt")
    return t1


def training1(cfg: Config, run: Run, data: Data, features: Features, logger, run_dir: Path, device: torch.device,
              accelerator: str) -> Training1:
    """r = MLE(D), its evaluation, lambda by moment matching, then Z and CE(T, p_lambda)."""
    recorder = RecordingLogger(logger)
    splits = data.splits
    with run.stage("r"):
        r = LSTMPolicy.from_config(cfg.model).to(device)
        r_fit = train_mle(r, splits.train, splits.valid, cfg.r, symbols_per_seq=data.symbols, prefix="r",
                          logger=recorder, accelerator=accelerator, seed=cfg.seed)
        r.save(run_dir / "r.pt")
    with run.stage("eval_r"):
        r_eval = evaluate_policy(r, splits.test, data.process.contains_motif, cfg.eval, data.symbols)
        run.count_samples("eval_r", cfg.eval.samples)
        recorder.log("eval", 0, ce_test_r=r_eval.ce_test, motif_freq_r=r_eval.motif_freq)
        log.info("CE(T, r) = %.4f; motif frequency of r %.4f", r_eval.ce_test, r_eval.motif_freq)
    proposal = training1_proposal(cfg.training1, r, device)
    with run.stage("training1"):
        moments = moment_matching(r, features, splits.train, cfg.training1, max_len=cfg.max_len, seed=cfg.seed + 1,
                                  logger=recorder, proposal=proposal)
        run.count_samples("training1", moments.samples)
        log.info("lambda = %s", dict(zip(features.names, [round(v, 3) for v in moments.lam], strict=True)))
    with run.stage("z"):
        with torch.no_grad():
            partition = estimate_partition(r, gam(r, features, torch.tensor(moments.lam, device=device)), features,
                                           moments.moments_data, splits.test, splits.valid, cfg.z,
                                           max_len=cfg.max_len, symbols_per_seq=data.symbols, seed=cfg.seed + 2,
                                           logger=recorder, proposal=proposal)
        run.count_samples("z", partition.z_samples)
    timings = {s: run.results["timings"].get(s) for s in STAGES}
    samples = {s: run.results["samples"].get(s, 0) for s in STAGES}
    return Training1(r, r_fit, r_eval, moments, partition, timings, samples, recorder.calls)


def training1_proposal(cfg: MomentMatchingConfig, r: LSTMPolicy, device: torch.device) -> DefensiveMixture | None:
    """snis_mix: q = mix_r r + (1 - mix_r) pi, pi the proposal run's pi.pt (None: Training-1 and Z draw from r)."""
    if cfg.estimator != "snis_mix":
        return None
    pi = LSTMPolicy.load(Path(cfg.proposal) / "pi.pt", device)
    log.info("Training-1 and Z: proposal %.3g r + %.3g pi of %s", cfg.mix_r, 1 - cfg.mix_r, cfg.proposal)
    return DefensiveMixture(r.eval(), pi, cfg.mix_r)


def training2(cfg: Config, run: Run, t1: Training1, p_lambda, data: Data, logger, accelerator: str,
              exact_target: ExactTarget | None = None) -> Training2Result:
    """pi by the configured method (the registry's), from r and the target; fills the run's Training-2
    results. Every method gets the same inputs and returns the same result (methods/contract.py)."""
    method, res, splits = cfg.method, run.results, data.splits
    pi = LSTMPolicy.from_config(cfg.model).to(t1.r.device)  # fresh: the paper
    if method.init == "r":
        pi.load_state_dict(t1.r.state_dict())
    inputs = Training2Inputs(
        pi=pi.train(), r=t1.r, p_lambda=p_lambda, true_process=TrueProcess(data.process), train=splits.train,
        valid=splits.valid, max_len=cfg.max_len, symbols=data.symbols, ce_valid_r=res["ce_valid_r"],
        ce_valid_p_lambda=res["ce_valid_p_lambda"], log_z_hat=res["log_z_hat"],
        # s.e. of log Z-hat = relative s.e. of Z-hat (delta method); unknown: 0 (the paired s.e. alone)
        log_z_se=float(res.get("z_rel_se") or 0.0), seed=res["training2_seed"], logger=logger, accelerator=accelerator,
        exact=exact_target, motif=cfg.motif.pattern)
    fit = registry.train(method, inputs)  # the start is check 0 of its selection (t2_kept_start)
    run.count_samples("training2", fit.draws)
    res.update(fit.record())
    if fit.learned_log_z is not None:
        log.info("[%s] learned log Z = V(empty prefix) = %.4f; importance-sampled log Z-hat = %.4f",
                 method.algorithm, fit.learned_log_z, res["log_z_hat"])
    return fit
