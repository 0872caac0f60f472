import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from gam_rl.config import ConfigError, validate

CONF = Path(__file__).resolve().parents[1] / "conf"


def group_options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def make(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_every_option_of_every_group_composes_and_validates():
    groups = {g: group_options(g) for g in ("method", "profile", "logger")}
    assert set(groups["profile"]) >= {"paper", "cpu", "smoke"}
    assert set(groups["method"]) >= {"distill", "dpg_off"}
    for combo in itertools.product(*groups.values()):
        overrides = [f"{g}={o}" for g, o in zip(groups, combo, strict=True)]
        cfg = validate(make(overrides))
        assert cfg.method.name == combo[0] and cfg.profile == combo[1] and cfg.logger.kind == combo[2]


@pytest.mark.parametrize("motif", ["1000101000101", "1011100111001", "10001011111000"])
@pytest.mark.parametrize("features", ["1001111", "Mv1001111", "0111111"])
@pytest.mark.parametrize("size", [500, 1000, 5000, 10000, 20000])
def test_table1_values_by_name(motif, features, size):
    # bit strings typed on the command line arrive as ints; they come back as strings
    cfg = validate(make([f"motif={motif}", f"features={features}", f"dataset_size={size}", "seed=4444"]))
    assert cfg.motif == motif and cfg.features == features and cfg.dataset_size == size and cfg.seed == 4444


@pytest.mark.parametrize("override, key", [
    ("motif=10a01", "motif"),
    ("motif=" + "1" * 31, "motif"),
    ("features=Xv1001111", "features"),
    ("features=100111", "features"),
    ("dataset_size=0", "dataset_size"),
    ("dataset_size=20001", "dataset_size"),
    ("seed=-1", "seed"),
    ("model.hidden=0", "model.hidden"),
    ("model.dropout=1.5", "model.dropout"),
    ("r.lr=-1", "r.lr"),
    ("device=tpu", "device"),
    ("data.valid_size=5000", "data.valid_size"),
    ("distill.size=-5", "distill.size"),
    ("dpg.minibatch=0", "dpg.minibatch"),
    ("dpg.proposal_batch=-1", "dpg.proposal_batch"),
    ("training1.estimator=mcmc", "training1.estimator"),
    ("method.algorithm=ppo", "method.algorithm"),
    ("method.target=other", "method.target"),
    ("dpg.init=warm", "dpg.init"),
    ("distill.init=warm", "distill.init"),
    ("dpg.normalise=batch", "dpg.normalise"),
    ("dpg.swap_gate=always", "dpg.swap_gate"),
    ("dpg.baseline=3", "dpg.baseline"),
    ("dpg.keep_per_draw=0", "dpg.keep_per_draw"),
    ("dpg.target_margin=-0.1", "dpg.target_margin"),
    ("training1.reuse=forever", "training1.reuse"),
    ("z.rel_tol=-1", "z.rel_tol"),
    ("z.min_samples=0", "z.min_samples"),
    ("r.min_batches=0", "r.min_batches"),
    ("z.tail_hits=0", "z.tail_hits"),
    ("r.lr_decays=-1", "r.lr_decays"),
    ("distill.lr_decays=1.5", "distill.lr_decays"),
    ("distill.lr_decay_factor=1", "distill.lr_decay_factor"),
    ("r.lr_decay_factor=0", "r.lr_decay_factor"),
    ("dpg.clip=0", "dpg.clip"),
    ("distill.clip=null", "distill.clip"),
    ("dpg.replay=100", "dpg.replay"),  # smaller than a minibatch (500)
    ("dpg.swap_gate=kl_is dpg.keep_per_draw=16", "dpg.swap_gate"),  # the gate needs an ESS of 30
    ("method=dpg_true dpg.baseline=true dpg.proposal_batch=5000", "dpg.baseline"),  # thinning + zeros
])
def test_bad_values_name_their_key(override, key):
    with pytest.raises(ConfigError) as err:
        validate(make(override.split()))
    assert any(p.startswith(f"{key}=") for p in err.value.problems), err.value.problems


def test_all_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        validate(make(["motif=12", "dataset_size=-5"]))
    assert len(err.value.problems) == 2


def test_rejection_sampling_with_length_features_beyond_unit_interval_fails():
    # M = |x| / 100 exceeds 1 once samples may be longer than 100 symbols: the RS bound is invalid
    with pytest.raises(ConfigError) as err:
        validate(make(["features=Mv1001111", "training1.estimator=rs", "training1.max_len=150"]))
    assert any(p.startswith("training1.max_len=150") for p in err.value.problems)
    with pytest.raises(ConfigError) as err:
        validate(make(["features=Mv1001111", "method=distill", "distill.max_len=101"]))
    assert any(p.startswith("distill.max_len=101") for p in err.value.problems)
    # within the cap (the default 2n + 1 = 61) both are valid, and binary features never fail
    validate(make(["features=Mv1001111", "training1.estimator=rs", "method=distill"]))
    validate(make(["features=1001111", "training1.estimator=rs", "training1.max_len=400"]))


def test_dpg_combinations_only_bind_the_dpg_methods():
    validate(make(["method=distill", "dpg.replay=100", "dpg.swap_gate=kl_is", "dpg.keep_per_draw=16"]))
    validate(make(["method=pg", "method.target='true'", "dpg.baseline=true", "dpg.proposal_batch=5000"]))
    validate(make(["profile=paper", "method=dpg_true", "dpg.baseline=true"]))  # no thinning: unbiased


def test_distillation_refuses_the_true_target():
    with pytest.raises(ConfigError, match="method.target"):
        validate(make(["method=distill", "method.target=true"]))


def test_unknown_method_is_a_hydra_error_naming_the_group():
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="method/nope"):
        make(["method=nope"])


@pytest.mark.parametrize("override, key", [
    ("resume=maybe", "resume"),
    ("cache.training1=2", "cache.training1"),
    ("cache.training1_dir=''", "cache.training1_dir"),
])
def test_bad_sweep_and_cache_keys_name_their_key(override, key):
    from gam_rl.cli import check

    with pytest.raises(ConfigError) as err:
        check(make([override, "dataset_size=-5"]))
    assert any(p.startswith(f"{key}=") for p in err.value.problems), err.value.problems
    assert any(p.startswith("dataset_size=") for p in err.value.problems)  # reported together with validate's


def test_launcher_and_sweep_groups_have_their_options():
    assert set(group_options("launcher")) >= {"basic", "joblib", "submitit_local", "slurm"}
    assert set(group_options("sweep")) >= {"table1", "table1_smoke", "true_target"}
    cfg = make()
    assert cfg.resume is True and cfg.cache.training1 is True and cfg.cache.training1_dir is None


def test_paper_profile_keeps_every_named_option_at_the_reference_value():
    cfg = make(["profile=paper"])
    assert cfg.dpg.init == "fresh" and cfg.distill.init == "fresh"
    assert cfg.dpg.proposal_batch is None and cfg.dpg.keep_per_draw is None and cfg.dpg.replay == 0
    assert cfg.dpg.steps_per_draw == 1 and cfg.dpg.normalise == "none" and cfg.dpg.baseline is False
    assert cfg.dpg.swap_gate == "ce_valid" and cfg.dpg.updates_per_epoch == 4000 and cfg.dpg.lr == 0.01
    assert cfg.training1.reuse == "epoch" and cfg.z.rel_tol is None and cfg.z.samples == 1_000_000
    assert cfg.r.batch_size is None and cfg.r.min_batches == 1
    assert cfg.r.lr_decays == 0 and cfg.distill.lr_decays == 0
    assert (cfg.model.hidden, cfg.model.layers) == (200, 2)
