"""Tuning a method's schedule as a sweep: Hydra's Optuna sweeper (hydra-optuna-sweeper), made resumable.

`multirun_scripts/tune.sh method=X` runs `gam-rl -m hparams_search=X`: conf/hparams_search/X.yaml gives
the search space (X's own `method.*` keys), and conf/hparams_search/common/study.yaml the rest: the
tuning cell (never a report cell), the draw budget, the trial count, TPE, and the study in an SQLite
file of the sweep folder. Every trial is one run (its folder trial_<k>, k = Optuna's trial number),
and its objective, the same for every method, is what `objective` computes from its results:

    reached the target line CE(V, pi) <= (1 + margin) CE(V, p_lambda), with pi's motif frequency >= the bar m:
        the draws it took to get there
    else:  B (1 + g + s),  g = (CE(V, pi) - line) / (CE(V, r) - line) clipped to [0, 10],  s = (m - motif freq) / m

Draws, not CE at a fixed budget, because the question users ask (and the table reports) is how
many draws a method needs to reach the line; the penalty keeps trials that miss it ordered by how
close they came on both counts (a sum, so a study whose trials all miss the motif bar still orders them
by the CE gap, and the reverse), and above every trial that made it (B >= the draws of any trial, which the trial
caps enforce: method.max_draws for the loop methods, method.max_proposals for distillation).

The Optuna sweeper runs `n_trials` more trials each time it is started; TuneSweeperImpl makes
n_trials the study's total instead: a second start with the same sweep folder marks the trials
an interruption left RUNNING as failed, runs only the trials still missing, numbers the new trial
folders after the existing ones, and refuses a study of another method, cell or budget. At the end
it writes the best trial as a method variant (best/method/<method>_best.yaml, passed back with
hydra.searchpath) and every trial's row (trials.csv).
"""

from __future__ import annotations

import csv
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from gam_rl.config_fields import setting

log = logging.getLogger("gam_rl")

# the cells the methods table reports (docs/measurements.md): never tuned on
REPORT_CELLS = (("10001011111000", "1001111", 1234), ("1000101000101", "Mv1001111", 4444))
PENALTY_GAP_CAP = 10.0  # g is clipped to [0, this]: a trial far worse than r is not worth more than this
# the penalty's form, stored with a study: a resumed study refuses trials scored by another form. Studies made
# before the form was stored (up to 916f8a2) used the larger of g and s, which ties every trial that misses the
# motif bar by far (s ~ 1 for all): the sum orders them by the CE gap as well
OBJECTIVE = "B(1+g+s)"
OBJECTIVE_BEFORE = "B(1+max(g,s))"  # what a study without the attribute was scored by


@dataclass
class TuneConfig:
    """The tuning sweep's settings beyond the sweeper's (conf/hparams_search/common/study.yaml)."""

    method: str | None = None  # the method file the study tunes (an hparams_search file sets it)
    budget_draws: float | None = setting(None, gt=0)  # a trial's draw cap B: the scale of the penalty
    # a trial counts as on the line only if pi writes the motif in at least this share of its samples (Table 1's
    # bar, 0.9): the CE(V) line alone let a distillation of 1000 samples pass with a motif frequency of 0.65
    min_motif_freq: float = setting(0.0, ge=0, le=1)
    # a new study's first trial is the method's schedule as configured (the profile's values of the searched
    # keys that lie in the search space), so that the best trial is at least as good as it on the tuning cell
    start_from_schedule: bool = True


def objective(results: dict, budget_draws: float | None, min_motif_freq: float = 0.0) -> float | None:
    """A trial's value (smaller is better): draws to the target line when pi also writes the motif in at least
    min_motif_freq of its samples, else the budget times (1 + the CE gap left, relative to r's, + the motif
    frequency's shortfall, relative to the bar); None when the run has no target line
    (method.target=true) or no results."""
    line, ce_pi, ce_r = results.get("t2_target_ce_valid"), results.get("ce_valid_pi"), results.get("ce_valid_r")
    if line is None or ce_pi is None or ce_r is None:
        return None
    motif = results.get("motif_freq_pi")
    motif = float(motif) if isinstance(motif, int | float) and math.isfinite(motif) else 0.0
    reached = results.get("t2_reached_target")
    if reached and motif >= min_motif_freq:
        return float(reached["samples"])
    drawn = float((results.get("samples") or {}).get("training2", 0))
    budget = max(float(budget_draws or 0.0), drawn)
    gap = (ce_pi - line) / (ce_r - line) if ce_r > line else PENALTY_GAP_CAP
    gap = min(max(gap, 0.0), PENALTY_GAP_CAP) if math.isfinite(gap) else PENALTY_GAP_CAP
    shortfall = max((min_motif_freq - motif) / min_motif_freq, 0.0) if min_motif_freq > 0 else 0.0
    return budget * (1.0 + gap + shortfall)  # B (1 + g + s)


# ---- the checks before a tuning sweep starts (cli.preflight) ---------------------------------------

def is_tuning(cfg: DictConfig) -> bool:
    """Whether a composed configuration (with its hydra section) runs a tuning sweep."""
    target = OmegaConf.select(cfg, "hydra.sweeper._target_", default="") or ""
    return target.endswith("TuneSweeper")


def search_space(params: dict[str, str]) -> tuple[dict[str, list[str]], list[str]]:
    """The values of every searched key that a check must see (a choice's options, an interval's two ends,
    a range's values), and the problems of the space itself (a key outside `method.`)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, RangeSweep

    parser, values, problems = OverridesParser.create(), {}, []
    for key, spec in params.items():
        if not key.startswith("method."):
            problems.append(f"{key}: a tuning sweep searches the method's own keys only "
                            "(method.<key>); the cell, the budget and the profile stay fixed")
            continue
        [override] = parser.parse_overrides([f"{key}={spec}"])
        sweep = override.value()
        if isinstance(sweep, IntervalSweep):  # Optuna draws ints only from int(interval(a, b)): floats are checked
            values[key] = [str(sweep.start), str(sweep.end)]
        elif isinstance(sweep, ChoiceSweep | RangeSweep):
            values[key] = list(override.sweep_string_iterator())
        else:
            values[key] = [str(spec)]
    return values, problems


def corner_jobs(values: dict[str, list[str]], overrides: list[str]) -> list[list[str]]:
    """The jobs that check a search space: every key at its first value, then each other value of one key at
    a time (each end of each interval, each choice) with the rest at their first; the command line last."""
    base = {k: v[0] for k, v in values.items()}
    jobs = [[*(f"{k}={v}" for k, v in base.items()), *overrides]]
    for key, options in values.items():
        for option in options[1:]:
            jobs.append([*(f"{k}={option if k == key else v}" for k, v in base.items()), *overrides])
    return jobs


def tuning_problems(cfg: DictConfig, job: dict) -> list[str]:
    """What one job of a tuning sweep must hold besides its own checks: `cfg` is its composition (with the
    hydra section), `job` its resolved configuration (the command line applied)."""
    out = []
    method_choice = OmegaConf.select(cfg, "hydra.runtime.choices.method")
    tune = job.get("tune") or {}
    if tune.get("method") is not None and method_choice != tune["method"]:
        out.append(f"method={method_choice}: this study (hparams_search, tune.method) tunes method={tune['method']}; "
                   f"run multirun_scripts/tune.sh method={method_choice} for a study of {method_choice}")
    cell = (str((job.get("motif") or {}).get("pattern")), str((job.get("features") or {}).get("name")),
            job.get("seed"))
    if cell in REPORT_CELLS:
        out.append(f"motif={cell[0]} features={cell[1]} seed={cell[2]}: a report cell (docs/measurements.md); "
                   "tune on another cell (conf/hparams_search/common/study.yaml names the tuning cell)")
    if tune.get("budget_draws") is None:
        out.append("tune.budget_draws: a tuning trial needs a draw budget (the penalty's scale and the trial cap)")
    if not OmegaConf.select(cfg, "hydra.sweeper.storage"):
        out.append("hydra.sweeper.storage: a tuning study is stored (sqlite:///<sweep folder>/study.db) so that it "
                   "resumes; set it")
    if (job.get("method") or {}).get("target", "gam") != "gam":
        out.append("method.target: a tuning trial is judged on the target line of p_lambda; keep method.target=gam")
    return out


# ---- the resumable sweeper (hydra_plugins/gam_rl_launcher/tune_sweeper.py wraps it) -----------------

def study_attrs(config: DictConfig) -> dict[str, Any]:
    """What a study is of: a resumed study must agree on every one."""
    choices = config.hydra.runtime.choices
    return {"method": str(choices.get("method")), "motif": str(config.motif.pattern),
            "features": str(config.features.name), "dataset_size": int(config.dataset_size.size),
            "seed": int(config.seed), "profile": str(config.profile),
            "budget_draws": float(config.tune.budget_draws), "min_motif_freq": float(config.tune.min_motif_freq),
            "objective": OBJECTIVE}


def _impl_class():
    from hydra_plugins.hydra_optuna_sweeper._impl import OptunaSweeperImpl

    class TuneSweeperImpl(OptunaSweeperImpl):
        """OptunaSweeperImpl whose n_trials is the study's total: see the module's docstring."""

        def sweep(self, arguments: list[str]) -> None:
            import optuna

            total = self.n_trials
            sweep_dir = Path(str(self.config.hydra.sweep.dir))
            sweep_dir.mkdir(parents=True, exist_ok=True)
            attrs = study_attrs(self.config)
            study = optuna.create_study(study_name=self.study_name, storage=self.storage,
                                        directions=self._get_directions(), load_if_exists=True)
            if study.trials:
                held = {"objective": OBJECTIVE_BEFORE, **study.user_attrs}
                wrong = [f"{k}: the study holds {held.get(k)!r}, this sweep has {v!r}"
                         for k, v in attrs.items() if held.get(k) != v]
                if wrong:
                    raise ValueError(f"{self.storage} (study {self.study_name}) is a study of another setting: "
                                     + "; ".join(wrong) + ". Choose another hydra.sweep.dir for a new study")
            for key, value in attrs.items():
                study.set_user_attr(key, value)
            stale = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
            for trial in stale:  # an interrupted sweep's trials: their runs say interrupted; they count as failed
                study._storage.set_trial_state(trial._trial_id, optuna.trial.TrialState.FAIL)
            finished = len(study.trials)
            if stale:
                log.info("tune: %d trial(s) left running by an interruption are marked failed", len(stale))
            sampler = self.config.hydra.sweeper.get("sampler")
            if finished and sampler is not None and sampler.get("seed") is not None and not sampler.get("_partial_"):
                # a seeded sampler started afresh would propose the first trials' values again: seed it on
                from hydra.utils import instantiate

                self.sampler = instantiate(sampler, seed=int(sampler.seed) + finished)
            if not study.trials and self.config.tune.start_from_schedule:
                self._enqueue_schedule(study, arguments)
            self.n_trials = max(0, total - finished)
            self.job_idx = finished  # trial folders trial_<k>: k continues the study's numbering
            log.info("tune: study %s has %d of %d trials; %d to run", self.study_name, finished, total, self.n_trials)
            if self.n_trials:
                try:
                    super().sweep(arguments)
                except ValueError as err:  # best_trial of a study without one complete trial
                    if "No trials are completed" not in str(err):
                        raise
            write_best(optuna.load_study(study_name=self.study_name, storage=self.storage), sweep_dir, attrs)

        def _enqueue_schedule(self, study, arguments: list[str]) -> None:
            """Trial 0: the configured values of the searched keys (each one that its distribution holds)."""
            start, outside = configured_start(self.config, self._parse_sweeper_params_config() + list(arguments))
            if start:
                study.enqueue_trial(start)
                log.info("tune: trial 0 is the configured schedule: %s%s", start,
                         f" (outside the space, so sampled: {', '.join(outside)})" if outside else "")

    return TuneSweeperImpl


def configured_start(config: DictConfig, space: list[str]) -> tuple[dict[str, Any], list[str]]:
    """The configured value of every key of a search space (`key=spec` overrides, as the Optuna sweeper reads
    them) that its distribution holds, and `key=value` for each one it does not."""
    from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

    distributions, _ = create_params_from_overrides(space)
    start, outside = {}, []
    for key, distribution in distributions.items():
        value = OmegaConf.select(config, key)
        try:
            inside = value is not None and distribution._contains(distribution.to_internal_repr(value))
        except (ValueError, TypeError):
            inside = False
        if inside:
            start[key] = value
        else:
            outside.append(f"{key}={value}")
    return start, outside


def write_best(study, sweep_dir: Path, attrs: dict) -> Path | None:
    """trials.csv (one row per trial) and, when a trial completed, the best one as a method variant
    best/method/<method>_best.yaml with its value and trial number in the header; returns its path."""
    import optuna

    keys = sorted({k for t in study.trials for k in t.params})
    with open(sweep_dir / "trials.csv", "w", newline="") as out:
        rows = csv.writer(out)
        rows.writerow(["number", "state", "value", "seconds", *keys])
        for t in study.trials:
            seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else ""
            rows.writerow([t.number, t.state.name, "" if t.value is None else t.value, seconds,
                           *(t.params.get(k, "") for k in keys)])
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        log.warning("tune: no trial of study %s completed: no best configuration to write", study.study_name)
        return None
    best = min(complete, key=lambda t: t.value)
    method = attrs["method"]
    path = sweep_dir / "best" / "method" / f"{method}_best.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    header = [f"# {method}_best: trial {best.number} of study {study.study_name} ({len(study.trials)} trials, "
              f"{len(complete)} complete)",
              f"# on motif={attrs['motif']} features={attrs['features']} seed={attrs['seed']} "
              f"dataset_size={attrs['dataset_size']} profile={attrs['profile']}, "
              f"budget {attrs['budget_draws']:g} draws;",
              f"# objective {best.value:.6g} (draws to the target line; above the budget: not reached).",
              f"# Use: gam-rl method={method}_best "
              f"'hydra.searchpath=[file://{(sweep_dir / 'best').resolve()}]' ...",
              "# or copy this file into conf/method/ (where <method>_tuned.yaml is the project's study's best)."]
    path.write_text(variant_yaml(method, best.params, header))
    log.info("tune: best trial %d (objective %.6g): %s", best.number, best.value, path)
    return path


def variant_yaml(method: str, params: dict[str, Any], header: list[str]) -> str:
    """A method variant's file: `header` (comment lines), then defaults [/method/<method>, _self_] and the
    searched keys' values on top (method.mle.lr -> mle: {lr: ...}, as the method's schema nests it)."""
    variant = OmegaConf.create({"defaults": [f"/method/{method}@_here_", "_self_"]})
    for key, value in sorted(params.items()):
        OmegaConf.update(variant, key.removeprefix("method."), value, force_add=True)
    return "\n".join(header) + "\n" + OmegaConf.to_yaml(variant)


# ---- python -m gam_rl.tuning STUDY_DIR: a study's trials as a table ----------------------------------

def trials_table(study_dir: Path) -> str:
    """One markdown row per trial of a study folder (trials.csv and each trial's results.json): its state,
    objective, draws and seconds to the line, what stopped it, CE(V, pi) and pi's motif frequency, and the
    searched values (not the test set: a study is judged on V alone)."""
    import json

    with open(study_dir / "trials.csv", newline="") as rows:
        trials = list(csv.DictReader(rows))
    keys = [k for k in (trials[0] if trials else {}) if k.startswith("method.")]
    head = ["trial", "state", "objective", "draws to line", "s to line", "stopped by", "CE(V,pi)", "mtf pi",
            *(k.removeprefix("method.") for k in keys)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for trial in trials:
        path = study_dir / f"trial_{trial['number']}" / "results.json"
        run = json.loads(path.read_text()) if path.exists() else {}
        reached = run.get("t2_reached_target") or {}

        def num(value, fmt):
            return format(value, fmt) if isinstance(value, int | float) else "-"

        value = float(trial["value"]) if trial["value"] else None
        cells = [trial["number"], trial["state"], num(value, ",.0f"), num(reached.get("samples"), ",d"),
                 num(reached.get("seconds"), ".0f"), run.get("t2_stopped_by") or "-",
                 num(run.get("ce_valid_pi"), ".4f"), num(run.get("motif_freq_pi"), ".3f"),
                 *(_short(trial[k]) for k in keys)]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def _short(value: str) -> str:
    try:
        number = float(value)
    except ValueError:
        return value
    return f"{number:.3g}" if not number.is_integer() else str(int(number))


def main(argv: list[str] | None = None) -> int:
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1 or args[0].startswith("-"):
        print("usage: python -m gam_rl.tuning STUDY_DIR  (a tuning study's trials as a markdown table)",
              file=sys.stderr)
        return 2
    study_dir = Path(args[0])
    if not (study_dir / "trials.csv").exists():
        print(f"{study_dir}: no trials.csv (a study writes it when it ends; run tune.sh again to finish it)",
              file=sys.stderr)
        return 2
    print(trials_table(study_dir))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
