"""log Z by importance sampling and by SMC at equal numbers of sequences, against the exact log Z.

    python scripts/smc_log_z.py RUN_DIR... [--particles 1000] [--runs 20] [--seed 0]

For each run folder of a twist learner under eval.exact (the toy profile: results.json's exact log Z,
twist.pt beside r.pt and pi.pt), `runs` independent estimates each of
  is            K draws of r, Z-hat = mean P/r                      (the Z stage's estimator)
  smc r         one SMC run of K particles from r, no twist
  smc pi+twist  one SMC run of K particles from the run's pi, twisted by its learned values
and, for the two SMC rows, the bidirectional bounds (the mean log Z-hat of `runs` SMC runs, and of
`runs` conditional-SMC runs each seeded with an exact sample of p_lambda drawn by rejection from r).
Prints one markdown table: the mean and s.d. of log Z-hat - log Z, the mean |error|, the bounds
and whether the exact log Z lies between them (within 3 of their standard errors: each bound is a
mean of `runs` estimates).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from gam_rl.estimators import importance_z, rejection_sample
from gam_rl.methods.saved_twist import load_twist
from gam_rl.sample import load_run
from gam_rl.smc import log_z_bounds, smc_runs


def stats(errors: torch.Tensor) -> str:
    return f"{float(errors.mean()):+.4f} | {float(errors.std()):.4f} | {float(errors.abs().mean()):.4f}"


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs_dirs", nargs="+", type=Path)
    parser.add_argument("--particles", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    K, R = args.particles, args.runs
    print(f"K = {K} sequences per estimate, {R} estimates each; errors in nats (log Z-hat - log Z)\n")
    print("| run | estimator | mean error | s.d. | mean abs error | bounds [lower, upper] (+- s.e.) | exact inside "
          "(3 s.e.) | s |")
    print("|---|---|---|---|---|---|---|---|")
    for run_dir in args.runs_dirs:
        run = load_run(run_dir)
        log_z = run.results["exact"]["log_z"]
        target, g = run.target(), torch.Generator().manual_seed(args.seed)
        name = run.results.get("method", run_dir.name)
        started = time.perf_counter()
        is_errors = torch.tensor([importance_z(run.r, target, K, K, run.max_len, g).log_z - log_z for _ in range(R)])
        print(f"| {name} | is (r) | {stats(is_errors)} | | | {time.perf_counter() - started:.1f} |")
        exact = rejection_sample(run.r, target, R, run.max_len, 10000, 10**9, g, progress="exact").tokens
        twist = load_twist(run_dir, run.r) if (run_dir / "twist.pt").is_file() else None
        for label, q, tw in (("smc r", run.r, None), ("smc pi + twist", run.pi, twist)):
            if label != "smc r" and tw is None:
                continue
            started = time.perf_counter()
            errors = smc_runs(target, q, run.r, K, run.max_len, R, twist=tw, generator=g).log_z - log_z
            b = log_z_bounds(target, q, run.r, K, run.max_len, R, twist=tw, exact_samples=exact, generator=g)
            # the bounds are means of `runs` estimates: inside within 3 of their s.e. (strictly: both signs right)
            inside = b.lower - 3 * b.lower_se <= log_z <= b.upper + 3 * b.upper_se
            print(f"| {name} | {label} | {stats(errors)} | [{b.lower - log_z:+.4f} +- {b.lower_se:.4f}, "
                  f"{b.upper - log_z:+.4f} +- {b.upper_se:.4f}] | {'yes' if inside else 'no'} | "
                  f"{time.perf_counter() - started:.1f} |")
    print("\nbounds as offsets from the exact log Z; s: seconds for the row (one thread)")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
