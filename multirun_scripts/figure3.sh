#!/usr/bin/env bash
# The paper's Figure 3 (conf/sweep/figure3.yaml): distillation from a P_lambda fitted by SNIS
# (training1.estimator=snis_r) and by rejection sampling (rs), 3 motifs x 5 |D| x 2 seeds,
# features 1001111: 60 jobs with the joblib launcher, then the report (figure3.png).
#
#   multirun_scripts/figure3.sh [HYDRA_ARGS...]
#   multirun_scripts/figure3.sh motif=10001011111000 seed=1234 dataset_size=500,5000   # 4 jobs
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep figure3 joblib "$@"
