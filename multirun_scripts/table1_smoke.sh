#!/usr/bin/env bash
# The smoke version of Table 1 (conf/sweep/table1_smoke.yaml): profile smoke, small data pools,
# a 2 x 2 grid (|D| 100, 200 x distill, dpg_off), joblib launcher, then the report. About a
# minute on 2 cores; checks the whole path from sweep to report.
#
#   multirun_scripts/table1_smoke.sh [HYDRA_ARGS...]
#   multirun_scripts/table1_smoke.sh hydra.sweep.dir=/tmp/smoke dataset_size=100 launcher=basic
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep table1_smoke joblib "$@"
