#!/usr/bin/env bash
# Table 1 on a Slurm cluster (conf/sweep/table1.yaml with conf/launcher/slurm.yaml, through
# hydra-submitit-launcher): one array task per job, then the report. This process submits the
# array and waits for it, so run it in tmux/screen (or nohup) on a login node; the sweep folder
# must be on a file system the compute nodes share.
#
#   multirun_scripts/table1_slurm.sh hydra.launcher.partition=PART [HYDRA_ARGS...]
#   multirun_scripts/table1_slurm.sh profile=paper hydra.launcher.partition=gpu \
#       hydra.launcher.gpus_per_node=1 hydra.launcher.timeout_min=720 \
#       'hydra.launcher.setup=["source /path/to/gam_rl/.venv/bin/activate"]'
#
# Resources per task: hydra.launcher.cpus_per_task (threads follows it), mem_gb, timeout_min,
# gpus_per_node, qos, account, ... (conf/launcher/slurm.yaml). A task that times out or is
# cancelled leaves no results.json: re-run with the same hydra.sweep.dir to redo just those.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/_sweep.sh"
run_sweep table1 slurm "$@"
