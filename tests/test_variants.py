"""A method variant is one YAML in the user's search path: it is its own method (named after its file),
inherits its base's profile schedule and per-|D| choices, overrides them with its own keys, and runs
under profile=smoke with the smoke schedule (the recipe of docs/add_a_method.md, as a user writes it)."""

import json

import yaml
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

import gam_rl.schema  # noqa: F401 (the method_name resolver)
from gam_rl.cli import rewrite_axes
from tests.test_cli import gam_rl

VARIANT = "defaults:\n  - /method/dpg_off@_here_\n  - _self_\n\nlr: 0.02\n"


def composed_method(*overrides: str) -> dict:
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = compose("config", overrides=rewrite_axes(list(overrides)), return_hydra_config=True)
        return OmegaConf.to_container(cfg.method, resolve=True)


def test_a_variant_in_the_users_search_path_runs_under_smoke_named_after_its_file(tmp_path):
    (tmp_path / "my_conf" / "method").mkdir(parents=True)
    (tmp_path / "my_conf" / "method" / "dpg_fast.yaml").write_text(VARIANT)
    run_dir = tmp_path / "run"
    gam_rl("profile=smoke", "logger=csv", "method=dpg_fast", f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]",
           f"hydra.run.dir={run_dir}", "dataset_size=200", "threads=1", tmp_path=tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["method"] == "dpg_fast"
    method = yaml.safe_load((run_dir / "config.yaml").read_text())["method"]
    smoke = composed_method("method=dpg_off", "profile=smoke")
    assert method["name"] == "dpg_fast" and method["algorithm"] == "dpg_off"
    assert method["lr"] == 0.02 != smoke["lr"]  # its own key beats the base's profile
    # the rest is dpg_off's smoke schedule (5 updates a check, at most 3 checks): seconds, not the paper's hours
    assert {k: v for k, v in method.items() if k not in ("name", "lr")} == {
        k: v for k, v in smoke.items() if k not in ("name", "lr")}
    assert method["updates_per_epoch"] == 5 and results["t2_updates"] <= 15


def test_variants_inherit_their_base_profile_and_per_size_choices():
    for profile, size in (("cpu", "500"), ("cpu", "5000"), ("toy", "500"), ("paper", "1000")):
        base = composed_method("method=fdpg", f"profile={profile}", f"dataset_size={size}")
        for variant, own in (("fdpg_js", {"divergence": "js", "baseline": True}),
                             ("fdpg_rkl", {"divergence": "rkl", "baseline": True})):
            got = composed_method(f"method={variant}", f"profile={profile}", f"dataset_size={size}")
            assert got == {**base, **own, "name": variant}, (variant, profile, size)
    # cpu at |D| = 500: dpg_off's per-|D| choices (its noise stop) reach the base and its variants, and
    # a variant that opts out of them (dpg_on: tuned off-policy) does not get them
    assert composed_method("method=dpg_off", "dataset_size=500")["stop_within_noise"] == 1.0
    assert composed_method("method=dpg_on", "dataset_size=500")["stop_within_noise"] is None


def test_names_follow_the_chosen_file_and_the_keys_a_base_names_itself_by():
    assert composed_method("method=fdpg")["name"] == "fdpg_kl"
    assert composed_method("method=fdpg", "method.divergence=js")["name"] == "fdpg_js"
    assert composed_method("method=ac_dpg", "method.critic=head")["name"] == "ac_dpg_head"
    assert composed_method("method=kl_control")["name"] == "kl_control"
    assert composed_method("method=dpg_off", "method.name=mine")["name"] == "mine"  # a name set is kept
