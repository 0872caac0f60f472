#!/usr/bin/env bash
# Tune one Training-2 method's schedule with Hydra's Optuna sweeper (conf/hparams_search/<method>.yaml,
# docs/tuning.md): the same trials, draw budget and tuning cell for every method.
#
#   multirun_scripts/tune.sh method=dpg_off                      # the study: multirun/tune/dpg_off/
#   multirun_scripts/tune.sh method=ppo_dpg hydra.sweeper.n_trials=12 tune.budget_draws=1e6
#   multirun_scripts/tune.sh method=ppo_dpg --dry-run             # the study's folder, cell, budget, space
#
# - Re-running the same command resumes the study (its SQLite file, study.db in the sweep folder):
#   the trials an interruption left running count as failed, and only the missing trials run.
# - At the end the best trial is written as a method variant, <sweep>/best/method/<method>_best.yaml;
#   the script prints the command that uses it. Every trial's row: <sweep>/trials.csv.
# - Every other argument goes to gam-rl (hydra.sweep.dir=..., hydra.launcher.n_jobs=1, profile=toy, ...).
# - Environment: GAM_RL_PYTHON (the Python with gam_rl installed; default: the repository's .venv, else
#   python3). Needs the `tune` extra (pip install -e '.[tune]': hydra-optuna-sweeper).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${GAM_RL_PYTHON:-}"
if [[ -z "$py" ]]; then
    if [[ -x "$root/.venv/bin/python" ]]; then py="$root/.venv/bin/python"; else py="python3"; fi
fi
if ! "$py" -c "import gam_rl, optuna, hydra_plugins.hydra_optuna_sweeper" 2>/dev/null; then
    echo "error: $py cannot import gam_rl and hydra-optuna-sweeper (run: $py -m pip install -e '$root[tune]')" >&2
    exit 2
fi

method="" sweep_dir=""
args=()
for arg in "$@"; do
    case "$arg" in
        method=*) method="${arg#method=}" ;;
        hparams_search=*) echo "error: give method=<name>; this script chooses hparams_search=<name>" >&2; exit 2 ;;
        hydra.sweep.dir=*) sweep_dir="${arg#hydra.sweep.dir=}"; args+=("$arg") ;;
        *) args+=("$arg") ;;
    esac
done
if [[ -z "$method" ]]; then
    echo "usage: $0 method=<name> [gam-rl overrides]; the methods with a search space:" >&2
    ls "$root/conf/hparams_search" | sed -n 's/\.yaml$//p' | sed 's/^/  /' >&2
    exit 2
fi
[[ -n "$sweep_dir" ]] || sweep_dir="multirun/tune/$method"

if [[ " ${args[*]-} " == *" --dry-run "* ]]; then  # the study's plan only: nothing runs
    exec "$py" -m gam_rl.cli "hparams_search=$method" "method=$method" ${args[@]+"${args[@]}"}
fi
rc=0
"$py" -m gam_rl.cli "hparams_search=$method" "method=$method" ${args[@]+"${args[@]}"} || rc=$?
best="$sweep_dir/best/method/${method}_best.yaml"
if [[ $rc == 2 ]]; then
    echo "tune: the configuration was refused (above); nothing ran" >&2
    exit 2
elif [[ $rc != 0 ]]; then
    echo "tune: gam-rl exited $rc; re-run the same command to resume the study in $sweep_dir" >&2
    exit "$rc"
fi
if [[ ! -f "$best" ]]; then
    echo "tune: no trial completed, so no best configuration ($sweep_dir/trials.csv lists the trials)" >&2
    exit 1
fi
best_dir="$(cd "$(dirname "$best")/.." && pwd)"
echo "tune: trials: $sweep_dir/trials.csv"
echo "tune: best:   $best"
echo "tune: use it: gam-rl method=${method}_best 'hydra.searchpath=[file://$best_dir]' ..."
