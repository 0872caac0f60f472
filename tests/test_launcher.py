"""The local launcher (launcher=joblib: gam_rl/launcher.py through hydra_plugins/gam_rl_launcher): a job
whose process dies, or whose folder Hydra cannot make, is recorded as failed with the reason, and
every other job of the sweep runs to its end; the sweep's count has every job; a re-run redoes only
the lost one.

The sweeps are a tiny Hydra app of the test's own (its task writes results.json as gam-rl does, and
one job kills itself with SIGKILL, as the out-of-memory killer would), run through the launcher in a
subprocess: seconds, no training, nothing added to gam-rl's configuration.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from gam_rl.launcher import jobs_at_once
from gam_rl.sweep import LOST_JOBS, lost_jobs, sweep_jobs, sweep_summary

APP = '''
import json, os, signal, time
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig


@hydra.main(config_path=".", config_name="app", version_base="1.3")
def task(cfg):
    folder = Path(HydraConfig.get().runtime.output_dir)
    (folder / "results.json").write_text(json.dumps({"status": "running", "job": cfg.job}))
    marker = Path(HydraConfig.get().sweep.dir) / "dying"
    if cfg.job == cfg.dies:
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    if cfg.job == cfg.waits:  # runs beside the dying job: it must outlive it
        deadline = time.time() + 60
        while not marker.exists() and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)
        assert marker.exists(), "the job that dies never started beside this one"
    (folder / "results.json").write_text(json.dumps({"status": "ok", "job": cfg.job, "pid": os.getpid()}))


if __name__ == "__main__":
    from gam_rl.launcher import register

    register()  # as gam-rl does: Hydra's own search misses the plugin in an editable install
    task()
'''

CONFIG = {"defaults": [{"override hydra/launcher": "gam_rl_process"}, "_self_"],
          "job": "a", "dies": "none", "waits": "none",
          "hydra": {"launcher": {"n_jobs": 2}, "sweep": {"subdir": "${job}"}}}


def sweep(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    app = tmp_path / "app"
    app.mkdir(exist_ok=True)
    (app / "app.py").write_text(APP)
    (app / "app.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(CONFIG)))
    env = dict(os.environ, HYDRA_FULL_ERROR="1")
    return subprocess.run([sys.executable, str(app / "app.py"), "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
                           *overrides], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)


def status(folder: Path) -> dict:
    return json.loads((folder / "results.json").read_text())


def test_a_killed_job_is_recorded_and_the_others_run_to_their_end(tmp_path):
    proc = sweep(tmp_path, "job=a,b,c", "dies=b", "waits=a")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out  # the sweep says a job failed, at the end
    root = tmp_path / "sweep"
    # a ran beside b while b died, and c started after: both ran to their end, in processes of their own
    assert status(root / "a")["status"] == "ok" and status(root / "c")["status"] == "ok"
    assert status(root / "a")["pid"] != status(root / "c")["pid"]
    dead = status(root / "b")
    assert dead["status"] == "failed" and dead["job"] == "b"  # the job's own keys are kept
    assert dead["error"].startswith("lost: its process was killed by SIGKILL after ")
    assert "job #1 lost" in out and "killed by SIGKILL" in out
    entry = lost_jobs(root)[str(root / "b")]
    assert entry["error"] == dead["error"] and entry["job"] == 1 and "job=b" in entry["overrides"]
    assert entry["config"]["job"] == "b"
    jobs = {path.name: (state, error) for path, state, error in sweep_jobs(root)}
    assert {name: state for name, (state, _) in jobs.items()} == {"a": "ok", "b": "failed", "c": "ok"}
    assert sweep_summary(root, 0.0).startswith(f"sweep {root}: 3 jobs: 2 ok, 0 skipped (complete), 1 failed, 0 missing")


def test_a_file_where_a_jobs_folder_goes_fails_that_job_only_and_a_rerun_redoes_it(tmp_path):
    root = tmp_path / "sweep"
    root.mkdir()
    (root / "b").write_text("not a folder")  # Hydra's mkdir of the job folder raises FileExistsError
    proc = sweep(tmp_path, "job=a,b,c")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert status(root / "a")["status"] == "ok" and status(root / "c")["status"] == "ok"
    assert (root / "b").is_file()  # nothing written over it
    entry = lost_jobs(root)[str(root / "b")]
    assert entry["error"].startswith("lost: Hydra's job set-up failed: FileExistsError") and entry["job"] == 1
    jobs = {path.name: (state, error) for path, state, error in sweep_jobs(root)}
    assert jobs["b"] == ("failed", entry["error"]) and jobs["a"][0] == jobs["c"][0] == "ok" and len(jobs) == 3
    status_tool = subprocess.run([sys.executable, "-m", "gam_rl.sweep", str(root)], capture_output=True, text=True)
    assert status_tool.returncode == 1 and "jobs: 3; failed: 1, ok: 2" in status_tool.stdout
    assert f"failed  {root / 'b'}  (lost: Hydra's job set-up failed: FileExistsError" in status_tool.stdout

    (root / "b").unlink()  # the cause gone, a re-run gives the job its result and forgets it was lost
    proc = sweep(tmp_path, "job=b")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert status(root / "b")["status"] == "ok" and not (root / LOST_JOBS).exists()


def test_jobs_at_once_follows_joblibs_n_jobs():
    cores = len(os.sched_getaffinity(0))
    assert jobs_at_once(3, 10) == 3 and jobs_at_once(3, 2) == 2
    assert jobs_at_once(-1, 1000) == cores and jobs_at_once(-2, 1000) == max(1, cores - 1)
