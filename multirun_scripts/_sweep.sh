#!/usr/bin/env bash
# Shared by the multirun_scripts: run one sweep preset, then the report, into one sweep folder.
#
#   run_sweep PRESET DEFAULT_LAUNCHER [HYDRA_ARGS...]
#
# - The sweep folder is hydra.sweep.dir when the arguments hold it, else
#   multirun/<YYYY-mm-dd_HH-MM-SS>_<PRESET> (relative to the current directory); either way it
#   is passed to Hydra as an absolute path, and everything lands in it: one folder per job
#   (results.json, metrics.csv, config.yaml, r.pt, pi.pt, wandb/), training1_cache/,
#   .submitit/ (Slurm), report/.
# - Every argument goes to Hydra (narrow the grid: dataset_size=500,1000; choose a launcher:
#   launcher=basic; any key=value). launcher=... in the arguments replaces DEFAULT_LAUNCHER.
# - A failed job never stops the sweep: the report still runs and lists it, and the script
#   then exits 1. Re-running with the same hydra.sweep.dir skips the complete jobs and redoes
#   the failed or missing ones.
# - Environment: GAM_RL_PYTHON (the Python with gam_rl installed; default: the repository's
#   .venv, else python3).
set -euo pipefail

run_sweep() {
    local preset="$1" launcher="$2"
    shift 2
    local root
    root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
    local py="${GAM_RL_PYTHON:-}"
    if [[ -z "$py" ]]; then
        if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
    fi
    if ! "$py" -c "import gam_rl" 2>/dev/null; then
        echo "error: $py cannot import gam_rl (run 'make setup', or set GAM_RL_PYTHON)" >&2
        exit 2
    fi

    # the report: gam-rl-report next to that Python, else on PATH, else python -m gam_rl.report
    local -a report
    if [[ -x "$(dirname "$py")/gam-rl-report" ]]; then
        report=("$(dirname "$py")/gam-rl-report")
    elif command -v gam-rl-report >/dev/null 2>&1; then
        report=(gam-rl-report)
    elif "$py" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('gam_rl.report') is None)"; then
        report=("$py" -m gam_rl.report)
    else
        report=()
        echo "warning: no report tool (gam-rl-report / gam_rl.report): the sweep will run, then this script fails" >&2
    fi

    local sweep_dir="" arg has_launcher=0
    local -a args=()
    for arg in "$@"; do
        case "$arg" in
            hydra.sweep.dir=*) sweep_dir="${arg#hydra.sweep.dir=}" ;;
            sweep=*|+sweep=*) echo "error: this script runs sweep=$preset; run gam-rl -m for another preset" >&2; exit 2 ;;
            launcher=*) has_launcher=1; args+=("$arg") ;;
            *) args+=("$arg") ;;
        esac
    done
    [[ -n "$sweep_dir" ]] || sweep_dir="multirun/$(date +%Y-%m-%d_%H-%M-%S)_${preset}"
    mkdir -p "$sweep_dir"
    sweep_dir="$(cd "$sweep_dir" && pwd)"
    [[ $has_launcher == 1 ]] || args=("launcher=$launcher" ${args[@]+"${args[@]}"})

    echo "sweep $preset -> $sweep_dir"
    local sweep_rc=0
    "$py" -m gam_rl.cli --multirun "sweep=$preset" "hydra.sweep.dir=$sweep_dir" ${args[@]+"${args[@]}"} || sweep_rc=$?
    if [[ $sweep_rc != 0 ]]; then
        echo "sweep: at least one job failed (exit $sweep_rc); the others' results are kept" >&2
    fi

    local status_rc=0
    echo "== job status ($sweep_dir)"
    "$py" -m gam_rl.sweep "$sweep_dir" || status_rc=$?

    if [[ ${#report[@]} == 0 ]]; then
        echo "error: cannot write the report: neither gam-rl-report nor the module gam_rl.report is installed;" >&2
        echo "       the sweep's results are in $sweep_dir (run the report on it once it is available)" >&2
        exit 3
    fi
    local report_rc=0
    echo "== report: ${report[*]} $sweep_dir"
    "${report[@]}" "$sweep_dir" || report_rc=$?
    if [[ $report_rc != 0 ]]; then
        echo "error: the report failed (exit $report_rc)" >&2
        exit 3
    fi
    echo "report: $sweep_dir/report"
    if [[ $sweep_rc != 0 || $status_rc != 0 ]]; then
        echo "done, with failed or missing jobs (listed above and in the report); re-run with" >&2
        echo "  hydra.sweep.dir=$sweep_dir  to redo only those" >&2
        exit 1
    fi
    echo "done: every job ok"
}
