#!/usr/bin/env bash
# Every Training-2 method on the same cells (conf/sweep/methods.yaml): 10 methods per cell with the
# joblib launcher, then the report (its methods table: draws to CE(V, pi) <= 1.01 CE(V, p_lambda),
# final CE(T, pi), motif frequency, exact divergences under profile=toy; methods.png).
#
#   multirun_scripts/methods.sh profile=toy
#   multirun_scripts/methods.sh motif=10001011111000 features=1001111 seed=1234 dataset_size=500,5000
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep methods joblib "$@"
