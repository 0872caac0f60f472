"""hydra/launcher=gam_rl_process: the local parallel launcher behind launcher=joblib
(conf/launcher/joblib.yaml), one process per job. Hydra imports this module when it looks for
plugins (running the module without registering it: no `from __future__ import annotations`, which
dataclasses would then fail on), so it imports nothing heavy; the work is in gam_rl/launcher.py."""

from collections.abc import Sequence
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class ProcessLauncherConf:
    _target_: str = "hydra_plugins.gam_rl_launcher.process_launcher.ProcessLauncher"
    n_jobs: int = -1  # jobs at once: n > 0, or -1 one per core (-2 all but one, ...: joblib's convention)
    start_method: str = "forkserver"  # forkserver | spawn | fork (multiprocessing's start methods)
    preload: list[str] = field(default_factory=list)  # modules the fork server imports once for every job


ConfigStore.instance().store(group="hydra/launcher", name="gam_rl_process", node=ProcessLauncherConf,
                             provider="gam_rl")


class ProcessLauncher(Launcher):
    def __init__(self, n_jobs: int = -1, start_method: str = "forkserver", preload: Sequence[str] = ()) -> None:
        self.n_jobs, self.start_method, self.preload = n_jobs, start_method, list(preload)
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.task_function, self.hydra_context = config, task_function, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from gam_rl.launcher import launch

        return launch(self, job_overrides, initial_job_idx)
