"""The typed configuration: the card's config groups, the schema, and the command-line check."""

import itertools
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from gam_rl import schema
from gam_rl.cli import check_command_line, rewrite_axes
from gam_rl.data import valid_size_for
from gam_rl.features import mask_names
from gam_rl.process import MotifProcess

CONF = Path(__file__).resolve().parents[1] / "conf"
TABLE1 = {"motif": ["1000101000101", "1011100111001", "10001011111000"], "features": ["1001111", "Mv1001111"],
          "dataset_size": ["500", "1000", "5000", "10000", "20000"]}


def preflight(args: list[str]) -> list[str]:
    return check_command_line(args)[1]


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides=()):
    """The composed configuration, with Hydra's own section as in a job (a variant is named after its file)."""
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        return compose("config", overrides=rewrite_axes(list(overrides)), return_hydra_config=True)


def typed(overrides=()) -> schema.Config:
    return schema.load(make(overrides))


def test_every_method_profile_and_logger_composes_and_validates():
    groups = {g: group_options(g) for g in ("method", "profile")}
    assert set(groups["profile"]) >= {"paper", "cpu", "smoke"}
    assert set(groups["profile"]) >= {"paper", "cpu", "smoke", "toy"}
    tuned = {m for m in groups["method"] if m.endswith("_tuned")}  # studies' bests: tests/test_tuning.py
    assert set(groups["method"]) - tuned == {"distill", "distill_qrs", "dpg_off", "dpg_off_planted", "dpg_on", "pg",
                                             "dpg_true", "fdpg", "fdpg_rkl", "fdpg_js", "fdpg_tv", "kl_control",
                                             "pcl", "ac_dpg", "ppo_dpg", "subtb", "ctl"}
    groups["method"] = sorted(set(groups["method"]) - tuned)
    for method, profile in itertools.product(*groups.values()):
        cfg = typed([f"method={method}", f"profile={profile}"])
        # method=fdpg is named for its divergence (fdpg_kl unless method.divergence says otherwise)
        named = {"fdpg": "fdpg_kl", "ac_dpg": f"ac_dpg_{getattr(cfg.method, 'critic', '')}"}  # for a key's value
        assert cfg.method.name == named.get(method, method) and cfg.profile == profile
    for logger in group_options("logger"):
        assert typed([f"logger={logger}"]).logger.kind == logger


def test_the_table1_command_line_composes_each_value_from_its_file():
    cfg = typed(["motif=10001011111000", "features=Mv1001111", "dataset_size=5000", "seed=4444", "method=dpg_off"])
    assert (cfg.motif.pattern, cfg.features.name, cfg.dataset_size.size, cfg.seed) == ("10001011111000", "Mv1001111",
                                                                                         5000, 4444)
    for axis, values in TABLE1.items():
        for value in values:
            cfg = typed([f"{axis}={value}"])
            assert str(getattr(getattr(cfg, axis), {"motif": "pattern", "features": "name", "dataset_size": "size"}[
                axis])) == value
    assert set(TABLE1["motif"]) < set(group_options("motif")) and set(TABLE1["dataset_size"]) < set(
        group_options("dataset_size"))


def test_group_files_say_what_their_name_says():
    for name in TABLE1["features"]:  # a feature set's list is what its mask string selects
        assert OmegaConf.load(CONF / "features" / f"{name}.yaml").use == mask_names(name)
    for name in TABLE1["dataset_size"]:  # |V| by the paper's rule
        node = OmegaConf.load(CONF / "dataset_size" / f"{name}.yaml")
        assert node.size == int(name) and node.valid_size == valid_size_for(int(name))
    for name in TABLE1["motif"]:  # the count and H in each motif file's comment are exact
        text = (CONF / "motif" / f"{name}.yaml").read_text()
        process = MotifProcess(name, 30)
        assert OmegaConf.load(CONF / "motif" / f"{name}.yaml").pattern == name
        assert f"Exactly {process.num_strings} of" in text
        assert f"= {process.entropy_per_symbol:.4f} nats/symbol" in text


def test_off_grid_values_are_one_override_away():
    cfg = typed(["motif=1101", "features=0111111", "dataset_size=750"])
    assert cfg.motif.pattern == "1101" and cfg.features.name == "0111111" and cfg.features.use is None
    assert cfg.dataset_size.size == 750 and cfg.dataset_size.valid_size is None  # None: the paper's rule
    assert rewrite_axes(["dataset_size=750,1500"]) == ["dataset_size=custom", "dataset_size.size=750,1500"]
    assert rewrite_axes(["dataset_size=500,1000"]) == ["dataset_size='500','1000'"]
    own = typed(["features=custom", "features.name=mine", "features.use=[motif,submotif,absent:0000]"])
    assert own.features.use == ["motif", "submotif", "absent:0000"]
    assert preflight(["dataset_size=500,750"])[0].startswith("dataset_size=500,750: mixes")


def test_a_run_carries_only_the_keys_its_method_uses():
    distill = schema.record(typed(["method=distill"]))
    assert "replay" not in distill["method"] and distill["method"]["mle"]["lr_decays"] == 2  # the cpu profile's
    dpg = schema.record(typed(["method=dpg_off"]))
    assert "mle" not in dpg["method"] and dpg["method"]["replay"] == 32768
    assert not {"dpg", "distill", "feature_max_len"} & set(dpg)


@pytest.mark.parametrize("override, key", [
    ("motif=10a01", "motif.pattern"),  # not a file name: off-grid, then refused as bits
    ("motif=" + "1" * 31, "motif.pattern"),
    ("features=Xv1001111", "features.name"),
    ("features=100111", "features.name"),
    ("dataset_size=0", "dataset_size.size"),
    ("dataset_size=20001", "dataset_size.size"),
    ("seed=-1", "seed"),
    ("seed=abc", "seed"),
    ("model.hidden=0", "model.hidden"),
    ("model.dropout=1.5", "model.dropout"),
    ("r.lr=-1", "r.lr"),
    ("r.batch_size=2.5", "r.batch_size"),
    ("device=tpu", "device"),
    ("dataset_size.valid_size=5000", "dataset_size.valid_size"),
    ("method=distill method.size=-5", "method.size"),
    ("method=distill method.init=warm", "method.init"),
    ("method=distill method.mle.lr_decays=1.5", "method.mle.lr_decays"),
    ("method=distill method.mle.lr_decay_factor=1", "method.mle.lr_decay_factor"),
    ("method.minibatch=0", "method.minibatch"),
    ("method.proposal_batch=-1", "method.proposal_batch"),
    ("training1.estimator=mcmc", "training1.estimator"),
    ("method.algorithm=ppo", "method.algorithm"),
    ("method.target=other", "method.target"),
    ("method.init=warm", "method.init"),
    ("method.normalise=batch", "method.normalise"),
    ("method.swap_gate=always", "method.swap_gate"),
    ("method.baseline=3", "method.baseline"),
    ("method.keep_per_draw=0", "method.keep_per_draw"),
    ("method.target_margin=-0.1", "method.target_margin"),
    ("method.clip=0", "method.clip"),
    ("training1.reuse=forever", "training1.reuse"),
    ("training1.heldout=0", "training1.heldout"),
    ("z.rel_tol=-1", "z.rel_tol"),
    ("z.min_samples=0", "z.min_samples"),
    ("z.tail_hits=0", "z.tail_hits"),
    ("r.lr_decays=-1", "r.lr_decays"),
    ("r.lr_decay_factor=0", "r.lr_decay_factor"),
    ("max_len=30", "max_len"),  # n bits and EOS need n + 1 symbols
    ("method.replay=100", "method.replay"),  # smaller than a minibatch (256)
    ("method.swap_gate=kl_is method.keep_per_draw=16 method.minibatch=16 method.replay=0", "method.swap_gate"),
    ("method=dpg_true method.baseline=true", "method.baseline"),  # thinning + zeros of the true target
    ("method=ac_dpg method.critic=none", "method.critic"),  # the actor's advantage comes from the critic
    ("method=ac_dpg method.target=true", "method.target"),  # log P - log r must be finite
    ("method=ppo_dpg method.ppo_clip=1.5", "method.ppo_clip"),
    ("method=ctl method.positive_source=pool", "method.positive_source"),
    ("method=subtb method.subtb_lambda=0", "method.subtb_lambda"),
    ("method=subtb method.critic=none", "method.critic"),  # the log-flow is its own model
    ("method=pcl method.data_share=1", "method.data_share"),
    ("method.ema_decay=1.0", "method.ema_decay"),
    ("method.lr_warmup=-1", "method.lr_warmup"),
    ("method.plant_motif=1", "method.plant_motif"),  # planted draws alone miss the strings without the motif
    ("method=dpg_on method.plant_motif=0.5", "method.plant_motif"),  # on-policy: no proposal to mix into
    ("method=ppo_dpg method.plant_motif=0.5", "method.plant_motif"),  # reads per-symbol log q
    ("profile=paper method.keep_start=true", "method.keep_start"),  # a fresh pi has no CE(V, r) to keep
    ("resume=maybe", "resume"),
    ("training1.estimator=snis_mix", "training1.estimator"),  # needs a proposal run
    ("training1.proposal=/nonexistent/run", "training1.proposal"),  # read by snis_mix only
    ("training1.estimator=snis_mix training1.proposal=/nonexistent/run", "training1.proposal"),
    ("training1.estimator=snis_mix training1.proposal=. training1.mix_r=1", "training1.mix_r"),
    ("cache.training1=2", "cache.training1"),
    ("logger.mode=sometimes", "logger.mode"),
])
def test_bad_values_fail_before_any_work_and_name_their_key(override, key):
    problems = preflight(override.split())
    assert any(p.startswith(f"{key}=") for p in problems), problems


@pytest.mark.parametrize("override, problem", [
    ("+foo=1", "foo: unknown key"),
    ("+experiment=x", "experiment: unknown key"),
    ("dpg.lrr=0.1", "dpg.lrr: unknown key"),
    ("+method.lrr=0.1", "method.lrr: unknown key; did you mean method.lr?"),
    ("method.lrr=0.1", "method.lrr: unknown key; did you mean method.lr?"),
    ("dpg.minibatch=5", "dpg.minibatch: unknown key; did you mean method.minibatch?"),
    ("training1.samples_per_stp=5", "training1.samples_per_stp: unknown key; did you mean training1.samples_per_step?"),
    ("method=distill method.replay=0", "method.replay: not a key of this method"),
    # a method's schema holds only the keys it uses: PPO always samples pi, pcl weights nothing by Z-hat,
    # pg has no pi/q baseline, the twist learners keep pi with its value model (no average of pi alone)
    ("method=ppo_dpg method.on_policy=false", "method.on_policy: not a key of this method"),
    ("method=pcl method.normalise=draw_z", "method.normalise: not a key of this method"),
    ("method=pg method.baseline=true", "method.baseline: not a key of this method"),
    ("method=ac_dpg method.ema_decay=0.99", "method.ema_decay: not a key of this method"),
    ("method=ppo_dpg method.critic_warmup=5", "method.critic_warmup=5 with method.critic='none'"),
    ("method=dpg_of", "method=dpg_of: no such option; choose one of"),
    ("method=dpg_of", "did you mean method=dpg_off?"),
    ("profile=gpu", "profile=gpu: no such option"),
    ("training1.estimator=snis", "did you mean snis_r?"),
    # YAML reads an unquoted true as a boolean: the fix is to quote it, not another choice
    ("method=dpg_off method.target=true", "method.target=True: choose one of ['gam', 'true']; the command line reads "
                                          "true as a boolean: quote it, method.target='true'"),
])
def test_unknown_keys_and_options_are_refused_with_a_did_you_mean(override, problem):
    problems = preflight(override.split())
    assert any(problem in p for p in problems), problems


def test_all_problems_are_reported_together_and_every_job_of_a_sweep_is_checked():
    problems = preflight(["motif=12", "dataset_size=-5", "+foo=1", "method.lr=0"])
    assert len(problems) == 4, problems
    # a sweep: only the job whose value is bad is named, before any job runs
    problems = preflight(["-m", "method.lr=0.1,-1", "dataset_size=500,1000"])
    assert len(problems) == 1 and problems[0].startswith("method.lr=-1") and "(jobs #2, #3)" in problems[0]
    assert preflight(["-m", "sweep=table1", "motif=10001011111000", "features=1001111", "seed=1234"]) == []
    assert preflight(["--help"]) == []


def test_cpu_profile_per_size_budgets_reach_only_their_method_and_size():
    """conf/dataset_size/cpu/<method>/<|D|>.yaml: DPG_off's stop at |D| <= 1000 and r kept at |D| >= 10000,
    distillation's 2500 samples at |D| = 1000, nowhere else (other sizes, other methods of the family, the
    paper profile)."""
    def method(*overrides):
        return typed(list(overrides)).method

    assert method("method=dpg_off", "dataset_size=500").stop_within_noise == 1.0
    assert method("method=dpg_off", "dataset_size=1000").stop_within_noise == 1.0
    assert method("method=dpg_off", "dataset_size=5000").stop_within_noise is None
    # ... with its tilt test, 10000 draws of pi, 2 s.e. beyond a tolerance of 0.3 nats
    for size in (500, 1000):
        dpg = method("method=dpg_off", f"dataset_size={size}")
        assert (dpg.stop_tilt_samples, dpg.stop_tilt_z, dpg.stop_tilt_tolerance) == (10000, 2.0, 0.3), size
    assert method("method=dpg_off", "dataset_size=5000").stop_tilt_samples is None
    assert [method("method=dpg_off", f"dataset_size={size}").patience for size in (500, 1000, 5000)] == [5, 3, 3]
    assert method("method=dpg_on", "dataset_size=500").stop_within_noise is None
    assert method("profile=paper", "method=dpg_off", "dataset_size=500").stop_within_noise is None
    # r kept as check 0, at most 6 checks: |D| >= 10000 only
    for size, kept, checks in (("5000", False, 8), ("10000", True, 6), ("20000", True, 6)):
        dpg = method("method=dpg_off", f"dataset_size={size}")
        assert (dpg.keep_start, dpg.max_epochs) == (kept, checks), size
    # the checks measure the weights' moving average at |D| = 1000 and 5000 only
    assert [method("method=dpg_off", f"dataset_size={size}").ema_decay for size in (500, 1000, 5000, 10000)] == [
        None, 0.99, 0.99, None]
    assert method("method=fdpg", "dataset_size=5000").ema_decay is None
    # 96 updates per fresh draw for dpg_off at |D| <= 5000; the profile's 48 elsewhere and for the rest of the family
    assert [method("method=dpg_off", f"dataset_size={size}").steps_per_draw
            for size in (500, 1000, 5000, 10000, 20000)] == [96, 96, 96, 48, 48]
    assert method("method=dpg_on", "dataset_size=500").steps_per_draw == 48
    assert method("method=fdpg", "dataset_size=10000").steps_per_draw == 48
    assert not method("method=dpg_on", "dataset_size=20000").keep_start
    assert method("method=distill", "dataset_size=1000").size == 2500
    assert method("method=distill", "dataset_size=500").size == 5000
    assert method("method=distill_qrs", "dataset_size=1000").size == 5000
    # DPG_off towards the true process has no p_lambda to stop near: refused before any work, saying how
    problems = preflight(["method=dpg_off", "method.target='true'", "dataset_size=500"])
    assert any(p.startswith("method.stop_within_noise=1.0") and "stop_within_noise=null" in p for p in problems)
    # the tilt test is part of that stop: alone it is refused, naming both keys
    problems = preflight(["method=dpg_off", "dataset_size=5000", "method.stop_tilt_samples=5000"])
    assert any(p.startswith("method.stop_tilt_samples=5000 without method.stop_within_noise") for p in problems)


def test_dpg_off_planted_takes_its_tuned_cpu_schedule_over_dpg_offs_choices_at_each_size():
    """conf/tuned/cpu/dpg_off_planted.yaml comes after dpg_off's profile schedule and its choices at this |D|:
    its keys win (192 updates per draw over the 96 of dpg_off at |D| <= 5000), the rest of those choices stay
    (the stop near p_lambda at |D| = 500), the command line wins over it, and other profiles plant half."""
    def method(*overrides):
        return typed(["method=dpg_off_planted", *overrides]).method

    tuned = method("dataset_size=500")
    assert (tuned.name, tuned.plant_motif, tuned.proposal_batch, tuned.keep_per_draw, tuned.steps_per_draw,
            tuned.updates_per_epoch, round(tuned.lr, 6)) == ("dpg_off_planted", 0.75, 2000, 512, 192, 480, 0.006466)
    assert (tuned.stop_within_noise, tuned.stop_tilt_samples, tuned.patience, tuned.init) == (1.0, 10000, 5, "r")
    assert method("dataset_size=5000").steps_per_draw == 192 and method("dataset_size=5000").ema_decay == 0.99
    assert method("dataset_size=500", "method.plant_motif=0.25").plant_motif == 0.25
    for profile in ("toy", "smoke", "paper"):
        planted, base = method(f"profile={profile}"), typed(["method=dpg_off", f"profile={profile}"]).method
        assert planted.plant_motif == 0.5, profile
        assert (planted.lr, planted.proposal_batch, planted.steps_per_draw) == (
            base.lr, base.proposal_batch, base.steps_per_draw), profile


def test_paper_profile_keeps_every_named_option_at_the_reference_value():
    cfg = typed(["profile=paper"])
    m = cfg.method
    assert (m.init, m.keep_start, m.lr_warmup, m.proposal_batch, m.keep_per_draw, m.replay, m.steps_per_draw) == (
        "fresh", False, 0, None, None, 0, 1)
    assert (m.ema_decay, m.lr_decays) == (None, 0)
    assert (m.normalise, m.baseline, m.swap_gate, m.updates_per_epoch, m.lr, m.minibatch, m.clip) == (
        "none", False, "ce_valid", 4000, 0.01, 500, 0.25)
    assert cfg.training1.reuse == "epoch" and cfg.z.rel_tol is None and cfg.z.samples == 1_000_000
    assert cfg.training1.samples_per_step == 1000 and cfg.training1.buffer == 10000
    assert cfg.r.batch_size == 500 and cfg.r.lr_decays == 0
    assert (cfg.model.hidden, cfg.model.layers) == (200, 2) and cfg.max_len == 61
    distill = typed(["profile=paper", "method=distill"]).method
    assert (distill.init, distill.size, distill.valid_size, distill.mle.lr_decays) == ("fresh", 20000, 2000, 0)


def test_profile_overrides_reach_every_method_of_the_family():
    for method in ("dpg_on", "pg", "dpg_true"):
        cfg = typed([f"method={method}"])
        assert cfg.method.name == method and cfg.method.replay == 32768 and cfg.method.init == "r"  # cpu schedule
    assert typed(["method=dpg_true"]).method.target == "true"


def test_the_schema_is_registered_with_hydra():
    text = (CONF / "config.yaml").read_text()
    assert re.search(r"^\s+- gam_rl_schema$", text, re.M)
    for method in group_options("method"):
        assert OmegaConf.load(CONF / "method" / f"{method}.yaml")  # every method file parses
    assert OmegaConf.get_type(make(["method=distill"]).method) is schema.METHODS["distill"]


def test_a_sweep_takes_each_cells_proposal_from_an_earlier_sweep(tmp_path):
    """training1.proposal=${cell_run:SWEEP}: each job's own cell and method inside SWEEP, checked per job."""
    first = tmp_path / "first"
    problems = preflight(["-m", "dataset_size=500,1000", "training1.estimator=snis_mix",
                          f"training1.proposal=${{cell_run:{first}}}"])
    assert len(problems) == 2, problems
    for size in (500, 1000):
        assert any(f"training1.proposal='{first}/10001011111000_1001111_D{size}_s1234_dpg_off': no such folder" in p
                   for p in problems), problems


def fake_run(folder: Path, seed: int) -> Path:
    """A finished run folder as the proposal check reads it (results.json ok with lambda, a loadable pi.pt)."""
    import json

    import torch

    from gam_rl.policy import LSTMPolicy

    folder.mkdir(parents=True)
    torch.manual_seed(seed)
    pi = LSTMPolicy(4, 1, 0.0)
    for name in ("r.pt", "pi.pt"):
        torch.save({"config": pi.config(), "state_dict": pi.state_dict()}, folder / name)
    (folder / "config.yaml").write_text("{}\n")
    (folder / "results.json").write_text(json.dumps({"status": "ok", "lambda": {}, "feature_names": []}))
    return folder


def test_the_training1_cache_keys_a_proposal_by_its_pi_not_its_path(tmp_path):
    import shutil

    import torch

    from gam_rl.training1_cache import cache_key, key_config

    first = fake_run(tmp_path / "first", 0)
    moved = tmp_path / "elsewhere"
    shutil.copytree(first, moved)
    key = {p: cache_key(key_config(typed(["training1.estimator=snis_mix", f"training1.proposal={p}"]),
                                   torch.device("cpu"))) for p in (first, moved)}
    assert key[first] == key[moved]  # the same pi.pt under another path: the same proposal
    shutil.rmtree(moved)
    fake_run(moved, 1)  # that folder trained again: another pi
    again = cache_key(key_config(typed(["training1.estimator=snis_mix", f"training1.proposal={moved}"]),
                                 torch.device("cpu")))
    assert again != key[first]
    # a pi.pt that does not load is refused before any work
    (moved / "pi.pt").write_bytes(b"not a checkpoint")
    problems = preflight(["training1.estimator=snis_mix", f"training1.proposal={moved}"])
    assert any(p.startswith("training1.proposal=") and "does not load" in p for p in problems), problems
