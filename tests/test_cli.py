import json
import math
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gam_rl.run_io import RESULT_KEYS, by_feature

ROOT = Path(__file__).resolve().parents[1]


UMASK = 0o002  # a group-writable umask, as on a shared cluster folder


def gam_rl(*args, tmp_path: Path, check=True):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONUNBUFFERED="1")
    env.pop("WANDB_SILENT", None)  # the quiet console must not depend on the caller's environment
    proc = subprocess.run([sys.executable, "-m", "gam_rl.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, preexec_fn=lambda: os.umask(UMASK))
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture
def in_process(monkeypatch):
    """gam-rl's own main in this process: the arguments it hands Hydra (sys.argv), the environment it sets
    (HYDRA_FULL_ERROR) and the log handlers a run adds are put back afterwards."""
    import logging

    from gam_rl.cli import main

    monkeypatch.setattr(sys, "argv", ["gam-rl"])
    monkeypatch.setenv("HYDRA_FULL_ERROR", os.environ.get("HYDRA_FULL_ERROR", "0"))
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield main
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:], root.level = handlers, level


def test_smoke_run_writes_complete_results(tmp_path):
    run_dir = tmp_path / "run"
    proc = gam_rl("profile=smoke", "logger=csv", f"hydra.run.dir={run_dir}", "dataset_size=200",
                  tmp_path=tmp_path)
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok"
    assert set(RESULT_KEYS) <= set(results)
    for key in ("entropy_true", "ce_test_r", "motif_freq_r", "avg_len_r", "ce_test_p_lambda", "ce_test_pi",
                "motif_freq_pi", "avg_len_pi", "z_hat"):
        assert isinstance(results[key], float), key
    assert all(results[key] is not None for key in RESULT_KEYS), [k for k in RESULT_KEYS if results[k] is None]
    names = results["feature_names"]  # lambda and the moments by feature name, in the features' order
    assert len(names) == 5 and all(list(results[key]) == names for key in ("lambda", "moments_data", "moments_model"))
    assert results["entropy_true"] < results["ce_test_r"]  # no model beats the true entropy
    assert results["swap_count"] == len(results["swaps"])
    assert results["threads"] >= 1  # the thread count that made these numbers
    assert results["flush_denormal"] is True  # subnormal floats flushed (gam_rl/cpu.py)
    code = results["code"]  # which code: this checkout's commit (a git clone), the package version
    assert code["version"] and (code["commit"] is None or len(code["commit"]) == 40)
    assert code["dirty"] in (True, False, None)
    # every method's common Training-2 record, and where pi started (a fresh LSTM under smoke)
    assert results["t2_start_ce_valid"] > 0 and isinstance(results["t2_kept_start"], bool)
    assert results["ce_valid_pi"] <= results["t2_start_ce_valid"]  # the start is check 0 of the selection
    assert results["t2_kept_start"] == (results["t2_best_epoch"] == 0)
    assert isinstance(results["t2_curve"], list) and results["t2_curve"][0]["draws"] > 0
    assert results["dataset_size"] == 200 and results["motif"] == "10001011111000"
    assert Path(results["data_dir"], "train.txt").exists()
    assert set(results["timings"]) >= {"data", "r", "eval_r", "training1", "z", "training2", "eval_pi"}
    assert results["samples"]["training2"] > 0 and results["samples"]["z"] > 0
    assert (run_dir / "config.yaml").exists() and (run_dir / "r.pt").exists() and (run_dir / "pi.pt").exists()
    header = (run_dir / "metrics.csv").read_text().splitlines()[0]
    assert header == "time,stage,step,name,value"
    assert "CE(T, p_lambda)" in proc.stdout and "H(p_true)" in proc.stdout and str(run_dir) in proc.stdout
    # files follow the umask (a shared sweep folder stays readable by the group when it allows)
    assert stat.S_IMODE((run_dir / "results.json").stat().st_mode) == 0o666 & ~UMASK
    entry = Path(results["training1_cache"]["dir"])
    assert stat.S_IMODE(entry.stat().st_mode) == 0o777 & ~UMASK
    assert stat.S_IMODE(Path(results["data_dir"]).stat().st_mode) == 0o777 & ~UMASK


def test_per_feature_values_read_as_written_now_and_by_older_versions():
    from gam_rl.cli import wandb_summary

    names = ["motif", "M0", "v0"]
    now = {"feature_names": names, "lambda": {"motif": -3.0, "M0": 0.5, "v0": 0.1}}
    older = {"feature_names": names, "lambda": [-3.0, 0.5, 0.1]}  # bare lists beside feature_names
    assert by_feature(now, "lambda") == by_feature(older, "lambda") == now["lambda"]
    assert list(by_feature(older, "lambda")) == names  # the features' order
    assert wandb_summary(now)["lambda/M0"] == wandb_summary(older)["lambda/M0"] == 0.5
    with pytest.raises(ValueError, match="'lambda'"):
        by_feature({"feature_names": names, "lambda": [1.0]}, "lambda")


def test_bad_override_fails_before_any_work_names_the_key_and_leaves_nothing(tmp_path, monkeypatch, capsys,
                                                                              in_process):
    main = in_process
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "bad"
    with pytest.raises(SystemExit) as bad:
        main(["motif=10a01", "+foo=1", "logger=csv", f"hydra.run.dir={run_dir}"])
    err = capsys.readouterr().err
    assert bad.value.code == 2
    assert "motif.pattern='10a01'" in err and "foo: unknown key" in err
    assert err.count("invalid configuration") == 1  # printed once
    assert not run_dir.exists() and not (tmp_path / "outputs").exists()
    assert not Path(os.environ["GAM_RL_CACHE"], "data").exists() or not any(
        "10a01" in p.name for p in Path(os.environ["GAM_RL_CACHE"], "data").iterdir())
    with pytest.raises(SystemExit) as unknown:
        main(["method=nosuch"])
    assert unknown.value.code == 2 and "method=nosuch: no such option" in capsys.readouterr().err


@pytest.mark.slow
def test_offline_wandb_run_files_exist(tmp_path):
    run_dir = tmp_path / "wb"
    proc = gam_rl("profile=smoke", "logger=wandb", f"hydra.run.dir={run_dir}", "dataset_size=100",
                  "data.pools.train=100", tmp_path=tmp_path)
    assert "wandb:" not in proc.stdout + proc.stderr  # W&B is quiet unless logger.verbose=true
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1
    assert list(offline[0].glob("*.wandb"))


def test_distill_run_reports_acceptance(tmp_path, monkeypatch, in_process):
    main = in_process  # gam-rl's own main, without a second import of torch
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "distill"
    main(["profile=smoke", "logger=csv", "method=distill", f"hydra.run.dir={run_dir}", "dataset_size=100"])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "ok" and results["method"] == "distill"
    assert 0 < results["distill_acceptance_rate"] <= 1 and results["distill_proposals"] >= 300


def test_run_failing_midway_records_why_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "fail"
    proc = gam_rl("profile=smoke", "logger=csv", "method=distill", f"hydra.run.dir={run_dir}", "dataset_size=100",
                  "method.max_proposals=10", "method.proposal_batch=5", tmp_path=tmp_path, check=False)
    assert proc.returncode == 1
    assert "max_proposals" in proc.stderr and "[training2] done" not in proc.stdout + proc.stderr
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and "max_proposals" in results["error"] and results["stage"] == "training2"
    assert results["ce_test_pi"] is None and "training2" in results["timings"]


@pytest.mark.parametrize("sig, code", [pytest.param(signal.SIGINT, 130, id="SIGINT"),
                                       pytest.param(signal.SIGTERM, 143, id="SIGTERM", marks=pytest.mark.slow)])
def test_a_signal_leaves_a_failed_run_that_says_why(tmp_path, sig, code):
    run_dir = tmp_path / "run"
    env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    # a long DPG stage (many updates) so the signal lands in Training-2
    args = ["profile=smoke", "logger=csv", f"hydra.run.dir={run_dir}", "dataset_size=200", "method.max_epochs=1000",
            "method.patience=1000", f"cache.training1_dir={tmp_path / 'cache'}"]
    proc = subprocess.Popen([sys.executable, "-m", "gam_rl.cli", *args],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    out, deadline = "", time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        line = proc.stdout.readline()
        out += line
        if "[training2] starting" in line:
            break
    time.sleep(1.0)
    proc.send_signal(sig)
    rest, _ = proc.communicate(timeout=120)
    out += rest
    assert proc.returncode == code, out  # 128 + the signal
    results = json.loads((run_dir / "results.json").read_text())
    assert results["status"] == "failed" and results["stage"] == "training2"
    assert results["error"] == f"interrupted ({sig.name}) during training2", results["error"]
    assert "[training2] done" not in out
    if sig == signal.SIGINT:  # the re-run resumes from the Training-1 cache the interrupted run stored
        rerun = gam_rl(*args[:-3], "method.max_epochs=1", args[-1], tmp_path=tmp_path)
        results = json.loads((run_dir / "results.json").read_text())
        assert results["status"] == "ok" and results["training1_cache"]["hit"] is True, rerun.stdout


def test_the_summary_prints_short_runs_in_seconds_and_says_what_was_cached():
    from gam_rl.cli import run_summary

    short = run_summary({"timings": {"r": 0.0, "training2": 0.3, "eval_pi": 0.4}, "wall_time_s": 3.2,
                         "training1_cache": {"hit": True}}, Path("run"))
    assert "wall time        3.2 s (every stage under 0.5 s; Training-1 from the cache)" in short
    long = run_summary({"timings": {"r": 128.0, "training2": 87.2}, "wall_time_s": 252.0}, Path("run"))
    assert "wall time        4.2 min (r 128 s, training2 87 s)" in long


def test_make_setup_takes_the_torch_index_from_torch_index():
    """make setup installs torch from TORCH_INDEX when it is set (the CPU build on a machine whose index
    serves CUDA wheels), else from pip's configured index."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    plan = subprocess.run(["make", "-n", "-B", "setup", "TORCH_INDEX=https://download.pytorch.org/whl/cpu"], cwd=ROOT,
                          capture_output=True, text=True, check=True).stdout
    assert '"torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu' in plan
    default = subprocess.run(["make", "-n", "-B", "setup"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert '"torch==2.13.0"' in default and "--index-url" not in default


def test_make_test_runs_the_suite_in_test_workers_processes():
    """make test and make test-slow hand the tests to TEST_WORKERS pytest-xdist processes (2 by default: the
    2-core machines the suite is timed on); TEST_WORKERS=0 runs them in pytest's own process."""
    import shutil

    if shutil.which("make") is None:
        pytest.skip("no make")
    for target in ("test", "test-slow"):
        plan = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        assert "-m pytest -q" in plan and " -n 2" in plan, plan
        serial = subprocess.run(["make", "-n", target, "TEST_WORKERS=0"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout
        assert " -n 0" in serial, serial


def test_an_output_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys):
    """hydra.run.dir under a file, or in /proc (root may write everywhere else, not there): exit 2 naming the
    key, nothing written; a sweep's hydra.sweep.dir likewise. (In-process: the same main as gam-rl.)"""
    from gam_rl.cli import main, output_dir_problem

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(SystemExit) as refused:
        main([f"hydra.run.dir={blocker}/run", "profile=smoke"])
    assert refused.value.code == 2 and f"hydra.run.dir={blocker}/run: {blocker} is a file" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # no outputs/, no run folder
    if Path("/proc/self").exists():
        problem = output_dir_problem(["hydra.sweep.dir=/proc/x/${now:%H}"], multirun=True)
        assert problem is not None and problem.startswith("hydra.sweep.dir=/proc/x/${now:%H}: no folder can be made")
    assert output_dir_problem([f"hydra.run.dir={tmp_path}/new/${{now:%H}}"], multirun=False) is None
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".gam_rl_check_*"))  # the probe is gone


def test_help_is_the_projects_and_dry_run_lists_a_sweeps_jobs_without_running_them(tmp_path, capsys, in_process):
    main = in_process
    with pytest.raises(SystemExit) as helped:  # Hydra's --help exits 0 after printing the project's page
        main(["--help"])
    out = capsys.readouterr().out
    assert helped.value.code in (0, None)
    for part in ("== Usage ==", "--dry-run", "== Exit codes ==", "2 a configuration error", "method=dpg_off",
                 "== Config groups =="):
        assert part in out, part
    # --dry-run in-process (the same main as the gam-rl command): the jobs, their folders, nothing written
    main(["-m", "--dry-run", "profile=smoke", "seed=1,2", "method=dpg_off,subtb", f"hydra.sweep.dir={tmp_path}/sweep"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == "gam-rl --dry-run: 4 jobs, nothing run or written"
    assert f"#3 {tmp_path}/sweep/10001011111000_1001111_D500_s2_subtb  " in lines[4]
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "multirun").exists()
    with pytest.raises(SystemExit) as bad:
        main(["-m", "--dry-run", "profile=smoke", "seed=1,-2"])
    assert bad.value.code == 2 and "seed=-2" in capsys.readouterr().err  # checked like any command line


def test_training1_from_an_earlier_runs_pi_mixed_with_r(tmp_path, monkeypatch, in_process):
    """training1.estimator=snis_mix: Training-1 and the Z stage draw from a r + (1 - a) pi of an earlier run,
    recorded in results.json; the Training-1 cache keeps it apart from the same cell under snis_r."""
    main = in_process
    monkeypatch.chdir(tmp_path)
    first, second = tmp_path / "first", tmp_path / "second"
    main(["profile=smoke", "logger=csv", f"hydra.run.dir={first}", "dataset_size=100"])
    main(["profile=smoke", "logger=csv", f"hydra.run.dir={second}", "dataset_size=100",
          "training1.estimator=snis_mix", f"training1.proposal={first}", "training1.mix_r=0.3"])
    one, two = (json.loads((d / "results.json").read_text()) for d in (first, second))
    assert two["status"] == "ok" and two["training1_estimator"] == "snis_mix"
    assert two["training1_proposal"] == str(first.resolve())
    assert not two["training1_cache"]["hit"] and two["training1_cache"]["key"] != one["training1_cache"]["key"]
    assert two["ce_test_r"] == one["ce_test_r"]  # the same r: only lambda's estimates changed proposal
    assert math.isfinite(two["log_z_hat"]) and two["z_samples"] > 0


def test_a_second_training2_seed_reuses_training1_and_names_its_folder(tmp_path, monkeypatch, capsys, in_process):
    """training2_seed: the same r and lambda (a Training-1 cache hit), another Training-2 (pi differs), the seed in
    results.json (seed + 3 when none is named) and a run folder that ends in _t<seed>."""
    main = in_process
    monkeypatch.chdir(tmp_path)
    cache = f"cache.training1_dir={tmp_path}/cache"
    main(["-m", "--dry-run", "profile=smoke", "training2_seed=7,8", f"hydra.sweep.dir={tmp_path}/sweep"])
    out = capsys.readouterr().out
    assert f"{tmp_path}/sweep/10001011111000_1001111_D500_s1234_t8_dpg_off" in out
    first, second = tmp_path / "first", tmp_path / "second"
    main(["profile=smoke", "logger=csv", f"hydra.run.dir={first}", "dataset_size=100", cache])
    main(["profile=smoke", "logger=csv", f"hydra.run.dir={second}", "dataset_size=100", cache, "training2_seed=7"])
    one, two = (json.loads((d / "results.json").read_text()) for d in (first, second))
    assert two["status"] == "ok" and two["training1_cache"]["hit"] and two["ce_test_r"] == one["ce_test_r"]
    assert (one["training2_seed"], two["training2_seed"]) == (one["seed"] + 3, 7)
    assert two["ce_test_pi"] != one["ce_test_pi"]
