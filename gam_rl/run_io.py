"""What every run leaves behind: metrics.csv, the recorded keys of results.json (written atomically by
gam_rl.files), W&B."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers.logger import Logger
from lightning.pytorch.utilities import rank_zero_only

from gam_rl.config_fields import setting

LOGGER_KINDS = ("wandb", "csv")
WANDB_MODES = ("offline", "online", "disabled")


@dataclass
class LoggerConfig:
    """`logger` section (conf/logger/): metrics.csv, results.json and config.yaml are always written."""

    kind: str = setting("wandb", choices=LOGGER_KINDS)  # wandb: also a W&B run | csv: the files only
    mode: str = setting("offline", choices=WANDB_MODES)
    project: str = "gam_rl"
    entity: str | None = None
    verbose: bool = False  # false: W&B prints nothing on the console (its files are the same)

RESULT_KEYS = (
    "status", "motif", "features", "dataset_size", "seed", "method", "profile", "entropy_true",
    "ce_test_r", "ce_test_p_lambda", "ce_test_pi", "motif_freq_r", "motif_freq_pi",
    "avg_len_r", "avg_len_pi", "lambda", "moments_data", "moments_model", "z_hat",
    "timings", "samples",
)


RUN_FILES = ("config.yaml", "results.json", "r.pt", "pi.pt")  # what a finished run folder holds

# results.json keys that hold one value per feature, as {feature name: value} in the features' order
PER_FEATURE_KEYS = ("lambda", "moments_data", "moments_model")


def by_feature(results: dict, key: str) -> dict[str, float]:
    """One of PER_FEATURE_KEYS as {feature name: value}: as written since version 0.2.0 (a dict), or from a run of an
    older version that wrote a bare list beside `feature_names`."""
    values = results.get(key)
    if isinstance(values, dict):
        return dict(values)
    names = results.get("feature_names") or []
    if not isinstance(values, list) or len(values) != len(names):
        raise ValueError(f"results.json: {key!r} is neither a {{feature: value}} map nor a list as long as "
                         f"feature_names ({values!r})")
    return dict(zip(names, values, strict=True))


def code_version() -> dict:
    """Which code made a run: the package version, and where the package is a git checkout its commit and
    whether the checkout had uncommitted changes (None when git or the checkout is not there)."""
    import subprocess

    from gam_rl import __version__

    root = Path(__file__).resolve().parent.parent
    out: dict = {"version": __version__, "commit": None, "dirty": None}
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            status = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                    text=True, timeout=10)
            out.update(commit=commit.stdout.strip(), dirty=bool(status.stdout.strip()) if status.returncode == 0
                       else None)
    except (OSError, subprocess.SubprocessError):
        pass
    return out


class RunLogger(Logger):
    """Lightning logger writing long-format metrics.csv (time, stage, step, name, value) and,
    when given a W&B run, forwarding every metric to it with a run-wide step counter.

    Metric names are "<stage>/<name>"; each stage's steps restart at 0, the W&B step does not.
    """

    FIELDS = ("time", "stage", "step", "name", "value")

    def __init__(self, run_dir: Path, wandb_run=None):
        super().__init__()
        self.path = Path(run_dir) / "metrics.csv"
        self._file = open(self.path, "a", newline="")
        self._writer = csv.writer(self._file)
        if self._file.tell() == 0:
            self._writer.writerow(self.FIELDS)
        self.wandb_run = wandb_run
        self._global_step = 0
        self._start = time.time()

    @property
    def name(self) -> str:
        return "gam_rl"

    @property
    def version(self) -> str:
        return "0"

    @rank_zero_only
    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass  # the resolved config is written once, as config.yaml, by the pipeline

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        elapsed = round(time.time() - self._start, 3)
        row_step = 0 if step is None else int(step)
        clean = {}
        for key, value in metrics.items():
            if key == "epoch":
                continue
            stage, _, name = key.rpartition("/")
            value = float(value)
            self._writer.writerow((elapsed, stage or "run", row_step, name, value))
            clean[key] = value
        self._file.flush()
        if self.wandb_run is not None and clean:
            self._global_step += 1
            self.wandb_run.log(clean, step=self._global_step)

    def log(self, stage: str, step: int, **values: float) -> None:
        """Direct logging for code outside a Trainer."""
        self.log_metrics({f"{stage}/{k}": v for k, v in values.items()}, step)

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


def run_problems(path: Path, key: str = "run") -> list[str]:
    """What stops a folder from being used as a finished run (given as `key`=path): missing files, a run
    that did not end ok, a results.json without lambda."""
    if not path.is_dir():
        return [f"{key}={str(path)!r}: no such folder"]
    missing = [name for name in RUN_FILES if not (path / name).is_file()]
    if missing:
        status = ""
        if (path / "results.json").is_file():
            try:
                recorded = json.loads((path / "results.json").read_text()).get("status")
                status = f" (results.json says status {recorded!r})"
            except ValueError:
                status = " (results.json is unreadable)"
        return [f"{key}={str(path)!r}: not a finished gam-rl run folder: {', '.join(missing)} missing{status}"]
    try:
        results = json.loads((path / "results.json").read_text())
    except ValueError as err:
        return [f"{key}={str(path)!r}: results.json is unreadable ({err})"]
    if results.get("status") != "ok":
        why = str(results.get("error") or "no error recorded").splitlines()[0]
        return [f"{key}={str(path)!r}: the run did not finish (status {results.get('status')!r}: {why})"]
    if "lambda" not in results or "feature_names" not in results:
        return [f"{key}={str(path)!r}: results.json has no lambda / feature_names (a run of an older version?)"]
    return []
