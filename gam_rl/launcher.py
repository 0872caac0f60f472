"""The local parallel launcher (launcher=joblib, conf/launcher/joblib.yaml): the jobs of a sweep on
one machine, at most `n_jobs` at a time, each in a process of its own, so that one job's death is
that job's alone.

hydra-joblib-launcher, which this replaces, runs jobs in a pool of loky workers: when one worker
dies (kill -9, the kernel's out-of-memory killer), loky breaks the pool and every running job dies
with it, and an exception in Hydra's own set-up of one job (its folder cannot be made) ends the
sweep. Here every job is a fresh process, forked from multiprocessing's fork server, which has
imported the `preload` modules once (gam_rl, torch, lightning: seconds a job would otherwise pay),
and the sweep's process waits for any of them to end:

- a job that ends normally sends back its JobReturn (a failure of the job's own code is in it and
  in its results.json, as with any launcher);
- a job whose process dies before that (a signal, an exit), or whose set-up by Hydra raises, is
  *lost*: its results.json gets `status: failed` and the reason (the launcher makes the file, and
  the folder, when the job had not), the sweep folder's lost_jobs.json (gam_rl.sweep.LOST_JOBS)
  records it with its configuration (the one record when its folder cannot be made: gam_rl.sweep
  and the report count it from there), and the next job starts. The job's JobReturn is a failure
  (JobLost), so the sweep exits 1 at the end as for any failed job.

On Ctrl-C or SIGTERM to the sweep's process no new job starts; the running jobs get the signal
(Ctrl-C reaches them from the terminal, SIGTERM is passed on, SIGINT after 5 s) and GRACE_S to
record themselves (results.json: interrupted), then are killed; the sweep exits 130 / 143.
"""

from __future__ import annotations

import copy
import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import cloudpickle
import yaml
from hydra.core.hydra_config import HydraConfig
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gam_rl.files import atomic_write_json
from gam_rl.sweep import LOST_JOBS, lost_jobs
from hydra_plugins.gam_rl_launcher.process_launcher import ProcessLauncher

log = logging.getLogger(__name__)

START_METHODS = ("forkserver", "spawn", "fork")
GRACE_S = 30.0  # after Ctrl-C / SIGTERM: how long the running jobs get to record themselves before a kill
FORWARD_SIGINT_S = 5.0  # a SIGINT sent to the sweep's process alone is passed on to the jobs after this


class JobLost(RuntimeError):
    """A job of a sweep ended without a result of its own: its process died, or Hydra's set-up of the
    job failed before the job's code started (the other jobs went on)."""


class _Stopped(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def register() -> None:
    """Make sure Hydra knows the launcher (gam-rl calls this before Hydra starts). Hydra finds plugins
    by listing the folders of the hydra_plugins namespace package; an editable install of gam_rl
    (pip install -e, setuptools >= 64) has none to list: the plugin is importable but never found
    (Hydra issue #2359). Importing it here registers its config node (hydra/launcher=gam_rl_process); the
    same for the tuning sweeper (hydra/sweeper=gam_rl_tune) when hydra-optuna-sweeper is installed."""
    from hydra.core.plugins import Plugins

    from hydra_plugins.gam_rl_launcher.tune_sweeper import TuneSweeper

    plugins = Plugins.instance()
    for plugin in (ProcessLauncher, TuneSweeper):
        if plugin is not None and f"{plugin.__module__}.{plugin.__name__}" not in plugins.class_name_to_class:
            plugins.register(plugin)


def jobs_at_once(n_jobs: int, jobs: int) -> int:
    """joblib's convention: n_jobs > 0 runs that many at once; -1 one per core, -2 all cores but one, ..."""
    if n_jobs == 0:
        raise ValueError("hydra.launcher.n_jobs=0: give the number of jobs at once (-1: one per core)")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    wanted = n_jobs if n_jobs > 0 else cores + 1 + n_jobs
    return max(1, min(wanted, jobs))


def job_folder(sweep_config: DictConfig) -> str:
    """The job's folder, as Hydra's run_job names it (HydraConfig set to the job's config)."""
    return os.path.abspath(os.path.join(str(OmegaConf.select(sweep_config, "hydra.sweep.dir")),
                                        str(OmegaConf.select(sweep_config, "hydra.sweep.subdir"))))


def task_yaml(sweep_config: DictConfig) -> str:
    """The job's configuration without its hydra section, resolved where it can be (HydraConfig set to
    the job's config), else as Hydra saves it in .hydra/config.yaml."""
    task = copy.deepcopy(sweep_config)
    with read_write(task), open_dict(task):
        del task["hydra"]
    try:
        return OmegaConf.to_yaml(task, resolve=True)
    except Exception:
        return OmegaConf.to_yaml(task)


# ---- a job's process --------------------------------------------------------------------------------

def _send(conn, message: tuple) -> None:
    conn.send_bytes(cloudpickle.dumps(message))


def run_one(shared: bytes, idx: int, overrides: list[str], env: dict[str, str], conn) -> None:
    """One job, in its own process: Hydra's set-up and the task, as hydra-joblib-launcher's execute_job
    runs them; every step is reported on conn (started: the folder and configuration; task: the job's
    own code began; done: its JobReturn; error: what ended it otherwise)."""
    os.environ.clear()  # the sweep process's environment now, not the fork server's from its start
    os.environ.update(env)
    try:
        hydra_context, config, task_function, singleton_state = cloudpickle.loads(shared)
        setup_globals()
        Singleton.set_state(singleton_state)
        sweep_config = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{idx}"
            sweep_config.hydra.job.num = idx
        HydraConfig.instance().set_config(sweep_config)
        _send(conn, ("started", job_folder(sweep_config), task_yaml(sweep_config)))

        def task(cfg: DictConfig) -> Any:
            _send(conn, ("task",))
            return task_function(cfg)

        ret = run_job(hydra_context=hydra_context, config=sweep_config, task_function=task,
                      job_dir_key="hydra.sweep.dir", job_subdir_key="hydra.sweep.subdir")
    except BaseException as err:  # Hydra's set-up raised, or the task raised past run_job (an interrupt)
        if isinstance(err, KeyboardInterrupt) or hasattr(err, "exit_code"):  # Ctrl-C, gam_rl.cli.Interrupted
            message = f"interrupted ({getattr(err, 'name', 'SIGINT')})"
        else:
            message = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
        _send(conn, ("error", message, traceback.format_exc()))
        conn.close()
        code = err.code if isinstance(err, SystemExit) else getattr(err, "exit_code", None)
        sys.exit(code if isinstance(code, int) and code else 130 if isinstance(err, KeyboardInterrupt) else 1)
    try:
        message = cloudpickle.dumps(("done", ret))
    except Exception as err:  # a return value or exception that cannot be pickled: say what it was
        ret.return_value = None if ret.status == JobStatus.COMPLETED else RuntimeError(repr(ret._return_value))
        log.warning("the job's result could not be sent back whole (%s)", err)
        message = cloudpickle.dumps(("done", ret))
    conn.send_bytes(message)
    conn.close()


# ---- the sweep's process ----------------------------------------------------------------------------

@dataclass
class _Job:
    idx: int
    overrides: list[str]
    process: Any = None
    conn: Any = None
    started: float = 0.0
    folder: str | None = None
    config_yaml: str | None = None
    task_started: bool = False
    exitcode: int | None = None
    result: JobReturn | None = None
    error: str | None = None
    traceback: str | None = None


class _Sweep:
    def __init__(self, launcher, sweep_dir: Path):
        self.launcher, self.sweep_dir = launcher, sweep_dir
        method = launcher.start_method
        if method not in START_METHODS:
            raise ValueError(f"hydra.launcher.start_method={method}: one of {', '.join(START_METHODS)}")
        if method not in multiprocessing.get_all_start_methods():
            method = "spawn"
        self.context = multiprocessing.get_context(method)
        if method == "forkserver":
            self.context.set_forkserver_preload(list(launcher.preload))
        self.method = method
        self.lost = lost_jobs(sweep_dir)
        self.shared = b""

    # -- starting and watching jobs

    def start(self, job: _Job) -> None:
        reader, writer = self.context.Pipe(duplex=False)
        job.process = self.context.Process(target=run_one, name=f"gam-rl job #{job.idx}",
                                           args=(self.shared, job.idx, job.overrides, dict(os.environ), writer))
        job.process.start()
        writer.close()
        job.conn, job.started = reader, time.time()

    def receive(self, job: _Job) -> None:
        try:
            data = job.conn.recv_bytes()
        except (EOFError, OSError):
            job.conn.close()
            job.conn = None
            return
        try:
            kind, *rest = cloudpickle.loads(data)
        except Exception as err:
            job.error = f"its report could not be read ({type(err).__name__}: {err})"
            return
        if kind == "started":
            job.folder, job.config_yaml = rest
        elif kind == "task":
            job.task_started = True
        elif kind == "done":
            job.result = rest[0]
        elif kind == "error":
            job.error, job.traceback = rest

    def poll(self, running: list[_Job], timeout: float | None) -> list[_Job]:
        """Read what the running jobs sent; the jobs whose processes ended (and were joined)."""
        conns = {job.conn: job for job in running if job.conn is not None}
        sentinels = {job.process.sentinel: job for job in running}
        ready = wait([*conns, *sentinels], timeout)
        for obj in ready:
            if obj in conns:
                self.receive(conns[obj])
        ended = []
        for obj in ready:
            if obj in sentinels:
                job = sentinels[obj]
                while job.conn is not None and job.conn.poll():  # what it sent before it ended, then EOF
                    self.receive(job)
                job.process.join()
                job.exitcode = job.process.exitcode
                job.process.close()  # its sentinel's file descriptor: a long sweep would run out of them
                ended.append(job)
        return ended

    # -- the outcome of a job

    def finish(self, job: _Job) -> JobReturn:
        if job.result is not None:
            if job.folder in self.lost:  # an earlier sweep lost it; this one gave it a result
                self.update_lost(job.folder, None)
            return job.result
        reason = self.reason(job)
        where = self.record_lost(job, reason)
        log.error("job #%d lost (%s): %s; recorded in %s", job.idx, job.folder or " ".join(job.overrides), reason,
                  where)
        if job.traceback and not job.task_started and not reason.startswith("interrupted"):
            log.error("job #%d: %s", job.idx, job.traceback.rstrip())
        ret = JobReturn()
        ret.overrides = job.overrides
        ret.status = JobStatus.FAILED
        ret.return_value = JobLost(f"job #{job.idx} ({job.folder or ' '.join(job.overrides)}) lost: {reason}")
        return ret

    def reason(self, job: _Job) -> str:
        seconds = f"{time.time() - job.started:.0f} s"
        if job.error and job.error.startswith("interrupted"):
            return f"{job.error} {'after ' + seconds if job.task_started else 'before the job started'}"
        if job.error:
            return (f"{job.error} (raised after {seconds} in the job's own code)" if job.task_started
                    else f"Hydra's job set-up failed: {job.error}")
        code = job.exitcode
        if code is not None and code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            why = " (the out-of-memory killer, or kill -9)" if -code == signal.SIGKILL else ""
            return f"its process was killed by {name} after {seconds}{why}"
        return f"its process exited with code {code} after {seconds} without a result"

    def compose(self, job: _Job) -> None:
        """The folder and configuration of a job that died before it said them (rare: composed here)."""
        launcher = self.launcher
        previous = HydraConfig.instance().cfg
        try:
            sweep_config = launcher.hydra_context.config_loader.load_sweep_config(launcher.config, job.overrides)
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = f"{sweep_config.hydra.job.name}_{job.idx}"
                sweep_config.hydra.job.num = job.idx
            HydraConfig.instance().set_config(sweep_config)
            job.folder, job.config_yaml = job_folder(sweep_config), task_yaml(sweep_config)
        except Exception as err:
            log.warning("job #%d: its folder cannot be named (%s: %s)", job.idx, type(err).__name__, err)
        finally:
            HydraConfig.instance().cfg = previous

    def record_lost(self, job: _Job, reason: str) -> str:
        """results.json in the job's folder (made if need be) says failed and why, unless the job
        recorded its own end; lost_jobs.json records the job with its configuration (what identifies
        it where its folder cannot). Returns where it is recorded."""
        if job.folder is None:
            self.compose(job)
        config = None
        try:
            config = yaml.safe_load(job.config_yaml) if job.config_yaml else None
            json.dumps(config)
        except (yaml.YAMLError, TypeError, ValueError):
            config = None
        error, written, problem = f"lost: {reason}", [], None
        if job.folder is not None:
            folder = Path(job.folder)
            try:
                folder.mkdir(parents=True, exist_ok=True)
                results = _read_json(folder / "results.json")
                if results.get("status") in (None, "running"):  # a job that wrote failed or ok itself keeps it
                    results.update(status="failed", error=error)
                    atomic_write_json(folder / "results.json", results)
                written.append(str(folder / "results.json"))
            except OSError as err:  # e.g. a file where the folder should be, a full disk
                problem = f"{type(err).__name__}: {err}"
        if problem and problem not in reason:
            error += f"; its folder cannot hold a results.json ({problem})"
        entry = {"job": job.idx, "overrides": job.overrides, "error": error, "config": config, "time": time.time()}
        if self.update_lost(job.folder or f"#{job.idx}", entry):
            written.append(str(self.sweep_dir / LOST_JOBS))
        return " and ".join(written) or "nowhere (see the messages above)"

    def update_lost(self, key: str, entry: dict | None) -> bool:
        if entry is None:
            self.lost.pop(key, None)
        else:
            self.lost[key] = entry
        path = self.sweep_dir / LOST_JOBS
        try:
            if self.lost:
                atomic_write_json(path, self.lost)
            else:
                path.unlink(missing_ok=True)
        except OSError as err:
            log.error("cannot write %s: %s", path, err)
            return False
        return True

    # -- interruption

    def interrupt(self, running: list[_Job], signum: int) -> None:
        """No new job; the running ones get the signal and GRACE_S to record themselves, then are killed."""
        name = signal.Signals(signum).name
        log.error("%s: no new job starts; waiting for the %d running to record themselves", name, len(running))
        start = time.time()
        forward_at = start + (0.0 if signum != signal.SIGINT else FORWARD_SIGINT_S)
        forwarded = killed = False
        try:
            while running:
                now = time.time()
                if not forwarded and now >= forward_at:
                    for job in running:
                        _signal(job, signum)
                    forwarded = True
                if not killed and now >= start + GRACE_S:
                    for job in running:
                        _signal(job, signal.SIGKILL)
                    killed = True
                for job in self.poll(running, timeout=0.5):
                    running.remove(job)
                    self.finish(job)
        except BaseException:  # a second Ctrl-C: no more waiting
            for job in running:
                _signal(job, signal.SIGKILL)
            raise


def _signal(job: _Job, signum: int) -> None:
    try:
        os.kill(job.process.pid, signum)
    except ProcessLookupError:
        pass


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def launch(launcher, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
    """Run a batch of jobs (hydra_plugins.gam_rl_launcher's Launcher.launch); their JobReturns in order."""
    setup_globals()
    assert launcher.config is not None and launcher.task_function is not None and launcher.hydra_context is not None
    configure_log(launcher.config.hydra.hydra_logging, launcher.config.hydra.verbose)
    sweep_dir = Path(str(launcher.config.hydra.sweep.dir))
    sweep_dir.mkdir(parents=True, exist_ok=True)
    sweep = _Sweep(launcher, sweep_dir)
    at_once = jobs_at_once(launcher.n_jobs, len(job_overrides))
    log.info("Launching %d jobs, %d at a time, each in a process of its own (%s), sweep output dir : %s",
             len(job_overrides), at_once, sweep.method, sweep_dir)
    for idx, overrides in enumerate(job_overrides):
        log.info("\t#%d : %s", initial_job_idx + idx, " ".join(filter_overrides(overrides)))
    sweep.shared = cloudpickle.dumps((launcher.hydra_context, launcher.config, launcher.task_function,
                                      Singleton.get_state()))
    jobs = [_Job(initial_job_idx + idx, list(overrides)) for idx, overrides in enumerate(job_overrides)]
    waiting, running, returns = deque(jobs), [], {}

    def stop(signum, frame):
        raise _Stopped(signum)

    previous = None
    try:
        previous = signal.signal(signal.SIGTERM, stop)
    except ValueError:  # not the main thread: SIGTERM keeps its handler
        pass
    try:
        while waiting or running:
            while waiting and len(running) < at_once:
                job = waiting.popleft()
                sweep.start(job)
                running.append(job)
            for job in sweep.poll(running, timeout=None):
                running.remove(job)
                returns[job.idx] = sweep.finish(job)
    except (KeyboardInterrupt, _Stopped) as err:
        signum = err.signum if isinstance(err, _Stopped) else signal.SIGINT
        sweep.interrupt(running, signum)
        log.error("%s: the sweep stopped; %d job(s) had not started (re-run with the same hydra.sweep.dir to "
                  "finish)", signal.Signals(signum).name, len(waiting))
        raise SystemExit(128 + signum) from None
    except BaseException:  # the launcher itself failed: no job outlives the sweep
        for job in running:
            _signal(job, signal.SIGKILL)
        raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return [returns[job.idx] for job in jobs]
