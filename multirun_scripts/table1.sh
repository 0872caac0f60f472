#!/usr/bin/env bash
# Table 1 of the paper on this machine: 3 motifs x {1001111, Mv1001111} x |D| in {500, 1000,
# 5000, 10000, 20000} x seeds {1234, 4444} = 60 cells x {distill, dpg_off} = 120 jobs
# (conf/sweep/table1.yaml), in parallel with the joblib launcher (one job per core, one torch
# thread each), then the report into <sweep dir>/report: Table 1, Figure 2 and Figure 5 (the
# length features off and on: 1001111 against Mv1001111).
#
#   multirun_scripts/table1.sh [HYDRA_ARGS...]
#   multirun_scripts/table1.sh profile=paper hydra.sweep.dir=multirun/table1_paper
#   multirun_scripts/table1.sh dataset_size=500,1000 hydra.launcher.n_jobs=4 threads=2
#
# The cpu profile (default), one thread per job on 2 cores (2026-12-03, commit a194c86, on a day the
# machine ran about 1.15x slower than its fastest): 0.3-6 min per job; one motif x mask x seed (10
# jobs) took 1265-1644 job-seconds, 11.5-14.4 min; all 120 jobs about 2.4 h (docs/measurements.md).
# Exit 0 when every job is ok, 1 when some failed (the report lists them), 2-3 on setup errors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep table1 joblib "$@"
