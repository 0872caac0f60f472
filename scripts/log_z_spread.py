"""The spread of log Z-hat over independent estimates, where no exact log Z exists (a cpu cell).

    python scripts/log_z_spread.py RUN [--pi RUN] [--twist RUN ...] [--is-samples 200000]
                                   [--particles 1000] [--runs 20] [--bounds] [--seed 0]

RUN: any finished run of the cell (its r and lambda define P_lambda). Each row gives `runs`
independent estimates of log Z; every SMC row and the mixture row spend `particles` sequences
per estimate, and the first row also at `is-samples` sequences (the Z stage's cap):
  is r (N)        N draws of r, Z-hat = mean exp(lambda . phi)          (the Z stage's estimator)
  is r (K)        the same at K = particles draws
  is mix          K draws of q = 0.1 r + 0.9 pi (--pi's pi.pt; training1.estimator=snis_mix's q)
  smc r           one SMC run of K particles from r, no twist
  smc pi          one SMC run of K particles from --pi's pi, no twist
  smc r + V       one SMC run from r twisted by a twist learner's values (each --twist RUN)
  smc pi + V      the same from that run's own pi
Columns: the mean and s.d. of log Z-hat, the s.d. relative to `is r (N)`'s scaled to K draws
(s.d. x sqrt(N / K): equal numbers of sequences), seconds per estimate (one thread); with
--bounds, the SMC rows' lower and upper bounds on log Z (the mean log Z-hat of `runs` SMC runs,
and of `runs` conditional-SMC runs each seeded with an exact sample of p_lambda).
A twist run must share the cell's r and lambda (a run of the same cell, Training-1 from the cache).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from gam_rl.estimators import importance_z, rejection_sample
from gam_rl.methods.saved_twist import load_twist
from gam_rl.proposals import DefensiveMixture
from gam_rl.sample import load_run
from gam_rl.smc import smc_runs


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std()) / math.sqrt(len(x))


def same_model(a, b) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--pi", type=Path)
    parser.add_argument("--twist", type=Path, nargs="*", default=[])
    parser.add_argument("--is-samples", type=int, default=200000)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--bounds", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    run = load_run(args.run)
    target, g = run.target(), torch.Generator().manual_seed(args.seed)
    N, K, R, L = args.is_samples, args.particles, args.runs, run.max_len
    res = run.results
    print(f"cell {res['motif']} / {res['features']} / D {res['dataset_size']} / seed {res['seed']}: "
          f"{R} estimates per row, K = {K}, N = {N}; the run's own log Z-hat {res['log_z_hat']:.4f} "
          f"(rel. s.e. {res['z_rel_se']:.4f}, {res['z_samples']} samples)\n")
    print("| estimator | sequences | mean log Z-hat | s.d. | s.d. at equal sequences / is r | lower bound | "
          "upper bound | s / estimate |")
    print("|---|---|---|---|---|---|---|---|")
    exact = None
    if args.bounds:
        exact = rejection_sample(run.r, target, R, L, 10000, 10**9, g, progress="exact samples").tokens
    rows = [("is r", N, None), ("is r", K, None)]
    other = None
    if args.pi is not None:
        other = load_run(args.pi)
        if not same_model(other.r, run.r):
            sys.exit(f"--pi {args.pi}: another r than {args.run}'s (not a run of the same cell)")
        rows += [("is mix", K, None), ("smc r", K, None), ("smc pi", K, ("pi", other.pi, None))]
    else:
        rows += [("smc r", K, None)]
    for twist_dir in args.twist:
        twist_run = load_run(twist_dir)
        if not same_model(twist_run.r, run.r) or not torch.equal(twist_run.lam, run.lam):
            sys.exit(f"--twist {twist_dir}: another r or lambda than {args.run}'s (not a run of the same cell)")
        twist = load_twist(twist_dir, run.r)
        name = twist_run.results["method"]
        rows += [(f"smc r + V({name})", K, ("r", run.r, twist)),
                 (f"smc pi({name}) + V", K, ("pi", twist_run.pi, twist))]
    reference_sd = None
    for label, size, spec in rows:
        started = time.perf_counter()
        bounds = None
        if label == "is r":
            log_z = torch.tensor([importance_z(run.r, target, size, 10000, L, g).log_z for _ in range(R)])
        elif label == "is mix":
            q = DefensiveMixture(run.r, other.pi, 0.1)
            log_z = torch.tensor([importance_z(q, target, size, 10000, L, g).log_z for _ in range(R)])
        else:
            q, twist = (run.r, None) if spec is None else (spec[1], spec[2])
            log_z = smc_runs(target, q, run.r, size, L, R, twist=twist, generator=g).log_z
            seconds = (time.perf_counter() - started) / R
            if exact is not None:  # lower: these runs' mean log Z-hat; upper: conditional SMC on exact samples
                upper = smc_runs(target, q, run.r, size, L, R, twist=twist, generator=g, reference=exact).log_z
                bounds = (*mean_se(log_z), *mean_se(upper))
        if label.startswith("is"):
            seconds = (time.perf_counter() - started) / R
        sd = float(log_z.std())
        if reference_sd is None:
            reference_sd = sd * math.sqrt(N)  # IS's s.d. scales as 1 / sqrt(sequences)
        relative = sd / (reference_sd / math.sqrt(size))
        low = up = ""
        if bounds is not None:
            low, up = f"{bounds[0]:.4f} +- {bounds[1]:.4f}", f"{bounds[2]:.4f} +- {bounds[3]:.4f}"
        print(f"| {label} | {size} | {float(log_z.mean()):.4f} | {sd:.4f} | {relative:.3f} | {low} | {up} | "
              f"{seconds:.2f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
