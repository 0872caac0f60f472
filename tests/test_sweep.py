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
from hydra import compose, initialize_config_dir, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from gam_rl import pipeline, schema, training1_cache
from gam_rl.cli import Preflight, rewrite_axes
from gam_rl.metrics import PolicyEval
from gam_rl.pipeline import Run
from gam_rl.policy import LSTMPolicy
from gam_rl.stages.mle import MLEResult
from gam_rl.stages.moment_matching import MomentMatchingResult
from gam_rl.stages.partition import PartitionResult

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# on top of sweep=table1_smoke (profile smoke, pools of 500/200/500): shorter still (keys every method has)
TINY = ["r.max_epochs=2", "training1.max_epochs=2", "z.samples=500", "z.batch_size=500", "eval.samples=200"]
CELL = "10001011111000_1001111_D{}_s1234_{}"


def env(**extra: str) -> dict:
    return dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", PYTHONUNBUFFERED="1", **extra)


def failing_method(folder: Path, fail: bool = True) -> str:
    """A method of the user's own (hydra.searchpath): the smoke distillation, made to fail in
    Training-2 (after Training-1 was computed and cached) by a proposal budget it cannot meet."""
    (folder / "method").mkdir(parents=True, exist_ok=True)
    limit = "max_proposals: 10\nproposal_batch: 5\n" if fail else ""
    (folder / "method" / "distill_x.yaml").write_text(
        "defaults:\n  - /method/distill@_here_\n  - /profile/smoke/distill@_here_\n  - _self_\n"
        f"name: distill_x\n{limit}")
    return f"hydra.searchpath=[file://{folder}]"


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
    """The jobs of a preset's hydra.sweeper.params plus command-line overrides, as gam-rl -m runs them
    (the command-line check expands them with Hydra's basic sweeper)."""
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        jobs = Preflight().jobs([f"sweep={preset}", *rewrite_axes(cli)], multirun=True)
    return [{k: v.strip("'") for k, v in (o.split("=", 1) for o in job)} for job in jobs]


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
    assert len(sweep_jobs("table1_smoke", [])) == 4 and {j["dataset_size.size"] for j in sweep_jobs(
        "table1_smoke", [])} == {"100", "200"}
    true_target = sweep_jobs("true_target", [])
    assert len(true_target) == 60 and {j["method"] for j in true_target} == {"dpg_true", "dpg_off"}
    methods = sweep_jobs("methods", ["profile=toy"])
    assert [j["method"] for j in methods] == ["dpg_off", "dpg_off_planted", "distill", "distill_qrs", "dpg_on", "pg",
                                              "kl_control", "fdpg", "fdpg_rkl", "fdpg_js", "fdpg_tv", "pcl", "ac_dpg",
                                              "ppo_dpg", "subtb", "ctl"]


def test_the_methods_preset_runs_every_registered_method():
    """The registry is the one list of methods: a method registered without a file in the methods sweep is
    caught here (each method file of the preset names its algorithm)."""
    from gam_rl.methods import registry

    chosen = {j["method"] for j in sweep_jobs("methods", ["profile=toy"])}
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        algorithms = {compose("config", overrides=[f"method={m}"]).method.algorithm for m in chosen}
    assert set(registry.methods()) <= algorithms, set(registry.methods()) - algorithms


@pytest.mark.parametrize("preset", ["table1", "table1_smoke", "true_target", "methods"])
@pytest.mark.parametrize("launcher", ["basic", "joblib", "submitit_local", "slurm"])
def test_presets_and_launchers_compose_and_validate(preset, launcher):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"sweep={preset}", f"launcher={launcher}"], return_hydra_config=True)
    target = cfg.hydra.launcher._target_
    assert {"basic": "BasicLauncher", "joblib": "ProcessLauncher", "submitit_local": "LocalLauncher",
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
        schema.load(OmegaConf.to_container(OmegaConf.create(job), resolve=True))
    finally:
        HydraConfig.instance().cfg = previous


# ---- Training-1 cache: key, lock, crash ---------------------------------------------------------

def composed(*overrides: str) -> schema.Config:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return schema.load(compose("config", overrides=rewrite_axes(["profile=smoke", *overrides])))


def key(cfg, device="cpu") -> str:
    return training1_cache.cache_key(training1_cache.key_config(cfg, torch.device(device)))


def test_cache_key_depends_on_what_training1_reads_and_nothing_else():
    base = key(composed())
    for same in (["method=distill"], ["method=dpg_true"], ["method.lr=0.5"], ["logger=csv"], ["threads=1"],
                 ["cache.training1_dir=/elsewhere"], ["data.cache_dir=/elsewhere"], ["resume=false"]):
        assert key(composed(*same)) == base, same
    for other in (["training1.lr=0.5"], ["r.max_epochs=1"], ["z.samples=123"], ["seed=4444"], ["dataset_size=1000"],
                  ["features=Mv1001111"], ["motif=1011100111001"], ["model.hidden=8"], ["eval.samples=10"],
                  ["data.pools.test=100"], ["n=29"], ["max_len=100"], ["training1.heldout=7"]):
        assert key(composed(*other)) != base, other
    assert key(composed(), "cuda") != base


def test_cache_key_tells_flushed_subnormals_from_ieee_ones(monkeypatch):
    # a subnormal flushed to 0 is another value, not another summing order: an entry computed with
    # GAM_RL_FLUSH_DENORMAL=0 must not serve a run that flushes (and the other way round)
    this_process, base = training1_cache.flush_denormals(), key(composed())
    assert training1_cache.key_config(composed(), torch.device("cpu"))["flush_denormal"] is this_process
    monkeypatch.setattr(training1_cache, "flush_denormals", lambda: not this_process)
    assert key(composed()) != base


def test_cache_key_changes_with_the_source_code(tmp_path, monkeypatch):
    base = key(composed())
    assert training1_cache.source_digest() == training1_cache.source_digest.__wrapped__()  # a pure function
    # the same package with one source byte changed: another digest, another key
    package = tmp_path / "gam_rl"
    shutil.copytree(Path(training1_cache.gam_rl.__file__).parent, package, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "estimators.py").write_text((package / "estimators.py").read_text() + "\n# changed\n")
    monkeypatch.setattr(training1_cache.gam_rl, "__file__", str(package / "__init__.py"))
    training1_cache.source_digest.cache_clear()
    try:
        assert key(composed()) != base
    finally:
        monkeypatch.undo()
        training1_cache.source_digest.cache_clear()
    assert key(composed()) == base


class _Logger:
    def __init__(self):
        self.rows = []

    def log_metrics(self, metrics, step=None):
        self.rows.append((step, dict(metrics)))


def fake_training1(counter: Path, fail: bool = False):
    """Stands in for pipeline.training1: a tiny r, typed results, one logged metric, a second of work."""
    def training1(cfg, run, data, features, logger, run_dir, device, accelerator):
        with open(counter, "a") as f:
            f.write("x")
        time.sleep(1.0)
        if fail:
            raise RuntimeError("crash in Training-1")
        r = LSTMPolicy.from_config(cfg.model)
        torch.save({"config": r.config(), "state_dict": r.state_dict()}, run_dir / "r.pt")
        logger.log_metrics({"t1/mismatch": 0.125}, 0)
        return training1_cache.Training1(
            r, MLEResult(0.7, 3, 2, 300, []), PolicyEval(0.7, 0.01, 30.0, 0.0),
            MomentMatchingResult([-1.5, 0.25], [0.1, 0.5], 0.02, 0.01, 1.5, 3, 5, True, 1000),
            PartitionResult(0.25, -1.386, 0.01, 900.0, 1000, 0.5, 0.001, 0.51, [0.1, 0.5], 0.0),
            {"r": 0.5, "training1": 0.5}, {"training1": 1000}, [[0, {"t1/mismatch": 0.125}]])
    return training1


def _stages(monkeypatch, cfg, run_dir: Path, counter: Path, fail: bool = False):
    run_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setattr(pipeline, "training1", fake_training1(counter, fail))
    run, logger = Run(cfg), _Logger()
    t1 = pipeline.training1_cached(cfg, run, None, None, logger, run_dir, torch.device("cpu"), "cpu")
    return run.results, logger.rows, t1


def test_concurrent_jobs_of_a_cell_compute_training1_once(tmp_path, monkeypatch):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    with ThreadPoolExecutor(2) as pool:  # the file lock excludes two threads as it does two jobs
        outcomes = list(pool.map(lambda i: _stages(monkeypatch, cfg, tmp_path / f"run{i}", counter), range(2)))
    assert counter.read_text() == "x"  # one writer; the other waited on the lock and reused its entry
    assert sorted(res["training1_cache"]["hit"] for res, _, _ in outcomes) == [False, True]
    waiter = next(res for res, _, _ in outcomes if res["training1_cache"]["hit"])
    assert waiter["training1_cache"]["wait_s"] > 0.3  # it did wait for the writer (1 s of work)
    assert [t1.moments.lam for _, _, t1 in outcomes] == [[-1.5, 0.25]] * 2


def test_cache_hit_restores_results_curves_and_r_and_a_changed_key_misses(tmp_path, monkeypatch):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    first, _, t1_first = _stages(monkeypatch, cfg, tmp_path / "a", counter)
    second, rows, t1 = _stages(monkeypatch, cfg, tmp_path / "b", counter)
    assert counter.read_text() == "x"
    assert first["training1_cache"]["hit"] is False and second["training1_cache"]["hit"] is True
    assert second["training1_cache"]["key"] == first["training1_cache"]["key"]
    assert second["training1_cache"]["source_run_dir"] == str(tmp_path / "a")
    assert t1.results() == t1_first.results()  # every typed result comes back
    assert second["timings"]["training1"] == 0.0 and second["training1_cache"]["source_timings"]["training1"] == 0.5
    assert rows == [(0, {"t1/mismatch": 0.125})]  # the curves are replayed into the new run
    assert (tmp_path / "b" / "r.pt").is_file()
    assert all(torch.equal(a, b) for a, b in zip(t1.r.state_dict().values(), t1_first.r.state_dict().values(),
                                                  strict=True))
    changed, _, _ = _stages(monkeypatch, composed(f"cache.training1_dir={tmp_path / 'c'}", "training1.lr=0.5"),
                            tmp_path / "d", counter)
    assert changed["training1_cache"]["hit"] is False and counter.read_text() == "xx"


def test_a_crashed_writer_leaves_no_entry(tmp_path, monkeypatch):
    cfg = composed(f"cache.training1_dir={tmp_path / 'c'}")
    counter = tmp_path / "count"
    with pytest.raises(RuntimeError, match="crash"):
        _stages(monkeypatch, cfg, tmp_path / "a", counter, fail=True)
    assert [p.name for p in (tmp_path / "c").iterdir() if not p.name.endswith(".lock")] == []
    res, _, _ = _stages(monkeypatch, cfg, tmp_path / "b", counter)
    assert res["training1_cache"]["hit"] is False and counter.read_text() == "xx"


# ---- end to end -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_smoke_script_serial_sweep_with_a_failed_job_cache_wandb_and_report(tmp_path):
    """table1_smoke.sh narrowed to one cell (dpg_off, then a distillation of the user's own that
    fails in Training-2), serial, W&B offline: the sweep goes on, the report still runs and lists
    the failure, the script exits 1."""
    sweep = tmp_path / "sweep"
    ok, bad = sweep / CELL.format(100, "dpg_off"), sweep / CELL.format(100, "distill_x")
    proc = subprocess.run([str(ROOT / "multirun_scripts" / "table1_smoke.sh"), f"hydra.sweep.dir={sweep}",
                           "dataset_size=100", "method=dpg_off,distill_x", "launcher=basic", "logger=wandb",
                           failing_method(tmp_path / "conf"), *TINY],
                          cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=240)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "at least one job failed" in out and "failed: 1, ok: 1" in out
    assert sorted(p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()) == [bad.name, ok.name]
    first, second = results(ok), results(bad)  # method is the outer loop: dpg_off ran first
    assert first["status"] == "ok" and isinstance(first["ce_test_pi"], float)
    assert second["status"] == "failed" and "max_proposals" in second["error"] and second["ce_test_pi"] is None
    assert second["stage"] == "training2"

    # Training-1 once per cell: the second method reused the first's entry, under the sweep folder
    assert first["training1_cache"]["hit"] is False and second["training1_cache"]["hit"] is True
    assert second["training1_cache"]["key"] == first["training1_cache"]["key"]
    assert Path(second["training1_cache"]["dir"]).parent == sweep / "training1_cache"
    for key in ("lambda", "ce_test_p_lambda", "z_hat", "ce_test_r", "motif_freq_r", "moments_model", "ce_valid_r"):
        assert second[key] == first[key], key
    assert all(second["timings"][s] == 0 and second["samples"][s] == 0 for s in ("r", "training1", "z"))
    assert first["samples"]["z"] > 0
    assert ",t1,0,mismatch," in (bad / "metrics.csv").read_text()  # curves replayed from the cache

    # one offline W&B run per job: group = cell, job type = method, resolved config, summary, exit code
    for job, res in ((ok, first), (bad, second)):
        info = wandb_run_info(job)
        assert info["group"] == "10001011111000_1001111_D100" and info["job_type"] == res["method"]
        assert {"profile:smoke", "seed:1234", f"sweep:{sweep.name}"} <= info["tags"]
        assert info["config"]["method"]["name"] == res["method"] and info["config"]["dataset_size"]["size"] == 100
        assert info["summary"]["status"] == res["status"]
        assert info["summary"]["ce_test_p_lambda"] == pytest.approx(res["ce_test_p_lambda"])
        assert info["summary"]["lambda/motif"] == pytest.approx(res["lambda"]["motif"])
        assert info["summary"]["training1_cache/hit"] is res["training1_cache"]["hit"]
        assert "t1/mismatch" in info["summary"] and "z/ess" in info["summary"]  # Training-1 figures, cached or not
        assert info["exit_code"] == (0 if res["status"] == "ok" else 1)
    assert "ce_test_pi" in wandb_run_info(ok)["summary"]

    report = sweep / "report"
    assert (report / "table1.md").is_file() and (report / "table1.csv").is_file()
    missing = (report / "table1.md").read_text().split("### Missing or failed", 1)[1]
    assert bad.name in missing and "failed" in missing


@pytest.mark.slow
def test_joblib_sweep_survives_a_failed_job_and_a_rerun_redoes_only_that(tmp_path):
    sweep = tmp_path / "sweep"
    ok, bad = sweep / CELL.format(100, "dpg_off"), sweep / CELL.format(100, "distill_x")
    searchpath = failing_method(tmp_path / "conf")
    proc = multirun(f"hydra.sweep.dir={sweep}", "dataset_size=100", "method=dpg_off,distill_x", "launcher=joblib",
                    "hydra.launcher.n_jobs=2", "logger=csv", searchpath, cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the sweep reports the failure ...
    assert "run failed (EstimatorError" in proc.stderr and bad.name in proc.stderr
    assert results(ok)["status"] == "ok"  # ... and the other job's results exist
    failed = results(bad)
    assert failed["status"] == "failed" and "max_proposals" in failed["error"] and failed["traceback"]
    assert failed["ce_test_p_lambda"] is not None and failed["ce_test_pi"] is None
    assert "threads: 1" in (ok / "config.yaml").read_text()  # joblib: one torch thread per job
    status = subprocess.run([sys.executable, "-m", "gam_rl.sweep", str(sweep)], capture_output=True, text=True)
    assert status.returncode == 1 and bad.name in status.stdout and "failed: 1, ok: 1" in status.stdout
    # the sweep ends with its count and the report command; each job's lines name it
    assert f"sweep {sweep}: 2 jobs: 1 ok, 0 skipped (complete), 1 failed, 0 missing" in proc.stdout
    assert f"report: gam-rl-report {sweep}" in proc.stdout
    assert f"[{ok.name}]" in proc.stdout + proc.stderr

    # re-run the same sweep (serially) with the method mended: the complete job is skipped untouched,
    # the failed one redone
    failing_method(tmp_path / "conf", fail=False)
    before = (ok / "results.json").read_bytes(), (ok / "results.json").stat().st_mtime_ns
    proc = multirun(f"hydra.sweep.dir={sweep}", "dataset_size=100", "method=dpg_off,distill_x", "logger=csv",
                    searchpath, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"skipping {ok}: its results are complete" in proc.stdout
    assert f"skipped (complete): {ok / 'results.json'}" in proc.stdout
    assert ((ok / "results.json").read_bytes(), (ok / "results.json").stat().st_mtime_ns) == before
    redone = results(bad)
    assert redone["status"] == "ok" and "has status 'failed': recomputing it" in proc.stdout
    assert redone["training1_cache"]["hit"] is True  # the failed attempt's cell had published its Training-1
    assert redone["ce_test_p_lambda"] == failed["ce_test_p_lambda"]
    status = subprocess.run([sys.executable, "-m", "gam_rl.sweep", str(sweep)], capture_output=True, text=True)
    assert status.returncode == 0 and "ok: 2" in status.stdout
    assert f"sweep {sweep}: 2 jobs: 1 ok, 1 skipped (complete), 0 failed, 0 missing" in proc.stdout


@pytest.mark.slow
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

    def recorded(*overrides):
        return schema.record(composed(*overrides))

    sweep, job = tmp_path / "sweep", tmp_path / "sweep" / "cell"
    job.mkdir(parents=True)
    (job / "config.yaml").write_text(OmegaConf.to_yaml(recorded("method.lr=0.5", "threads=2")))
    time.sleep(0.01)
    (sweep / "multirun.yaml").write_text("{}")  # a new sweep started after that job: a re-run may redo it
    assert folder_conflict(job, recorded("method.lr=0.1"), sweep) is None
    (job / "config.yaml").write_text(OmegaConf.to_yaml(recorded("method.lr=0.5", "threads=2")))  # in this sweep
    assert folder_conflict(job, recorded("method.lr=0.5"), sweep) is None  # the same job (threads aside)
    conflict = folder_conflict(job, recorded("method.lr=0.1"), sweep)
    assert conflict and "(method.lr differs)" in conflict and "_lr${method.lr}'" in conflict  # the swept key by name


def test_a_job_refused_for_a_folder_conflict_is_counted_and_reported(tmp_path):
    """Two jobs, one folder: the second records itself in folder_conflicts.json, so the sweep counts two jobs
    (1 ok, 1 failed) and the report lists the refused one under Missing or failed with why."""
    from gam_rl.report.cli import main as report
    from gam_rl.sweep import record_folder_conflict, sweep_jobs

    sweep = tmp_path / "sweep"
    job = sweep / "10001011111000_1001111_D100_s1234_distill"
    job.mkdir(parents=True)
    owner = schema.record(composed("method=distill", "dataset_size=100"))
    OmegaConf.save(OmegaConf.create(owner), job / "config.yaml")
    (job / "results.json").write_text(json.dumps({"status": "ok", "motif": "10001011111000", "features": "1001111",
                                                  "dataset_size": 100, "seed": 1234, "method": "distill",
                                                  "profile": "smoke"}))
    refused = schema.record(composed("method=distill", "dataset_size=100", "method.max_proposals=200000"))
    record_folder_conflict(sweep, job, 1, ["method.max_proposals=200000"], "folder conflict: method.max_proposals "
                           "differs", refused)
    statuses = sorted(status for _, status, _ in sweep_jobs(sweep))
    assert statuses == ["failed", "ok"]
    report([str(sweep)])
    text = (sweep / "report" / "table1.md").read_text()
    missing = text[text.index("### Missing or failed"):]
    assert "folder conflict: method.max_proposals differs" in missing


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
