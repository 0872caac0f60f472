"""f-DPG's tv and an error in log Z-hat, measured exactly on an enumerable run (profile=toy, eval.exact):
where the tv update stalls, and what the draw's own Z-hat (method.normalise=draw_z) does instead.

tv's f'(t) = sign(t - 1) / 2, t = pi(x) Z-hat / P(x), reads Z only through the threshold pi Z-hat = P.
With log Z-hat = log Z + delta, the exact expected update (any proposal q, with or without the
leave-one-out baseline: both have the plain update's expectation) is

    g(delta) = sum_x pi(x) f'(pi(x) e^delta / p(x)) grad log pi(x),      g(0) = grad TV(pi, p),

computed here by one backward of sum_x pi(x) f'(x) log pi(x) (pi(x) f'(x) held fixed) over every
output (exact.tree_log_prob). For each delta and for pi = r and pi = the run's pi.pt, one row:

    minus      pi's mass where f' = -1/2 (pi e^delta < p)
    p_stall    the probability that a draw of N i.i.d. items of q = pi has every sign the same:
               m^N + (1 - m)^N (the update is then exactly 0 with the baseline)
    norm       |g(delta)| / |g(0)|
    cos        cos(g(delta), g(0))
    progress   <g(delta), g(0)> / |g(0)|^2: TV's first-order decrease per step, relative to delta = 0

then a Monte Carlo of K draws of N items of q = pi with the baseline: the mean update with the exact
Z, and with each draw's own Z-hat (fdpg.draw_log_z), against g(0); and the fraction of those draws
that stall under each.

usage: python scripts/tv_stall.py RUN_DIR [--draws K] [--n N]
       python scripts/tv_stall.py train RUN_DIR [--log-z-offset D] [gam-rl overrides ...]
RUN_DIR: a run of profile=toy with eval.exact=true (config.yaml, r.pt, pi.pt, results.json), e.g.
  python -m gam_rl.cli profile=toy eval.exact=true method=fdpg_tv logger=csv hydra.run.dir=/tmp/tv_toy
`train` runs Training-2 again on that run's r and lambda (scripts/training2_exact.py) with log Z-hat
offset by D from the running Z-hat (method.normalise=running_z: an injected underestimate), and prints
training2_exact's JSON line (final exact KL(p || pi), TV, fdpg_stalled_updates).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from gam_rl.exact import ExactTarget, OutputSpace, tree_log_prob
from gam_rl.features import Features
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.fdpg import draw_log_z, f_divergence, fdpg_coefficients, fdpg_fprime, stalled
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam
from gam_rl.run_io import by_feature

DELTAS = (-5.0, -4.0, -3.0, -2.0, -1.0, -0.5, -0.25, -0.1, 0.0, 0.1, 0.25, 0.5, 1.0, 2.0, 3.0)


def load_policy(path: Path) -> LSTMPolicy:
    saved = torch.load(path, weights_only=True)
    policy = LSTMPolicy(**saved["config"]).eval()
    policy.load_state_dict(saved["state_dict"])
    policy.fused_kernel = False  # two backwards through one forward (retain_graph)
    return policy


def flat_grad(value: torch.Tensor, policy: LSTMPolicy) -> torch.Tensor:
    grads = torch.autograd.grad(value, list(policy.parameters()), retain_graph=True)
    return torch.cat([g.flatten() for g in grads]).double()


def exact_rows(policy: LSTMPolicy, log_p: torch.Tensor, max_len: int, draw_size: int) -> list[dict]:
    log_pi = tree_log_prob(policy, max_len, grad=True)  # every output of the sampler, differentiable
    g0 = flat_grad(f_divergence("tv", log_pi, log_p), policy)
    lp = log_pi.detach().double()
    pi = lp.exp()
    rows = []
    for delta in DELTAS:
        fprime = 0.5 * torch.sign(lp - log_p + delta)  # f'(pi e^delta / p)
        g = flat_grad((pi * fprime) @ log_pi, policy)
        minus = float(pi[fprime < 0].sum())
        rows.append({"delta": delta, "minus": round(minus, 4),
                     "p_stall": float(f"{minus**draw_size + (1 - minus)**draw_size:.3g}"),
                     "norm": round(float(g.norm() / g0.norm()), 4),
                     # None where the update is 0 (up to rounding: sum_x pi f' grad log pi with one f' everywhere)
                     "cos": round(float(g @ g0 / (g.norm() * g0.norm())), 4) if g.norm() > 1e-6 * g0.norm() else None,
                     "progress": round(float(g @ g0 / (g0 @ g0)), 4)})
    return rows, g0


def monte_carlo(policy: LSTMPolicy, target, log_z: float, g0: torch.Tensor, max_len: int, draws: int,
                draw_size: int, seed: int) -> dict:
    """The mean baseline update over `draws` draws of q = pi, with the exact log Z and with each draw's own."""
    generator = torch.Generator().manual_seed(seed)
    total = {"exact_z": torch.zeros_like(g0), "draw_z": torch.zeros_like(g0)}
    stalls = {"exact_z": 0, "draw_z": 0}
    draw_delta = []
    for _ in range(draws):
        with torch.no_grad():
            samples = policy.sample(draw_size, max_len, generator)
            log_w = target.log_weight(policy, samples).double()
        n = len(samples)
        draw = WeightedDraw(samples.tokens, log_w, samples.log_prob.double(),
                            torch.full((n,), -math.log(n), dtype=torch.float64), torch.full((n,), 1.0 / n))
        log_pi = policy.log_prob(draw.tokens)  # differentiable; policy in eval mode (load_policy)
        weights = log_pi.detach().double()
        own = draw_log_z(weights, draw.log_q, draw.log_w, draw.log_h)
        draw_delta.append(float(own) - log_z)
        for name, lz in (("exact_z", log_z), ("draw_z", own)):
            stalls[name] += stalled(fdpg_fprime(weights, draw.log_q, draw.log_w, "tv", log_z=lz))
            coef = fdpg_coefficients(weights, draw.log_q, draw.log_w, draw.log_h, "tv", log_z=lz, baseline=True)
            total[name] += flat_grad((coef.float() * log_pi).sum(), policy)
    out = {"draws": draws, "draw_size": draw_size,
           "draw_z_delta_mean": round(sum(draw_delta) / draws, 4),
           "draw_z_delta_sd": round(float(torch.tensor(draw_delta).std()), 4)}
    for name, g in total.items():
        g = g / draws
        out[name] = {"cos": round(float(g @ g0 / (g.norm() * g0.norm())), 4),
                     "progress": round(float(g @ g0 / (g0 @ g0)), 4), "stalled": stalls[name] / draws}
    return out


def measure(run_dir: Path, draws: int, draw_size: int) -> dict:
    cfg = OmegaConf.load(run_dir / "config.yaml")
    results = json.loads((run_dir / "results.json").read_text())
    r = load_policy(run_dir / "r.pt")
    features = Features(list(cfg.features.use), cfg.motif.pattern, max_len=cfg.features.max_len)
    lam = by_feature(results, "lambda")
    target = gam(r, features, torch.tensor([lam[name] for name in features.names]))
    exact = ExactTarget.of(target, OutputSpace(cfg.max_len), "cpu")
    out = {"run_dir": str(run_dir), "lambda": lam, "log_z_exact": round(exact.log_z, 4),
           "log_z_hat_z_stage": round(results["log_z_hat"], 4),
           "log_z_running_end": round(results["dpg_log_z_running"], 4) if results.get("dpg_log_z_running") else None,
           "kl_p_r": round(results["exact"]["kl_p_r"], 4), "tv_p_r": round(results["exact"]["tv_p_r"], 4),
           "kl_p_pi": round(results["exact"]["kl_p_pi"], 4), "tv_p_pi": round(results["exact"]["tv_p_pi"], 4)}
    # the running Z-hat at the run's checks (metrics.csv), as delta = log Z-hat - log Z
    if (run_dir / "metrics.csv").exists():
        with open(run_dir / "metrics.csv") as f:
            running = [float(row["value"]) - exact.log_z for row in csv.DictReader(f) if row["name"] == "log_z_running"]
        if running:
            out["running_delta_at_checks"] = {"checks": len(running), "min": round(min(running), 4),
                                              "max": round(max(running), 4), "first": round(running[0], 4)}
    # the s.d. of delta for the mean weight of one draw of N from r: sqrt(chi^2(p || r) / N)
    log_r = exact.space.log_prob(r)
    chi2 = float(torch.exp(torch.logsumexp(2 * exact.log_p - log_r, 0))) - 1.0
    out["delta_sd_one_draw_of_r"] = round(math.sqrt(chi2 / draw_size), 4)
    for name, path in (("r", run_dir / "r.pt"), ("pi", run_dir / "pi.pt")):
        if not path.exists():
            continue
        policy = load_policy(path)
        rows, g0 = exact_rows(policy, exact.log_p, cfg.max_len, draw_size)
        out[f"pi={name}"] = {"rows": rows, "monte_carlo": monte_carlo(policy, target, exact.log_z, g0, cfg.max_len,
                                                                      draws, draw_size, seed=cfg.seed)}
    return out


def train(run_dir: Path, offset: float, overrides: list[str]) -> dict:
    spec = importlib.util.spec_from_file_location("training2_exact", Path(__file__).with_name("training2_exact.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from gam_rl.methods.loop import LoopModule

    if offset:
        running = LoopModule.log_norm
        LoopModule.log_norm = lambda self: running(self) + offset  # log Z-hat = running + offset
    return {"log_z_offset": offset, **module.main(run_dir, overrides)}


def main(argv: list[str]) -> dict:
    if argv[:1] == ["train"]:
        parser = argparse.ArgumentParser()
        parser.add_argument("run_dir", type=Path)
        parser.add_argument("--log-z-offset", type=float, default=0.0)
        args, overrides = parser.parse_known_args(argv[1:])
        return train(args.run_dir, args.log_z_offset, overrides)
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--draws", type=int, default=200)
    parser.add_argument("--n", type=int, default=500)
    args = parser.parse_args(argv)
    return measure(args.run_dir, args.draws, args.n)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit(__doc__)
    torch.set_num_threads(1)
    print(json.dumps(main(sys.argv[1:])))
