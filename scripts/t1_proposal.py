"""Training-1's lambda before and after snis_mix, judged on draws that neither fit saw.

    python scripts/t1_proposal.py BEFORE_RUN AFTER_RUN [BEFORE_RUN AFTER_RUN ...] [--samples 200000] [--seed 7]

BEFORE_RUN: a run of the cell with training1.estimator=snis_r (the paper's SNIS from r); AFTER_RUN: the
same cell with training1.estimator=snis_mix and training1.proposal=BEFORE_RUN. Both lambdas are judged on
one fresh draw of `samples` strings from the after-run's mixture q = mix_r r + (1 - mix_r) pi (bounded
weights, see gam_rl/proposals.py): the L1 moment mismatch |mean_D phi - E_hat phi|_1 with its s.e.
(sqrt of the summed per-feature variances), max |z|, the ESS of that draw under each lambda, and
log Z-hat from it (against which the run's own log Z-hat, and so its CE(T, p_lambda), can be judged). Beside
them, what each run reported itself: the held-out mismatch it selected on, the Z stage's mismatch and
ESS, log Z-hat, CE(T, p_lambda), and Training-2's CE(T, pi) and motif frequency.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from gam_rl.estimators import snis_moments
from gam_rl.proposals import DefensiveMixture
from gam_rl.run_io import by_feature
from gam_rl.sample import load_run


def judged(run, draws_phi, draws_log_w_r) -> tuple[float, float, float, float, float, float]:
    """L1 mismatch, its s.e., max |z|, the ESS of the fresh draw under this run's lambda, and log Z-hat with
    its relative s.e. (importance sampling from q: Z = E_q[P_lambda / q])."""
    log_w = (draws_phi @ run.lam).double() + draws_log_w_r  # log P_lambda / q = lambda . phi + log r - log q
    estimate = snis_moments(log_w, draws_phi)
    data = torch.tensor(list(by_feature(run.results, "moments_data").values()))
    gap = (data - estimate.moments).double()
    se = estimate.se.double()
    w = (log_w - log_w.max()).exp()
    log_z = float(torch.log(w.mean()) + log_w.max())
    rel_se = float(w.std() / (w.mean() * len(w) ** 0.5))
    return (float(gap.abs().sum()), float(se.pow(2).sum().sqrt()), float((gap.abs() / se).max()), estimate.ess,
            log_z, rel_se)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pairs", nargs="+", type=Path)
    parser.add_argument("--samples", type=int, default=200000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if len(args.pairs) % 2:
        parser.error("give run folders in pairs: BEFORE_RUN AFTER_RUN")
    torch.set_num_threads(1)
    print(f"fresh draws: {args.samples} strings of the after-run's mixture q, seed {args.seed}\n")
    print("| cell | D | estimator | fresh L1 mismatch +- s.e. | max z | fresh ESS | fresh log Z-hat +- rel s.e. | "
          "held-out (selected on) | "
          "Z stage mismatch (ESS) | log Z-hat +- rel s.e. | CE(T, p_lambda) | CE(T, pi) | motif freq pi | "
          "CE(T, r) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for before_dir, after_dir in zip(args.pairs[0::2], args.pairs[1::2], strict=True):
        before, after = load_run(before_dir), load_run(after_dir)
        t1 = after.cfg.training1
        if t1.estimator != "snis_mix":
            sys.exit(f"{after_dir}: training1.estimator is {t1.estimator!r}, not snis_mix")
        if Path(after.results["training1_proposal"]) != before_dir.resolve():
            sys.exit(f"{after_dir}: its proposal was {after.results['training1_proposal']}, not {before_dir}")
        # both lambdas are weighted through the after-run's r: the two runs must hold the same r (same cell, seed)
        same_r = all(torch.equal(a, b) for a, b in zip(before.r.state_dict().values(), after.r.state_dict().values(),
                                                        strict=True))
        if not same_r:
            sys.exit(f"{before_dir} and {after_dir} hold different r: not a before / after pair of one cell")
        q = DefensiveMixture(after.r, before.pi, t1.mix_r)
        generator = torch.Generator().manual_seed(args.seed)
        phis, log_w_rs = [], []
        for start in range(0, args.samples, 10000):
            draws = q.sample(min(10000, args.samples - start), after.max_len, generator)
            phis.append(after.features(draws.tokens))
            log_w_rs.append(draws.log_base - draws.log_prob)
        phi, log_w_r = torch.cat(phis), torch.cat(log_w_rs)
        for label, run in (("snis_r", before), ("snis_mix", after)):
            res = run.results
            l1, se, max_z, ess, log_z, rel_se = judged(run, phi, log_w_r)
            cell = f"{res['motif']} / {res['features']} / s{res['seed']}"
            print(f"| {cell} | {res['dataset_size']} | {label} | {l1:.4f} +- {se:.4f} | {max_z:.1f} | {ess:.0f} | "
                  f"{log_z:.4f} +- {rel_se:.4f} | "
                  f"{res['t1_best_mismatch']:.4f} +- {res['t1_best_mismatch_se']:.4f} | "
                  f"{res['moment_mismatch_l1']:.4f} ({res['z_ess']:.0f}) | {res['log_z_hat']:.4f} +- "
                  f"{res['z_rel_se']:.4f} | {res['ce_test_p_lambda']:.4f} | {res['ce_test_pi']:.4f} | "
                  f"{res['motif_freq_pi']:.3f} | {res['ce_test_r']:.4f} |")
        sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
