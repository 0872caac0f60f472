"""hydra/sweeper=gam_rl_tune: Hydra's Optuna sweeper, resumable (conf/hparams_search/, gam_rl/tuning.py).
Hydra imports this module when it looks for plugins, so it imports nothing heavy: Optuna and the work
are in gam_rl/tuning.py. Without hydra-optuna-sweeper installed (the project's `tune` extra) the
config node is not registered, and hparams_search says what to install."""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore

try:
    from hydra_plugins.hydra_optuna_sweeper.config import OptunaSweeperConf
    from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper
except ImportError:  # pragma: no cover - the extra is missing
    OptunaSweeperConf = OptunaSweeper = None

if OptunaSweeper is not None:

    @dataclass
    class TuneSweeperConf(OptunaSweeperConf):
        _target_: str = "hydra_plugins.gam_rl_launcher.tune_sweeper.TuneSweeper"

    ConfigStore.instance().store(group="hydra/sweeper", name="gam_rl_tune", node=TuneSweeperConf, provider="gam_rl")

    class TuneSweeper(OptunaSweeper):
        """OptunaSweeper whose n_trials is the study's total, which resumes (gam_rl.tuning)."""

        def __init__(self, *args, **kwargs) -> None:
            from gam_rl.tuning import _impl_class

            self.sweeper = _impl_class()(*args, **kwargs)
