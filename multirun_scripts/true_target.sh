#!/usr/bin/env bash
# The true-target ablation (paper Supp. A.3, conf/sweep/true_target.yaml): DPG_off on the true
# process (method dpg_true) against DPG_off on P_lambda (dpg_off), 3 motifs x 5 |D| x 2 seeds,
# features 1001111: 60 jobs with the joblib launcher, then the report (figure4.png, the paper's
# Figure 4; its per-cell and raw-means tables hold dpg_true beside dpg_off).
#
#   multirun_scripts/true_target.sh [HYDRA_ARGS...]
#   multirun_scripts/true_target.sh launcher=slurm hydra.launcher.partition=PART
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep true_target joblib "$@"
