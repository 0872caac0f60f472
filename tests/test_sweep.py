"""Sweeps: presets, launchers (basic, joblib, submitit local), runs that survive a failed job,
skip-on-re-run, the Training-1 cache, W&B offline runs, the multirun scripts and the report.

The end-to-end tests run the real CLI in subprocesses with profile smoke, tiny schedules and
small data pools; each sweep has two jobs.
"""

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from gam_rl import cache
from gam_rl.cli import check
from gam_rl.pipeline import Run
from gam_rl.policy import LSTMPolicy

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HAS_REPORT = (ROOT / "gam_rl" / "report.py").exists()
NO_REPORT = "gam_rl/report.py does not exist yet (another engineer is writing gam-rl-report)"
# on top of sweep=table1_smoke (profile smoke, pools of 500/200/500): shorter still
TINY = ["r.max_epochs=2", "training1.max_epochs=2", "z.samples=500", "z.batch_size=500", "eval.samples=200",
        "dpg.max_epochs=1", "distill.max_epochs=1", "distill.size=100", "distill.valid_size=50"]
CELL = "10001011111000_1001111_D{}_s1234_{}"


def env(**extra: str) -> dict:
    e = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1")
    e.pop("GAM_RL_TEST_FAIL_RUNS", None)
    e.update(extra)
    return e


def multirun(*args: str, cwd: Path, timeout: int = 240, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gam_rl.cli", "--multirun", "sweep=table1_smoke", *TINY, *args],
                          cwd=cwd, env=env(**extra_env), capture_output=True, text=True, timeout=timeout)


def results(job: Path) -> dict:
    return json.loads((job / "results.json").read_text())


def wandb_records(run_file: Path) -> list:
    """The records of an offline W&B run file (LevelDB log format: 32 KiB blocks, 7-byte record
    headers crc32/length/type, after a 7-byte W&B header), parsed as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, pending, records = run_file.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # trailer padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


def wandb_run_info(job: Path) -> dict:
    runs = list((job / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, runs
    info: dict = {"summary": {}}
    for record in wandb_records(next(runs[0].glob("*.wandb"))):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            info.update(group=record.run.run_group, job_type=record.run.job_type, tags=set(record.run.tags),
                        config={i.key: json.loads(i.value_json) for i in record.run.config.update})
        elif kind == "summary":
            info["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                    for i in record.summary.update})
        elif kind == "exit":
            info["exit_code"] = record.exit.exit_code
    return info


# ---- presets -----------------------------------------------------------------------------------

def sweep_jobs(preset: str, cli: list[str]) -> list[dict]:
    """The jobs Hydra's basic sweeper makes of a preset's hydra.sweeper.params plus command-line
    overrides (the same code path as gam-rl -m)."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}"], return_hydra_config=True)
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    overrides = OverridesParser.create().parse_overrides(params + cli)
    [batch] = BasicSweeper.split_arguments(overrides, None)
    return [dict(o.split("=", 1) for o in job) for job in batch]


def test_table1_preset_is_the_paper_grid_and_the_command_line_narrows_it():
    jobs = sweep_jobs("table1", [])
    assert len(jobs) == 120
    assert {j["motif"] for j in jobs} == {"1000101000101", "1011100111001", "10001011111000"}
    assert {j["features"] for j in jobs} == {"1001111", "Mv1001111"}
    assert {j["dataset_size"] for j in jobs} == {"500", "1000", "5000", "10000", "20000"}
    assert {j["seed"] for j in jobs} == {"1234", "4444"} and {j["method"] for j in jobs} == {"distill", "dpg_off"}
    narrowed = sweep_jobs("table1", ["dataset_size=500,1000", "seed=4444"])
    assert len(narrowed) == 3 * 2 * 2 * 1 * 2
    assert {j["dataset_size"] for j in narrowed} == {"500", "1000"} and {j["seed"] for j in narrowed} == {"4444"}
    assert len(sweep_jobs("table1_smoke", [])) == 4
    true_target = sweep_jobs("true_target", [])
    assert len(true_target) == 60 and {j["method"] for j in true_target} == {"dpg_true", "dpg_off"}


@pytest.mark.parametrize("preset", ["table1", "table1_smoke", "true_target"])
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "slurm"])
def test_presets_and_launchers_compose_and_validate(preset, launcher):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}", f"launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"basic": "BasicLauncher", "joblib": "JoblibLauncher", "submitit_local": "LocalLauncher",
            "slurm": "SlurmLauncher"}[launcher] in target
    assert cfg.hydra.mode.name == "MULTIRUN"
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)  # what Hydra does for a job: ${hydra:...} resolves
    try:
        assert cfg.cache.training1_dir == f"{cfg.hydra.sweep.dir}/training1_cache"
        assert cfg.hydra.sweep.dir.endswith(f"_{preset}")
        assert cfg.threads == {"basic": None, "joblib": 1, "submitit_local": 1, "slurm": 4}[launcher]
        job = OmegaConf.to_container(cfg)
        del job["hydra"]
        check(OmegaConf.create(OmegaConf.to_container(OmegaConf.create(job), resolve=True)))
    finally:
        HydraConfig.instance().cfg = previous


# ---- Training-1 cache: key, lock, crash ---------------------------------------------------------

def composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return check(compose("config", overrides=["profile=smoke", *overrides]))


def test_cache_key_depends_on_what_training1_reads_and_nothing_else():
    cpu = torch.device("cpu")
    base = cache.cache_key(composed(), cpu)
    for same in (["method=distill"], ["method=dpg_true"], ["dpg.lr=0.5"], ["distill.size=7"], ["logger=csv"],
                 ["threads=1"], ["cache.training1_dir=/elsewhere"], ["data.cache_dir=/elsewhere"], ["resume=false"]):
        assert cache.cache_key(composed(*same), cpu) == base, same
    for other in (["training1.lr=0.5"], ["r.max_epochs=1"], ["z.samples=123"], ["seed=4444"], ["dataset_size=1000"],
                  ["features=Mv1001111"], ["motif=1011100111001"], ["model.hidden=8"], ["eval.samples=10"],
                  ["data.pools.test=100"], ["n=29"]):
        assert cache.cache_key(composed(*other), cpu) != base, other
    assert cache.cache_key(composed(), torch.device("cuda")) != base


def test_cache_key_changes_with_the_source_code(tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    base = cache.cache_key(composed(), cpu)
    assert cache.source_digest() == cache.source_digest.__wrapped__()  # a pure function of the files
    # the same package with one source byte changed: another digest, another key
    package = tmp_path / "gam_rl"
    shutil.copytree(Path(cache.gam_rl.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "estimators.py").write_text((package / "estimators.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(cache.gam_rl, "__file__", str(package / "__init__.py"))
    cache.source_digest.cache_clear()
    try:
        assert cache.cache_key(composed(), cpu) != base
    finally:
        monkeypatch.undo()
        cache.source_digest.cache_clear()
    assert cache.cache_key(composed(), cpu) == base


def _fake_stages(cfg, run, logger, run_dir: Path, counter: Path, fail: bool = False):
    """compute() for training1_stages: a tiny r, a lambda, results, one logged metric."""
    def compute(stage_logger):
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(1.0)
        if fail:
            raise RuntimeError("crash in Training-1")
        r = LSTMPolicy(hidden=4, layers=1, dropout=0.0)
        torch.save({"config": r.config(), "state_dict": r.state_dict()}, run_dir / "r.pt")
        run.results.update(ce_test_r=0.7, z_hat=0.25, **{"lambda": [-1.5, 0.25]})
        run.results["timings"]["training1"] = 0.5
        stage_logger.log("t1", 0, mismatch=0.125)
        return r, torch.tensor([-1.5, 0.25])
    return compute


class _Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def _stages(cfg, run_dir: Path, counter: Path, fail: bool = False):
    run_dir.mkdir(parents=True, exist_ok=True)
    run, logger = Run(cfg), _Logger()
    r, lam = cache.training1_stages(cfg, run, logger, run_dir, torch.device("cpu"),
                                    _fake_stages(cfg, run, logger, run_dir, counter, fail),
                                    lambda: LSTMPolicy(hidden=4, layers=1, dropout=0.0))
    return run.results, logger.rows, lam


def test_concurrent_jobs_of_a_cell_compute_training1_once(tmp_path):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    with ThreadPoolExecutor(2) as pool:  # flock locks the open file: two threads exclude each other like two jobs
        outcomes = list(pool.map(lambda i: _stages(cfg, tmp_path / f"run{i}", counter), range(2)))
    assert counter.read_text() == "x"  # one writer; the other waited on the lock and reused its entry
    assert sorted(res["training1_cache"]["hit"] for res, _, _ in outcomes) == [False, True]
    waiter = next(res for res, _, _ in outcomes if res["training1_cache"]["hit"])
    assert waiter["training1_cache"]["wait_s"] > 0.3  # it did wait for the writer (1 s of work)
    assert [lam.tolist() for _, _, lam in outcomes] == [[-1.5, 0.25]] * 2


def test_cache_hit_restores_results_curves_and_r_and_a_changed_key_misses(tmp_path):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    first, _, _ = _stages(cfg, tmp_path / "a", counter)
    second, rows, lam = _stages(cfg, tmp_path / "b", counter)
    assert counter.read_text() == "x"
    assert first["training1_cache"]["hit"] is False and second["training1_cache"]["hit"] is True
    assert second["training1_cache"]["key"] == first["training1_cache"]["key"]
    assert second["training1_cache"]["source_run_dir"] == str(tmp_path / "a")
    for key in ("ce_test_r", "z_hat", "lambda"):
        assert second[key] == first[key], key
    assert second["timings"]["training1"] == 0.0 and second["training1_cache"]["source_timings"]["training1"] == 0.5
    assert rows == [(0, {"t1/mismatch": 0.125})]  # the curves are replayed into the new run
    assert (tmp_path / "b" / "r.pt").read_bytes() == (tmp_path / "a" / "r.pt").read_bytes()
    changed, _, _ = _stages(composed(f"cache.training1_dir={tmp_path / 'c'}", "training1.lr=0.5"), tmp_path / "d",
                            counter)
    assert changed["training1_cache"]["hit"] is False and counter.read_text() == "xx"


def test_a_crashed_writer_leaves_no_entry(tmp_path):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    with pytest.raises(RuntimeError, match="crash"):
        _stages(cfg, tmp_path / "a", counter, fail=True)
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    res, _, _ = _stages(cfg, tmp_path / "b", counter)
    assert res["training1_cache"]["hit"] is False and counter.read_text() == "xx"


# ---- end to end -----------------------------------------------------------------------------------

def test_smoke_script_serial_sweep_with_a_failed_job_cache_wandb_and_report(tmp_path):
    """table1_smoke.sh narrowed to one cell (distill, then dpg_off), serial, W&B offline; the
    dpg_off job is made to fail after Training-1: the sweep goes on, the report still runs and
    lists it, the script exits 1."""
    sweep = tmp_path / "sweep"
    distill, dpg = sweep / CELL.format(100, "distill"), sweep / CELL.format(100, "dpg_off")
    proc = subprocess.run([str(ROOT / "multirun_scripts" / "table1_smoke.sh"), f"hydra.sweep.dir={sweep}",
                           "dataset_size=100", "launcher=basic", "logger=wandb", *TINY],
                          cwd=tmp_path, env=env(GAM_RL_TEST_FAIL_RUNS=dpg.name), capture_output=True, text=True,
                          timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == (1 if HAS_REPORT else 3), out
    assert "at least one job failed" in out and "failed: 1, ok: 1" in out
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == [distill.name, dpg.name]
    first, second = results(distill), results(dpg)  # method is the outer loop: distill ran first
    assert first["status"] == "ok" and isinstance(first["ce_test_pi"], float)
    assert second["status"] == "failed" and "failure injected" in second["error"] and second["ce_test_pi"] is None

    # Training-1 once per cell: the second method reused the first's entry, under the sweep folder
    assert first["training1_cache"]["hit"] is False and second["training1_cache"]["hit"] is True
    assert second["training1_cache"]["key"] == first["training1_cache"]["key"]
    assert Path(second["training1_cache"]["dir"]).parent == sweep / "training1_cache"
    for key in ("lambda", "ce_test_p_lambda", "z_hat", "ce_test_r", "motif_freq_r", "moments_model", "ce_valid_r"):
        assert second[key] == first[key], key
    assert all(second["timings"][s] == 0 and second["samples"][s] == 0 for s in ("r", "training1", "z"))
    assert first["samples"]["z"] > 0
    assert ",t1,0,mismatch," in (dpg / "metrics.csv").read_text()  # curves replayed from the cache

    # one offline W&B run per job: group = cell, job type = method, resolved config, summary, exit code
    for job, res in ((distill, first), (dpg, second)):
        info = wandb_run_info(job)
        assert info["group"] == "10001011111000_1001111_D100" and info["job_type"] == res["method"]
        assert {"profile:smoke", "seed:1234", f"sweep:{sweep.name}"} <= info["tags"]
        assert info["config"]["method"]["name"] == res["method"] and info["config"]["dataset_size"] == 100
        assert info["summary"]["status"] == res["status"]
        assert info["summary"]["ce_test_p_lambda"] == pytest.approx(res["ce_test_p_lambda"])
        assert info["summary"]["lambda/motif"] == pytest.approx(res["lambda"][0])
        assert info["summary"]["training1_cache/hit"] is res["training1_cache"]["hit"]
        assert "t1/mismatch" in info["summary"] and "z/ess" in info["summary"]  # Training-1 figures, cached or not
        assert info["exit_code"] == (0 if res["status"] == "ok" else 1)
    assert "ce_test_pi" in wandb_run_info(distill)["summary"]

    if not HAS_REPORT:
        assert "cannot write the report" in out
        pytest.skip(NO_REPORT)
    report = sweep / "report"
    assert (report / "table1.md").is_file() and (report / "table1.csv").is_file()
    missing = (report / "table1.md").read_text().split("### Missing or failed", 1)[1]
    assert dpg.name in missing and "failed" in missing


def test_joblib_sweep_survives_a_failed_job_and_a_rerun_redoes_only_that(tmp_path):
    sweep = tmp_path / "sweep"
    ok, bad = sweep / CELL.format(100, "dpg_off"), sweep / CELL.format(200, "dpg_off")
    proc = multirun(f"hydra.sweep.dir={sweep}", "dataset_size=100,200", "method=dpg_off", "launcher=joblib",
                    "hydra.launcher.n_jobs=2", "logger=csv", cwd=tmp_path, GAM_RL_TEST_FAIL_RUNS=f"*{bad.name}")
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the sweep reports the failure ...
    assert "RunFailed" in proc.stderr and bad.name in proc.stderr
    assert results(ok)["status"] == "ok"  # ... and the other job's results exist
    failed = results(bad)
    assert failed["status"] == "failed" and "failure injected" in failed["error"] and failed["traceback"]
    assert failed["ce_test_p_lambda"] is not None and failed["ce_test_pi"] is None
    assert "threads: 1" in (ok / "config.yaml").read_text()  # joblib: one torch thread per job
    status = subprocess.run([sys.executable, "-m", "gam_rl.sweep", str(sweep)], capture_output=True, text=True)
    assert status.returncode == 1 and bad.name in status.stdout and "failed: 1, ok: 1" in status.stdout

    # re-run the same sweep (serially): the complete job is skipped untouched, the failed one redone
    before = (ok / "results.json").read_bytes(), (ok / "results.json").stat().st_mtime_ns
    proc = multirun(f"hydra.sweep.dir={sweep}", "dataset_size=100,200", "method=dpg_off", "logger=csv",
                    cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"skipping {ok}: its results are complete" in proc.stdout
    assert f"skipped (complete): {ok / 'results.json'}" in proc.stdout
    assert ((ok / "results.json").read_bytes(), (ok / "results.json").stat().st_mtime_ns) == before
    redone = results(bad)
    assert redone["status"] == "ok" and "has status 'failed': recomputing it" in proc.stdout
    assert redone["training1_cache"]["hit"] is True  # the failed attempt had published its Training-1
    assert redone["ce_test_p_lambda"] == failed["ce_test_p_lambda"]
    status = subprocess.run([sys.executable, "-m", "gam_rl.sweep", str(sweep)], capture_output=True, text=True)
    assert status.returncode == 0 and "ok: 2" in status.stdout


def test_submitit_local_launcher(tmp_path):
    """The Slurm path (hydra-submitit-launcher) with submitit's local executor: the job runs in
    its own process from a pickled task, threads follow hydra.launcher.cpus_per_task."""
    sweep = tmp_path / "sweep"
    proc = multirun(f"hydra.sweep.dir={sweep}", "dataset_size=100", "method=dpg_off", "launcher=submitit_local",
                    "hydra.launcher.cpus_per_task=2", "logger=csv", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job = sweep / CELL.format(100, "dpg_off")
    res = results(job)
    assert res["status"] == "ok" and res["training1_cache"]["hit"] is False
    assert list((sweep / ".submitit").glob("*/*_result.pkl"))  # submitit ran it and pickled its JobReturn
    assert "threads: 2" in (job / "config.yaml").read_text()


def test_two_jobs_of_one_sweep_never_share_a_folder(tmp_path):
    from gam_rl.sweep import folder_conflict

    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "cell"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(OmegaConf.to_yaml(composed("dpg.lr=0.5", "threads=2")))
    time.sleep(0.01)
    (sweep / "multirun.yaml").write_text("{}")  # a new sweep started after that job: a re-run may redo it
    assert folder_conflict(job, composed("dpg.lr=0.1"), sweep) is None
    (job / "config.yaml").write_text(OmegaConf.to_yaml(composed("dpg.lr=0.5", "threads=2")))  # written in this sweep
    assert folder_conflict(job, composed("dpg.lr=0.5"), sweep) is None  # the same job (threads aside)
    conflict = folder_conflict(job, composed("dpg.lr=0.1"), sweep)
    assert conflict and "dpg differ" in conflict and "hydra.sweep.subdir" in conflict


def test_slurm_launcher_example_makes_a_valid_sbatch_script(tmp_path, monkeypatch):
    """conf/launcher/slurm.yaml through the plugin's parameter mapping into submitit's sbatch
    script (a stub srun stands in for the cluster)."""
    import submitit
    from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

    (tmp_path / "srun").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", return_hydra_config=True, overrides=[
            "sweep=table1", "launcher=slurm", "hydra.launcher.partition=gpu", "hydra.launcher.gpus_per_node=1",
            "hydra.launcher.setup=[source /opt/gam_rl/.venv/bin/activate]"])
    previous = HydraConfig.instance().cfg
    HydraConfig.instance().set_config(cfg)
    try:
        params = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    finally:
        HydraConfig.instance().cfg = previous
    assert params.pop("_target_").endswith("SlurmLauncher")
    # what SlurmLauncher.launch does with its parameters
    executor = submitit.AutoExecutor(cluster="slurm", folder=str(tmp_path / "%j"),
                                     slurm_max_num_timeout=params.pop("max_num_timeout"))
    params.pop("submitit_folder")
    base = set(OmegaConf.structured(BaseQueueConf).keys())
    executor.update_parameters(**{k if k in base else f"slurm_{k}": v for k, v in params.items()})
    script = executor._executor._make_submission_file_text("python -m gam_rl.cli", "uid")
    for line in ("--partition=gpu", "--cpus-per-task=4", "--gpus-per-node=1", "--mem=8GB", "--time=240",
                 "--job-name=gam-rl"):
        assert f"#SBATCH {line}" in script, line
    assert "source /opt/gam_rl/.venv/bin/activate" in script
