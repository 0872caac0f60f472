"""The Training-1 cache: everything a run computes before Training-2, stored per cell.

r, CE(T, r) and r's sample statistics, lambda, the moments, Z and CE(T, p_lambda) depend only
on the keys of `key_config`, never on the Training-2 method. The first job of a cell computes
them and stores an entry; every other method of the cell loads it, so all methods compare on
the same P_lambda and a sweep pays for Training-1 once per cell.

An entry `<dir>/<key>/` holds r.pt, entry.json (the stages' typed results, timings and sample
counts, the configuration they were computed for; not named results.json, so that nothing
mistakes an entry for a run folder) and log.json (every metric the stages logged, replayed into
the new run's metrics.csv and W&B run). It is written to a temporary folder and renamed into
place while the job holds `<dir>/<key>.lock` (filelock): a job that finds the lock held waits
for the writer and then loads its entry; a writer that crashes leaves no entry (its lock dies
with it; its temporary folder is removed by the next writer of that key).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from filelock import FileLock, Timeout
from lightning.pytorch.loggers.logger import Logger

import gam_rl
from gam_rl.config_fields import setting
from gam_rl.cpu import flush_denormals
from gam_rl.files import shared_mode
from gam_rl.metrics import PolicyEval
from gam_rl.policy import LSTMPolicy
from gam_rl.stages.mle import MLEResult
from gam_rl.stages.moment_matching import MomentMatchingResult
from gam_rl.stages.partition import PartitionResult

log = logging.getLogger("gam_rl")

CACHE_FORMAT = 2
STAGES = ("r", "eval_r", "training1", "z")  # the stages an entry replaces, as named in timings / samples


@dataclass
class CacheConfig:
    """`cache` section."""

    training1: bool = True  # reuse r, lambda, Z (everything before Training-2) across the methods of a cell
    training1_dir: str | None = setting(None)  # None: $GAM_RL_CACHE/training1, else ~/.cache/gam_rl/training1


@dataclass
class Training1:
    """What a run has before Training-2: r and the typed results of the stages that made it."""

    r: LSTMPolicy
    r_fit: MLEResult
    r_eval: PolicyEval
    moments: MomentMatchingResult
    partition: PartitionResult
    timings: dict[str, float] = field(default_factory=dict)
    samples: dict[str, int] = field(default_factory=dict)
    log_calls: list = field(default_factory=list)  # [step, metrics] as the stages logged them

    @property
    def lam(self) -> torch.Tensor:
        return torch.tensor(self.moments.lam, device=self.r.device)

    def results(self) -> dict:
        """The results.json keys of these stages."""
        fit = self.r_fit
        # epochs count from 1, as in the log and t1_best_epoch (the stages' plateau counts from 0)
        return {"ce_valid_r": fit.best_val_ce, "r_epochs": fit.epochs, "r_best_epoch": fit.best_epoch + 1,
                "r_lr_decay_epochs": [e + 1 for e in fit.decay_epochs], **self.r_eval.results("r"),
                **self.moments.results(), **self.partition.results()}


def default_dir() -> Path:
    root = os.environ.get("GAM_RL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gam_rl")
    return Path(root) / "training1"


@functools.cache
def source_digest() -> str:
    """sha256 of every gam_rl/**/*.py and *.c file (path and bytes): an entry made by other code is never
    reused, even where gam_rl.__version__ was not bumped (an editable install under development)."""
    root = Path(gam_rl.__file__).parent
    digest = hashlib.sha256()
    for path in sorted([*root.rglob("*.py"), *root.rglob("*.c")]):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def key_config(cfg, device: torch.device) -> dict[str, Any]:
    """Every value the stages before Training-2 read (locations such as data.cache_dir excluded),
    plus the code versions. `threads` is left out on purpose: it may change the last bits of a
    float sum, never the algorithm, and jobs of one cell may run with different thread counts.
    Whether subnormals flush to zero is kept in: it changes values, not only their summing order
    (a subnormal becomes 0), so an entry made with GAM_RL_FLUSH_DENORMAL=0 is not one with it on."""
    return {
        "format": CACHE_FORMAT, "gam_rl": gam_rl.__version__, "source": source_digest(),
        "torch": torch.__version__, "numpy": np.__version__,
        "motif": cfg.motif.pattern, "features": asdict(cfg.features), "dataset_size": asdict(cfg.dataset_size),
        "seed": cfg.seed, "n": cfg.n, "max_len": cfg.max_len, "pools": asdict(cfg.data.pools),
        "model": asdict(cfg.model), "r": asdict(cfg.r), "training1": training1_key(cfg.training1), "z": asdict(cfg.z),
        "eval": asdict(cfg.eval), "device": device.type, "flush_denormal": flush_denormals(),
    }


def training1_key(cfg) -> dict[str, Any]:
    """The training1 section, with snis_mix's proposal as the sha256 of its pi.pt rather than its path: the
    same policy under another path is the same proposal, and a run folder trained again is another."""
    key = asdict(cfg)
    if cfg.estimator != "snis_mix":  # keys read by snis_mix only
        del key["proposal"], key["mix_r"]
    else:
        key["proposal"] = hashlib.sha256((Path(cfg.proposal) / "pi.pt").read_bytes()).hexdigest()[:20]
    return key


def cache_key(key_cfg: dict) -> str:
    return hashlib.sha256(json.dumps(key_cfg, sort_keys=True, default=str).encode()).hexdigest()[:20]


class RecordingLogger(Logger):
    """Forwards every metric to the run's logger and keeps a copy, so a cached entry can
    replay the curves of the stages it replaces."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.calls: list[list] = []

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def version(self) -> str:
        return self.inner.version

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        clean = {k: float(v) for k, v in metrics.items() if k != "epoch"}
        self.calls.append([step, clean])
        self.inner.log_metrics(metrics, step)

    def log(self, stage: str, step: int, **values: float) -> None:
        self.log_metrics({f"{stage}/{k}": v for k, v in values.items()}, step)


class Entry:
    """One key's entry, used while its lock is held (Training1Cache.entry)."""

    FILES = ("r.pt", "entry.json", "log.json")

    def __init__(self, root: Path, key: str, key_cfg: dict, waited_s: float):
        self.root, self.key, self.key_cfg, self.waited_s = root, key, key_cfg, waited_s
        self.path = root / key
        self.source_run_dir: str | None = None

    def load(self, build_r) -> Training1 | None:
        """The stored Training1 (r built by build_r() and loaded), or None when there is no
        complete entry for this configuration."""
        if not self.path.is_dir():
            return None
        try:
            meta = json.loads((self.path / "entry.json").read_text())
            if meta.get("key_config") != json.loads(json.dumps(self.key_cfg, default=str)):
                log.warning("Training-1 cache entry %s was written for another configuration: ignoring it", self.path)
                return None
            if not all((self.path / name).is_file() for name in self.FILES):
                return None
            r = build_r()
            r.load_state_dict(torch.load(self.path / "r.pt", map_location="cpu", weights_only=True)["state_dict"])
            stages = meta["stages"]
            t1 = Training1(r.eval(), MLEResult(**stages["r_fit"]), PolicyEval(**stages["r_eval"]),
                           MomentMatchingResult(**stages["moments"]), PartitionResult(**stages["partition"]),
                           meta["timings"], meta["samples"], json.loads((self.path / "log.json").read_text()))
        except Exception as err:  # torn or foreign files (truncated pickle, bad JSON, ...): not an entry
            log.warning("Training-1 cache entry %s is unreadable (%s): ignoring it", self.path, err)
            return None
        self.source_run_dir = meta.get("source_run_dir")
        return t1

    def save(self, t1: Training1, r_file: Path, run_dir: Path) -> None:
        """Write to a temporary folder and rename into place."""
        for stale in self.root.glob(f".tmp-{self.key}-*"):  # left by a writer that crashed
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{self.key}-", dir=self.root))
        shared_mode(tmp, directory=True)
        try:
            shutil.copyfile(r_file, tmp / "r.pt")
            (tmp / "log.json").write_text(json.dumps(t1.log_calls))
            stages = {"r_fit": asdict(t1.r_fit), "r_eval": asdict(t1.r_eval), "moments": asdict(t1.moments),
                      "partition": asdict(t1.partition)}
            meta = {"key": self.key, "key_config": self.key_cfg, "stages": stages, "timings": t1.timings,
                    "samples": t1.samples, "source_run_dir": str(run_dir), "created": time.time()}
            (tmp / "entry.json").write_text(json.dumps(meta, indent=2, default=str))
            if self.path.exists():  # an unusable entry found under the lock: replace it
                shutil.rmtree(self.path)
            os.rename(tmp, self.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


class Training1Cache:
    def __init__(self, root: Path):
        self.root = Path(root)

    @contextlib.contextmanager
    def entry(self, key_cfg: dict) -> Iterator[Entry]:
        """The key's entry, with its lock held for the block."""
        self.root.mkdir(parents=True, exist_ok=True)
        key = cache_key(key_cfg)
        lock = FileLock(str(self.root / f"{key}.lock"))
        start = time.perf_counter()
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("Training-1 cache: another job holds %s.lock; waiting for its entry", self.root / key)
            lock.acquire()
        try:
            yield Entry(self.root, key, key_cfg, time.perf_counter() - start)
        finally:
            lock.release()
