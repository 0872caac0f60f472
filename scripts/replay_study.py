"""Replay a tuning study's sampler to recover its trials' values to the last digit, without running a trial.

A study (multirun_scripts/tune.sh, docs/tuning.md) proposes its trials with TPE seeded 0 (4 random trials, then
TPE), two trials asked at a time, trial 0 the method's schedule. Given the search space as it was, trial 0's
values and every trial's objective in order, the sampler proposes the same values again: the random trials
depend on the seed alone, and TPE's on the values and on the order of the objectives. So a study whose folder
is lost can be recovered from its table in docs/measurements.md, and the best trial written back as a variant.

STUDIES records each study behind a `<method>_tuned` variant in conf/method/: the space (hparams_search's
params at the study's commit, in the sweeper's order), trial 0 and the objectives. tests/test_tuning.py checks
that each committed variant is its study's replayed best, and that the replay gives dpg_off_planted's lr (in
conf/tuned/cpu/, copied from its study's folder) and every value of pcl's 8 trials (its study.db) to the last digit.

usage: python scripts/replay_study.py [--write] [METHOD ...]
  prints each study's trials (their values, 3 significant digits) and its best; --write writes
  conf/method/<method>_tuned.yaml for each.
"""

from __future__ import annotations

import sys
from pathlib import Path

import optuna
from hydra_plugins.hydra_optuna_sweeper._impl import create_params_from_overrides

from gam_rl.tuning import variant_yaml

ROOT = Path(__file__).resolve().parents[1]
BUDGET = 3.0e6  # every study's draw cap B: an objective above it is a penalty (the line not reached)

# conf/hparams_search/common/weighted_draws.yaml (1e3e452)
WEIGHTED_DRAWS = {"method.lr": "tag(log, interval(3.0e-4, 1.0e-2))",
                  "method.proposal_batch": "choice(2000, 10000, 50000)",
                  "method.keep_per_draw": "choice(256, 2000)",
                  "method.steps_per_draw": "choice(4, 16, 48, 96, 192)",
                  "method.updates_per_epoch": "choice(240, 480)"}
WEIGHTED_START = {"method.lr": 0.002, "method.proposal_batch": 50000, "method.keep_per_draw": 256,
                  "method.steps_per_draw": 48, "method.updates_per_epoch": 240}
DPG_OFF_SPACE = {"method.lr": "tag(log, interval(1.0e-3, 3.0e-2))",
                 "method.proposal_batch": "choice(2000, 5000, 10000, 25000, 50000)",
                 "method.keep_per_draw": "choice(128, 256, 512, 1024, 2048)",
                 "method.steps_per_draw": "choice(48, 96, 192, 384)",
                 "method.updates_per_epoch": "choice(120, 240, 480)"}
DPG_OFF_START = {"method.lr": 0.002, "method.proposal_batch": 50000, "method.keep_per_draw": 256,
                 "method.steps_per_draw": 96, "method.updates_per_epoch": 240}

# method: (commit the study ran at, its space, trial 0's values, each trial's objective in trial order; None: failed)
STUDIES: dict[str, tuple[str, dict[str, str], dict, list[float | None]]] = {
    "dpg_off": ("16a5e78", DPG_OFF_SPACE, DPG_OFF_START,
                [1900000, 3038205, 125000, 3248855, 3021850, 3592667, 400000, 400000]),
    "dpg_off_planted": ("16a5e78", {**DPG_OFF_SPACE, "method.plant_motif": "choice(0.25, 0.5, 0.75)"},
                        {**DPG_OFF_START, "method.plant_motif": 0.5},
                        [2150000, 16000, 35000, 20000, 18000, 18000, 3140000, 500000]),
    "dpg_on": ("0ce7dc1", {"method.lr": "tag(log, interval(1.0e-3, 3.0e-2))",
                           "method.minibatch": "choice(256, 500, 1000)",
                           "method.updates_per_epoch": "choice(120, 240, 480, 960)",
                           "method.normalise": "choice(none, running_z)"},
               {"method.lr": 0.002, "method.minibatch": 256, "method.updates_per_epoch": 240,
                "method.normalise": "running_z"},
               [3059078, 3000000, 3000000, 3113452, 2500000, 2500000, 3037064, 3047384]),
    "distill": ("0ce7dc1", {"method.size": "choice(1000, 2500, 5000)",
                            "method.mle.lr": "tag(log, interval(3.0e-4, 3.0e-3))",
                            "method.mle.batch_size": "choice(50, 100, 250)", "method.init": "choice(fresh, r)"},
                {"method.size": 5000, "method.mle.lr": 0.001, "method.mle.batch_size": 100, "method.init": "r"},
                [1960000, 1060000, 1060000, 1960000, 5735333, 5749333, 1060000, 1060000]),
    "distill_qrs": ("0ce7dc1", {"method.max_tv": "tag(log, interval(0.002, 0.05))",
                                "method.size": "choice(1000, 2500, 5000)",
                                "method.mle.lr": "tag(log, interval(3.0e-4, 3.0e-3))",
                                "method.init": "choice(fresh, r)"},
                    {"method.max_tv": 0.01, "method.size": 5000, "method.mle.lr": 0.001, "method.init": "r"},
                    [1960000, 3664000, 4166667, 2060000, 3760000, 3629333, 1760000, 1760000]),
    "kl_control": ("1e3e452", {**WEIGHTED_DRAWS, "method.baseline": "choice(true, false)"},
                   {**WEIGHTED_START, "method.baseline": True},
                   [6000000, 6000000, 5991333, 6000000, 5991333, 5990667, 6000000, 6000000]),
    "fdpg_tv": ("1e3e452", {**WEIGHTED_DRAWS, "method.baseline": "choice(true, false)",
                            "method.plant_motif": "choice(0.0, 0.75)"},
                {**WEIGHTED_START, "method.baseline": True, "method.plant_motif": 0.0}, [6000000] * 8),
    "fdpg_rkl": ("f673346", {**WEIGHTED_DRAWS, "method.baseline": "choice(true, false)",
                             "method.plant_motif": "choice(0.0, 0.75)"},
                 {**WEIGHTED_START, "method.baseline": True, "method.plant_motif": 0.0},
                 [8988667, 8986667, 8990000, 8988000, 7802324, 8902547, 8256342, 8028540]),
    "fdpg_js": ("f673346", {**WEIGHTED_DRAWS, "method.baseline": "choice(true, false)",
                            "method.plant_motif": "choice(0.0, 0.75)"},
                {**WEIGHTED_START, "method.baseline": True, "method.plant_motif": 0.0},
                [8988000, 8983333, 8987333, 8988000, 8983333, 8992000, 8984000, 8984000]),
    "pg": ("f673346", dict(WEIGHTED_DRAWS), dict(WEIGHTED_START),
           [8988000, 8984000, 8984000, 8984000, 8984000, 8984000, 8988000, 8988000]),
    "ppo_dpg": ("ba838bb", {"method.lr": "tag(log, interval(2.0e-4, 5.0e-3))",
                            "method.proposal_batch": "choice(1000, 2000, 4000)",
                            "method.minibatch": "choice(250, 500, 1000)", "method.ppo_epochs": "choice(1, 2, 4)",
                            "method.ppo_clip": "interval(0.1, 0.3)",
                            "method.target_kl": "tag(log, interval(0.005, 0.05))",
                            "method.normalise": "choice(draw_z, running_z)"},
                {"method.lr": 1e-3, "method.proposal_batch": 2000, "method.minibatch": 500, "method.ppo_epochs": 4,
                 "method.ppo_clip": 0.2, "method.target_kl": 0.01, "method.normalise": "draw_z"},
                [750000, 3072216, 5563141, 3039872, 1000000, 3084147, 1100000, 800000]),
    "subtb": ("ba838bb", {"method.lr": "tag(log, interval(3.0e-4, 8.0e-3))",
                          "method.critic_lr": "tag(log, interval(1.0e-3, 3.0e-2))",
                          "method.subtb_lambda": "interval(0.8, 1.0)", "method.data_share": "choice(0.0, 0.1, 0.25)",
                          "method.on_policy": "choice(true, false)"},
              {"method.lr": 3e-3, "method.critic_lr": 1e-2, "method.subtb_lambda": 1.0, "method.data_share": 0.0,
               "method.on_policy": True},
              [8987050, 8461781, 8295588, 8583569, 8387204, 8309055, 8941868, 8951245]),
    "ac_dpg": ("b40369f", {"method.lr": "tag(log, interval(3.0e-4, 5.0e-3))",
                           "method.critic_lr": "tag(log, interval(1.0e-3, 3.0e-2))",
                           "method.critic_warmup": "choice(50, 100, 400)", "method.critic_target": "choice(mc, td)",
                           "method.on_policy": "choice(true, false)"},
               {"method.lr": 0.002, "method.critic_lr": 0.01, "method.critic_warmup": 100,
                "method.critic_target": "mc", "method.on_policy": False},
               [8986000.0, 8982000.0, 8982000.0, 8985333.333333334, 8982000.0, 8966667.565002741,
                8987333.333333332, 8987333.333333332]),
    "pcl": ("b40369f", {"method.lr": "tag(log, interval(1.0e-4, 3.0e-3))",
                        "method.critic_lr": "tag(log, interval(1.0e-3, 3.0e-2))",
                        "method.critic_warmup": "choice(100, 200, 400)", "method.horizon": "choice(0, 8, 16)",
                        "method.data_share": "choice(0.0, 0.1, 0.25)", "method.on_policy": "choice(true, false)"},
            {"method.lr": 0.0003, "method.critic_lr": 0.01, "method.critic_warmup": 200, "method.horizon": 0,
             "method.data_share": 0.0, "method.on_policy": False},
            [8992000.0, 8987333.333333332, 8982000.0, 6956707.074897878, 8638188.665430726, 8588024.451597815,
             4676860.999540432, 8458456.952631984]),
}
# where the replay and the study's table in docs/measurements.md differ (none before the best trial)
DIFFERS = {"kl_control": "but for trial 7's steps_per_draw: the table 96, the replay 192"}
# the studies whose best is the cpu profile's schedule in conf/tuned/cpu/ (no <method>_tuned variant)
IN_PROFILE = {"dpg_off_planted"}


def replay(space: dict[str, str], start: dict, values: list[float | None], seed: int = 0,
           startup: int = 4, at_once: int = 2) -> list[dict]:
    """Each trial's values as the study proposed them: conf/hparams_search/common/study.yaml's sampler
    (TPESampler(seed, n_startup_trials=startup)), `at_once` trials asked before the batch's objectives are
    told (the sweeper's n_jobs), trial 0 enqueued, the keys suggested in the space's order."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    distributions, _ = create_params_from_overrides([f"{k}={v}" for k, v in space.items()])
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup))
    study.enqueue_trial(start)
    trials: list[dict] = []
    while len(trials) < len(values):
        batch = [study.ask() for _ in range(min(at_once, len(values) - len(trials)))]
        for trial in batch:
            for name, distribution in distributions.items():
                trial._suggest(name, distribution)  # as the sweeper's _configure_trials does
            trials.append(dict(trial.params))
        for trial in batch:
            value = values[trial.number]
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                study.tell(trial, value)
    return trials


def best_number(values: list[float | None]) -> int:
    """The best trial: the first of the smallest objective among those that did not fail, as write_best picks it."""
    return min((k for k, v in enumerate(values) if v is not None), key=lambda k: values[k])


def best(method: str) -> tuple[int, dict]:
    """The study's best trial and its values."""
    _, space, start, values = STUDIES[method]
    number = best_number(values)
    return number, replay(space, start, values)[number]


def variant_text(method: str) -> str:
    """conf/method/<method>_tuned.yaml: the study's best trial as a method variant."""
    commit, _, _, values = STUDIES[method]
    number, params = best(method)
    value = values[number]
    what = (f"{value:,.0f} draws to the target line" if value <= BUDGET
            else f"{value:,.0f}, the penalty of a trial that did not reach the line")
    header = [f"# {method}, tuned: trial {number} of its tuning study (multirun_scripts/tune.sh method={method}",
              f"# at {commit}, {len(values)} trials; docs/tuning.md) on the tuning cell motif=1011100111001",
              "# features=1001111 seed=7 dataset_size=500 profile=cpu, budget 3M draws;",
              f"# objective {what}.",
              "# The values are that trial's to the last digit, replayed from the study's seeded sampler",
              "# (scripts/replay_study.py), whose replay gives the study's table in docs/measurements.md"
              + (f" ({DIFFERS[method]})." if method in DIFFERS else "."),
              f"# Use: gam-rl method={method}_tuned ... (on the cpu profile, where it was tuned)."]
    return variant_yaml(method, params, header)


def main(argv: list[str]) -> int:
    write = "--write" in argv
    names = [a for a in argv if a != "--write"] or list(STUDIES)
    unknown = [n for n in names if n not in STUDIES]
    if unknown:
        print(f"replay_study: no recorded study for {', '.join(unknown)} (recorded: {', '.join(STUDIES)})",
              file=sys.stderr)
        return 2
    for method in names:
        commit, space, start, values = STUDIES[method]
        print(f"== {method} (at {commit}): best trial {best_number(values)}")
        for k, params in enumerate(replay(space, start, values)):
            shown = {key.removeprefix("method."): float(f"{v:.3g}") if isinstance(v, float) else v
                     for key, v in params.items()}
            print(f"  {k}  {values[k]!s:>9}  {shown}")
        if write and method not in IN_PROFILE:
            path = ROOT / "conf" / "method" / f"{method}_tuned.yaml"
            path.write_text(variant_text(method))
            print(f"  wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
