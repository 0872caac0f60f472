"""Tuning sweeps (gam_rl/tuning.py, conf/hparams_search/, multirun_scripts/tune.sh): the objective, the
checks before a study starts, and a study that runs, resumes after an interruption and writes its best."""

import csv
import math
import sqlite3
import subprocess
from pathlib import Path

import optuna
import pytest
import yaml

from gam_rl import tuning
from gam_rl.cli import check_command_line
from tests.test_cli import ROOT, gam_rl

HPARAMS = sorted(p.stem for p in (ROOT / "conf" / "hparams_search").glob("*.yaml"))


def results(reached=None, ce_pi=0.60, line=0.50, ce_r=0.70, drawn=1_000_000, motif=0.95):
    return {"t2_reached_target": reached, "ce_valid_pi": ce_pi, "t2_target_ce_valid": line, "ce_valid_r": ce_r,
            "samples": {"training2": drawn}, "motif_freq_pi": motif}


def test_the_objective_is_draws_to_the_line_else_the_budget_times_one_plus_the_gap_and_shortfall_left():
    assert tuning.objective(results(reached={"samples": 250_000}, ce_pi=0.49), 3e6) == 250_000
    # not reached: B (1 + g), g = (0.60 - 0.50) / (0.70 - 0.50) = 0.5
    assert tuning.objective(results(), 3e6) == pytest.approx(4.5e6)
    # a run that drew past the budget (at most one check) is scaled by what it drew
    assert tuning.objective(results(drawn=4_000_000), 3e6) == pytest.approx(6e6)
    # worse than r: g clipped at PENALTY_GAP_CAP; not finite: the cap too
    assert tuning.objective(results(ce_pi=50.0), 3e6) == pytest.approx(3e6 * (1 + tuning.PENALTY_GAP_CAP))
    assert tuning.objective(results(ce_pi=math.inf), 3e6) == pytest.approx(3e6 * (1 + tuning.PENALTY_GAP_CAP))
    # every trial that missed the line ranks behind every trial that reached it within the budget
    assert tuning.objective(results(ce_pi=0.5001), 3e6) > tuning.objective(results(reached={"samples": 3e6}), 3e6)
    assert tuning.objective(results(line=None), 3e6) is None  # no target line (method.target=true)
    # on the line with pi's motif frequency under the bar: not reached; the shortfall s adds to g
    on_line = {"reached": {"samples": 460_000}, "ce_pi": 0.49}
    assert tuning.objective(results(**on_line, motif=0.65), 3e6, 0.9) == pytest.approx(3e6 * (1 + 0.25 / 0.9))
    assert tuning.objective(results(**on_line, motif=0.95), 3e6, 0.9) == 460_000
    assert tuning.objective(results(motif=0.0), 3e6, 0.9) == pytest.approx(3e6 * 2.5)  # gap 0.5 + shortfall 1
    # trials that all miss the motif bar by far are still ordered by the CE gap they left (and the reverse)
    assert (tuning.objective(results(motif=0.003, ce_pi=0.68), 3e6, 0.9)
            < tuning.objective(results(motif=0.004, ce_pi=0.686), 3e6, 0.9))
    assert tuning.objective(results(motif=0.5), 3e6, 0.9) < tuning.objective(results(motif=0.4), 3e6, 0.9)
    assert tuning.objective(results(motif=0.99, ce_pi=0.6), 3e6, 0.9) == pytest.approx(4.5e6)  # over the bar: s = 0
    assert tuning.objective(results(**on_line, motif=None), 3e6, 0.9) == pytest.approx(6e6)  # no samples of pi


def test_a_search_space_is_checked_at_each_end_of_each_interval_and_each_choice():
    values, problems = tuning.search_space({"method.lr": "tag(log, interval(1e-4, 1e-2))",
                                            "method.minibatch": "choice(250, 500)",
                                            "method.ppo_epochs": "int(interval(1, 4))", "method.clip": "interval(1, 4)",
                                            "seed": "choice(1, 2)"})
    # an interval draws floats unless cast (as Optuna's sampler does): a float end of an int key fails the check
    assert values == {"method.lr": ["0.0001", "0.01"], "method.minibatch": ["250", "500"],
                      "method.ppo_epochs": ["1", "4"], "method.clip": ["1.0", "4.0"]}
    assert len(problems) == 1 and problems[0].startswith("seed: a tuning sweep searches")
    jobs = tuning.corner_jobs(values, ["profile=toy"])
    assert jobs[0] == ["method.lr=0.0001", "method.minibatch=250", "method.ppo_epochs=1", "method.clip=1.0",
                       "profile=toy"]
    assert len(jobs) == 5
    assert ["method.lr=0.01", "method.minibatch=250", "method.ppo_epochs=1", "method.clip=1.0", "profile=toy"] in jobs


@pytest.mark.parametrize("method", HPARAMS)
def test_every_methods_search_space_passes_the_checks_at_its_corners(method):
    args, problems = check_command_line([f"hparams_search={method}"])
    assert problems == []


def test_a_tuning_study_refuses_report_cells_other_methods_and_keys_it_does_not_own(tmp_path):
    _, problems = check_command_line(["hparams_search=dpg_off", "motif=10001011111000", "seed=1234"])
    assert any("a report cell" in p and "motif=10001011111000 features=1001111 seed=1234" in p for p in problems)
    _, problems = check_command_line(["hparams_search=dpg_off", "method=ppo_dpg"])
    assert any(p.startswith("method=ppo_dpg: this study (hparams_search, tune.method) tunes method=dpg_off")
               for p in problems)
    # a search space on the command line (Optuna's sweeper reads key=choice(...) / interval(...) there too)
    _, problems = check_command_line(["hparams_search=dpg_off", "seed=choice(1,2)", "method.lr=interval(-1, 0.1)"])
    assert any(p.startswith("seed: a tuning sweep searches the method's own keys") for p in problems)
    # the bad end of the interval is named with the values it was checked at
    assert any(p.startswith("method.lr=-1.0: must be > 0 (with method.lr=-1.0") for p in problems)
    _, problems = check_command_line(["hparams_search=dpg_off", "hydra.sweeper.storage=null"])
    assert any(p.startswith("hydra.sweeper.storage: a tuning study is stored") for p in problems)


def trial_values(study_dir: Path) -> list[dict]:
    with open(study_dir / "trials.csv") as rows:
        return list(csv.DictReader(rows))


@pytest.mark.slow
def test_a_study_runs_resumes_after_an_interruption_and_writes_its_best_as_a_variant(tmp_path):
    """The toy, two trials of two draws' worth each; then an interruption's left-over trial (RUNNING in the
    study) and a second start asking for four in all: the left-over counts as failed, one trial runs (its
    folder numbered after the study's trials, its values new), and the best is a variant gam-rl runs."""
    study_dir = tmp_path / "tune" / "dpg_off"
    common = ["hparams_search=dpg_off", "method=dpg_off", "profile=toy", "motif=10011", "launcher=basic",
              "tune.budget_draws=4000", "method.proposal_batch=choice(1000,2000)", "method.max_epochs=3",
              "hydra.sweeper.sampler.n_startup_trials=2", f"hydra.sweep.dir={study_dir}"]
    gam_rl(*common, "hydra.sweeper.n_trials=2", tmp_path=tmp_path)
    storage = f"sqlite:///{study_dir / 'study.db'}"
    study = optuna.load_study(study_name="dpg_off", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    assert sorted(p.name for p in study_dir.glob("trial_*")) == ["trial_0", "trial_1"]
    assert study.user_attrs["budget_draws"] == 4000 and study.user_attrs["profile"] == "toy"
    # trial 0 is the toy schedule where the space holds it (lr 3e-3); its other keys (outside) are sampled
    assert study.trials[0].params["method.lr"] == 0.003 and study.trials[1].params["method.lr"] != 0.003
    for trial in study.trials:  # the study's value is the trial's objective, from its own results.json
        run = yaml.safe_load((study_dir / f"trial_{trial.number}" / "results.json").read_text())
        assert trial.value == pytest.approx(tuning.objective(run, 4000, 0.9))
        assert run["status"] == "ok"

    study.ask()  # a trial an interruption left running (trial 2)
    resumed = gam_rl(*common, "hydra.sweeper.n_trials=4", tmp_path=tmp_path)
    assert "3 jobs: 1 ok, 2 from earlier starts, 0 failed, 0 missing" in resumed.stdout
    study = optuna.load_study(study_name="dpg_off", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]
    assert (study_dir / "trial_3" / "results.json").exists() and not (study_dir / "trial_2").exists()
    # the sampler was seeded on: the resumed trial does not repeat the first trials' values
    assert study.trials[3].params not in [t.params for t in study.trials[:2]]
    rows = trial_values(study_dir)
    assert [r["state"] for r in rows] == ["COMPLETE", "COMPLETE", "FAIL", "COMPLETE"]

    best_file = study_dir / "best" / "method" / "dpg_off_best.yaml"  # not conf/method's dpg_off_tuned: no shadowing
    best = min((t for t in study.trials if t.state.name == "COMPLETE"), key=lambda t: t.value)
    variant = yaml.safe_load(best_file.read_text())
    assert variant["defaults"] == ["/method/dpg_off@_here_", "_self_"]
    assert {f"method.{k}": v for k, v in variant.items() if k != "defaults"} == best.params
    # the variant is a method gam-rl takes back: named after its file, with the tuned values
    shown = gam_rl("method=dpg_off_best", "profile=toy", f"hydra.searchpath=[file://{best_file.parents[1]}]",
                   "--cfg", "job", "--resolve", tmp_path=tmp_path).stdout
    job = yaml.safe_load(shown)
    assert job["method"]["name"] == "dpg_off_best"
    assert all(job["method"][k.removeprefix("method.")] == v for k, v in best.params.items())

    # the same folder with another budget is another study: refused, nothing run
    again = gam_rl(*common, "hydra.sweeper.n_trials=5", "tune.budget_draws=8000", tmp_path=tmp_path, check=False)
    assert again.returncode == 2 and "budget_draws: the study holds 4000.0, this sweep has 8000.0" in again.stderr
    assert len(optuna.load_study(study_name="dpg_off", storage=storage).trials) == 4
    # a study stored before its objective's form was (up to 916f8a2: the larger of gap and shortfall) is refused too
    with sqlite3.connect(study_dir / "study.db") as db:
        db.execute("DELETE FROM study_user_attributes WHERE key = 'objective'")
    again = gam_rl(*common, "hydra.sweeper.n_trials=5", tmp_path=tmp_path, check=False)
    assert again.returncode == 2 and (f"objective: the study holds {tuning.OBJECTIVE_BEFORE!r}, this sweep has "
                                      f"{tuning.OBJECTIVE!r}") in again.stderr
    assert len(optuna.load_study(study_name="dpg_off", storage=storage).trials) == 4


def test_tune_sh_needs_a_method_and_lists_the_search_spaces(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "multirun_scripts" / "tune.sh")], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage:" in proc.stderr
    assert all(f"  {m}" in proc.stderr for m in HPARAMS)


@pytest.mark.parametrize("method", HPARAMS)
def test_every_search_space_holds_the_cpu_schedule_so_trial_0_is_the_untuned_method(method):
    """A new study's trial 0 is the configured schedule (tune.start_from_schedule): the best trial is then never
    worse than the untuned method on the tuning cell. That holds only if the space holds every searched value."""
    from hydra import compose, initialize_config_module
    from hydra.core.hydra_config import HydraConfig

    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={method}"], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)
        space = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
        start, outside = tuning.configured_start(cfg, space)
    assert outside == [] and len(start) == len(space)


def sweeper_params(method: str) -> dict:
    from hydra import compose, initialize_config_module

    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=[f"hparams_search={method}"], return_hydra_config=True)
    return dict(cfg.hydra.sweeper.params)


def test_studies_whose_bests_are_compared_search_one_space_and_add_only_their_own_keys():
    """dpg_off_planted's best is compared with dpg_off's, and the f-DPG members', kl_control's and pg's with each
    other: each group searches one space (by reference, so it cannot drift) plus only the keys its method has."""
    dpg_off, planted = sweeper_params("dpg_off"), sweeper_params("dpg_off_planted")
    assert planted == {**dpg_off, "method.plant_motif": "choice(0.25, 0.5, 0.75)"}
    weighted = sweeper_params("pg")
    assert set(weighted) == {f"method.{k}" for k in
                             ("lr", "proposal_batch", "keep_per_draw", "steps_per_draw", "updates_per_epoch")}
    assert sweeper_params("kl_control") == {**weighted, "method.baseline": "choice(true, false)"}
    for member in ("fdpg_rkl", "fdpg_js", "fdpg_tv"):
        assert sweeper_params(member) == {**weighted, "method.baseline": "choice(true, false)",
                                          "method.plant_motif": "choice(0.0, 0.75)"}, member


def test_a_study_fixes_no_method_key_but_the_trial_caps_so_its_best_variant_is_the_trial():
    """The best variant (best/method/<method>_best.yaml) holds the searched keys and runs without the caps; a
    study file that also fixed another method key (a smaller validation set, say) would tune a schedule that
    the variant does not run."""
    caps = {"max_draws", "stop_at_target", "max_proposals"}
    for path in sorted((ROOT / "conf" / "hparams_search").rglob("*.yaml")):
        fixed = set((yaml.safe_load(path.read_text()) or {}).get("method", {}))
        assert fixed <= caps, f"{path.relative_to(ROOT)} fixes method keys {sorted(fixed - caps)}"


def test_the_trials_table_reads_each_trials_results(tmp_path, capsys):
    from gam_rl.files import atomic_write_json

    (tmp_path / "trials.csv").write_text("number,state,value,seconds,method.lr,method.minibatch\n"
                                         "0,COMPLETE,250000.0,12.5,0.002,256\n1,FAIL,,3.0,0.0004567,500\n")
    (tmp_path / "trial_0").mkdir()
    atomic_write_json(tmp_path / "trial_0" / "results.json",
                      {"t2_reached_target": {"samples": 250000, "seconds": 61.2}, "t2_stopped_by": "target",
                       "ce_valid_pi": 0.51234, "motif_freq_pi": 0.9412})
    assert tuning.main([str(tmp_path)]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0] == ("| trial | state | objective | draws to line | s to line | stopped by | CE(V,pi) | mtf pi | "
                       "lr | minibatch |")
    assert rows[2] == "| 0 | COMPLETE | 250,000 | 250,000 | 61 | target | 0.5123 | 0.941 | 0.002 | 256 |"
    assert rows[3] == "| 1 | FAIL | - | - | - | - | - | - | 0.000457 | 500 |"
    assert tuning.main([str(tmp_path / "nothing")]) == 2


def test_tune_sh_says_a_refused_configuration_ran_nothing(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "multirun_scripts" / "tune.sh"), "method=dpg_off", "seed=1234",
                           "motif=10001011111000"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "a report cell" in proc.stderr
    assert "the configuration was refused (above); nothing ran" in proc.stderr and not any(tmp_path.iterdir())


def test_tune_sh_dry_run_prints_the_plan_and_runs_nothing(tmp_path):
    proc = subprocess.run(["bash", str(ROOT / "multirun_scripts" / "tune.sh"), "method=ppo_dpg", "--dry-run"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "a tuning study of method=ppo_dpg" in proc.stdout and "budget   3e+06 draws per trial" in proc.stdout
    assert "search   method.ppo_clip=interval(0.1, 0.3)" in proc.stdout
    assert not any(tmp_path.iterdir())


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # create_trial, in optuna 2.10
def test_the_best_trial_of_nested_keys_is_a_variant_gam_rl_composes(tmp_path):
    """A searched key inside a section (distill's method.mle.lr) is written nested (mle: {lr: ...}), as the
    method's schema has it, and the variant passes the checks with the tuned values."""
    study = optuna.create_study()
    study.add_trial(optuna.trial.create_trial(
        params={"method.mle.lr": 0.0007, "method.size": 2000},
        distributions={"method.mle.lr": optuna.distributions.LogUniformDistribution(3e-4, 3e-3),
                       "method.size": optuna.distributions.CategoricalDistribution([1000, 2000])}, value=1.0))
    attrs = {"method": "distill", "motif": "10011", "features": "1001111", "seed": 7, "dataset_size": 500,
             "profile": "toy", "budget_draws": 3e6}
    path = tuning.write_best(study, tmp_path, attrs)
    variant = yaml.safe_load(path.read_text())
    assert variant["mle"] == {"lr": 0.0007} and variant["size"] == 2000
    args, problems = check_command_line(["method=distill_best", "profile=toy",
                                         f"hydra.searchpath=[file://{tmp_path / 'best'}]"])
    assert problems == []
    from tests.test_config import typed

    cfg = typed(["method=distill_best", "profile=toy", f"hydra.searchpath=[file://{tmp_path / 'best'}]"])
    assert (cfg.method.mle.lr, cfg.method.size) == (0.0007, 2000)


def _replay_study():
    import importlib.util

    spec = importlib.util.spec_from_file_location("replay_study", ROOT / "scripts" / "replay_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replaying_a_studys_sampler_gives_its_trials_to_the_last_digit():
    """dpg_off_planted's lr in conf/tuned/cpu/ was copied from its study's folder (16a5e78): the replay of that
    study from its table (space, trial 0, objectives) must give it bit for bit, and its TPE trials (4-7) too,
    at the table's 3 digits. Then the replay is the study's sampler, and the variants it wrote are the trials."""
    replay = _replay_study()
    commit, space, start, values = replay.STUDIES["dpg_off_planted"]
    trials = replay.replay(space, start, values)
    assert trials[0] == start
    profile = yaml.safe_load((ROOT / "conf" / "tuned" / "cpu" / "dpg_off_planted.yaml").read_text())
    assert trials[1] == {f"method.{k}": v for k, v in profile.items()}
    assert [round(t["method.lr"], 5) for t in trials[4:]] == [0.00332, 0.00313, 0.02992, 0.00723]
    number, best = replay.best("dpg_off_planted")
    assert number == 1 and best == trials[1]
    # a failed trial is told as failed (no value): TPE models the rest without it
    assert len(replay.replay(space, start, [1.0, None, 2.0, 3.0, 4.0, 5.0])) == 6


# pcl's study (b40369f) as its study.db holds it, by trial: (lr, critic_lr, critic_warmup, horizon, data_share,
# on_policy)
PCL_STUDY_TRIALS = [(0.0003, 0.01, 200, 0, 0.0, False),
                    (0.0006466422717414558, 0.011387317092169062, 100, 16, 0.0, False),
                    (0.002329262676497441, 0.0012732945242475175, 400, 16, 0.0, False),
                    (0.00016283591083632567, 0.024853670483449896, 100, 0, 0.1, False),
                    (0.00010716093154162977, 0.028616583411547013, 100, 8, 0.1, True),
                    (0.00011802908195416857, 0.02720984144238552, 100, 8, 0.1, True),
                    (0.00037912261110260154, 0.0025798089127317863, 200, 0, 0.25, False),
                    (0.0003699246374570817, 0.002822371625419568, 200, 0, 0.25, False)]


def test_the_replay_of_a_study_recorded_with_its_folder_gives_every_trial_of_its_study_db():
    """pcl's study was recorded with its folder at hand: from the record alone (space, trial 0, objectives) the
    replay must give every value of its 8 trials, 4 random and 4 of TPE, to the last digit."""
    replay = _replay_study()
    commit, space, start, values = replay.STUDIES["pcl"]
    keys = ["method.lr", "method.critic_lr", "method.critic_warmup", "method.horizon", "method.data_share",
            "method.on_policy"]
    assert list(space) == keys and len(values) == len(PCL_STUDY_TRIALS)
    assert replay.replay(space, start, values) == [dict(zip(keys, trial, strict=True)) for trial in PCL_STUDY_TRIALS]


def test_every_tuned_variant_in_conf_is_its_studys_replayed_best_and_composes():
    """conf/method/<method>_tuned.yaml: one per recorded study (but the one whose best is the cpu profile's own),
    each exactly what the replay writes, and each a method gam-rl runs on the cpu profile with the tuned values."""
    replay = _replay_study()
    variants = sorted(p.stem.removesuffix("_tuned") for p in (ROOT / "conf" / "method").glob("*_tuned.yaml"))
    assert variants == sorted(set(replay.STUDIES) - replay.IN_PROFILE)
    for method in variants:
        path = ROOT / "conf" / "method" / f"{method}_tuned.yaml"
        assert path.read_text() == replay.variant_text(method), f"{path.name}: run scripts/replay_study.py --write"
        args, problems = check_command_line([f"method={method}_tuned", "profile=cpu"])
        assert problems == [], (method, problems)
    from tests.test_config import typed

    cfg = typed(["method=dpg_off_tuned"])
    assert (cfg.method.name, cfg.method.proposal_batch, cfg.method.keep_per_draw) == ("dpg_off_tuned", 5000, 1024)
    assert cfg.method.lr == replay.best("dpg_off")[1]["method.lr"]

