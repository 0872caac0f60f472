"""Run only Training-2 of one configuration on the r and lambda of a finished run, and print the
exact KL(p_lambda || pi) at every check: how the toy profile's schedules in conf/profile/toy/ were
chosen (on the exact divergences of seed 4444; the reported toy runs use seed 1234).

usage: python scripts/training2_exact.py RUN_DIR [gam-rl overrides ...]
  e.g. python scripts/training2_exact.py outputs/.../10011_1001111_D500_s4444_dpg_off \\
           profile=toy seed=4444 method=kl_control method.lr=1e-3
RUN_DIR holds r.pt and results.json (lambda, CE(V) of r and p_lambda) of a run whose configuration
the overrides repeat (profile, motif, features, dataset_size, seed). One JSON line goes to stdout.
"""

import json
import sys
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from gam_rl import schema
from gam_rl.cli import rewrite_axes
from gam_rl.data import load_splits
from gam_rl.exact import ExactCurve, ExactTarget, OutputSpace
from gam_rl.features import Features
from gam_rl.methods import registry
from gam_rl.methods.contract import Training2Inputs
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import TrueProcess, gam
from gam_rl.process import MotifProcess
from gam_rl.run_io import by_feature


class Curve(ExactCurve):
    """ExactCurve that also keeps (draws, KL(p || pi)) of every check."""

    def __init__(self, target: ExactTarget):
        super().__init__(target, "dpg")
        self.points: list[tuple[int, float]] = []

    def on_validation_epoch_end(self, trainer, module):
        super().on_validation_epoch_end(trainer, module)
        self.points.append((module.draws.samples_drawn, round(self.last["kl_p_pi"], 4)))


def main(run_dir: Path, overrides: list[str]) -> dict:
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = schema.load(compose("config", overrides=rewrite_axes(["logger=csv", *overrides])))
    results = json.loads((run_dir / "results.json").read_text())
    saved = torch.load(run_dir / "r.pt")
    r = LSTMPolicy(**saved["config"]).eval()
    r.load_state_dict(saved["state_dict"])
    lam = torch.tensor(list(by_feature(results, "lambda").values()))
    p_lambda = gam(r, Features.from_config(cfg.features, cfg.motif.pattern), lam)
    process = MotifProcess(cfg.motif.pattern, cfg.n)
    pools = {"train": cfg.data.pools.train, "valid": cfg.data.pools.valid, "test": cfg.data.pools.test}
    splits = load_splits(cfg.motif.pattern, cfg.n, cfg.dataset_size.size, results["valid_size"], pools,
                         cfg.data.cache_dir, "cpu")
    exact = ExactTarget.of(p_lambda, OutputSpace(cfg.max_len), "cpu", process.log_prob)
    pi = LSTMPolicy.from_config(cfg.model)
    if cfg.method.init == "r":
        pi.load_state_dict(r.state_dict())
    curve = Curve(exact)
    start = time.perf_counter()
    inputs = Training2Inputs(pi=pi.train(), r=r, p_lambda=p_lambda, true_process=TrueProcess(process),
                             train=splits.train, valid=splits.valid, max_len=cfg.max_len, symbols=cfg.n + 1,
                             ce_valid_r=results["ce_valid_r"], ce_valid_p_lambda=results["ce_valid_p_lambda"],
                             log_z_hat=results["log_z_hat"], seed=cfg.seed + 3, callbacks=[curve])
    fit = registry.train(cfg.method, inputs)  # a method without checks (distill) leaves the curve empty
    learned = fit.exact_extras(exact) if fit.exact_extras is not None else {}
    return {"learned": {k: round(v, 4) if isinstance(v, float) else v for k, v in learned.items()},
            "overrides": overrides,
            "seconds": round(time.perf_counter() - start, 1), "draws": fit.draws,
            "kl_p_r": round(exact.policy_divergences(r, "r")["kl_p_r"], 4),
            "final": {k: round(v, 4) for k, v in exact.policy_divergences(fit.pi).items()}, "curve": curve.points,
            "results": {k: fit.results.get(k) for k in ("t2_updates", "t2_best_epoch", "swap_count",
                                                        "dpg_log_z_running", "fdpg_stalled_updates", "fdpg_log_z_gap",
                                                        "fdpg_log_z_gap_sd")}}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    print(json.dumps(main(Path(sys.argv[1]), sys.argv[2:])))
