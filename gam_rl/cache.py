"""Training-1 artefacts, cached by the configuration that determines them.

Everything a run computes before Training-2 (r, CE(T, r) and r's sample statistics, lambda,
the data and model moments, Z and CE(T, p_lambda)) depends only on the keys in `key_config`,
never on the Training-2 method. The first job of a cell computes it and publishes an entry;
every other method of the cell loads it, so all methods compare on the same P_lambda and a
sweep pays for Training-1 once per cell.

An entry `<dir>/<key>/` holds r.pt, state.pt (lambda and the global RNG states at the end of
the stages, so Training-2 starts from the same state as in an uncached run), entry.json
(the results the stages produced, their timings and sample counts; not named results.json,
so that nothing mistakes an entry for a run folder) and log.json (every
metric they logged, replayed into the new run's metrics.csv and W&B run). It is written to a
temporary folder and renamed into place, under an exclusive lock on `<dir>/<key>.lock`: a job
that finds the lock held waits for the writer and then reuses its entry, and a writer that
crashes leaves no entry (its lock dies with it; its temporary folder is removed by the next
writer of that key).
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning.pytorch.loggers.logger import Logger
from omegaconf import DictConfig, OmegaConf

import gam_rl

log = logging.getLogger("gam_rl")

CACHE_FORMAT = 1
STAGES = ("r", "eval_r", "training1", "z")  # the stages an entry replaces, as named in timings / samples
ENTRY_FILES = ("r.pt", "state.pt", "entry.json", "log.json")


def default_dir() -> Path:
    root = os.environ.get("GAM_RL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gam_rl")
    return Path(root) / "training1"


@functools.cache
def source_digest() -> str:
    """sha256 of every gam_rl/**/*.py file (path and bytes): an entry made by other code is never reused,
    even where gam_rl.__version__ was not bumped (an editable install under development)."""
    root = Path(gam_rl.__file__).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def key_config(cfg: DictConfig, device: torch.device) -> dict[str, Any]:
    """Every value the stages before Training-2 read (locations such as data.cache_dir excluded),
    plus the code versions. `threads` is left out on purpose: it may change the last bits of a
    float sum, never the algorithm, and jobs of one cell may run with different thread counts."""
    def plain(key: str):
        return OmegaConf.to_container(cfg[key], resolve=True)

    return {
        "format": CACHE_FORMAT, "gam_rl": gam_rl.__version__, "source": source_digest(),
        "torch": torch.__version__, "numpy": np.__version__,
        "motif": str(cfg.motif), "features": str(cfg.features), "dataset_size": cfg.dataset_size, "seed": cfg.seed,
        "n": cfg.n, "data": {"pools": plain("data")["pools"], "valid_size": cfg.data.valid_size},
        "model": plain("model"), "r": plain("r"), "training1": plain("training1"), "z": plain("z"),
        "eval": plain("eval"), "feature_max_len": cfg.feature_max_len, "log_every": cfg.log_every,
        "device": device.type,
    }


def cache_key(cfg: DictConfig, device: torch.device) -> str:
    blob = json.dumps(key_config(cfg, device), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[float]:
    """Hold an exclusive flock on lock_path; yields the seconds spent waiting for it.

    flock locks belong to the open file, so two processes (or two threads, each opening the
    file) exclude each other; the kernel drops the lock when its holder dies. On NFS, Linux
    maps flock to POSIX byte-range locks, which the server arbitrates across nodes."""
    with open(lock_path, "a") as f:
        start = time.perf_counter()
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("Training-1 cache: another job holds %s; waiting for its entry", lock_path)
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield time.perf_counter() - start
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _load(entry: Path, key_cfg: dict) -> dict | None:
    """The entry's contents, or None when it is absent or not a complete entry for key_cfg."""
    if not entry.is_dir():
        return None
    try:
        meta = json.loads((entry / "entry.json").read_text())
        if meta.get("key_config") != json.loads(json.dumps(key_cfg, default=str)):
            log.warning("Training-1 cache entry %s was written for another configuration: ignoring it", entry)
            return None
        if not all((entry / name).is_file() for name in ENTRY_FILES):
            return None
        meta["log"] = json.loads((entry / "log.json").read_text())
        meta["state"] = torch.load(entry / "state.pt", map_location="cpu", weights_only=False)
        meta["r"] = torch.load(entry / "r.pt", map_location="cpu", weights_only=True)
        return meta
    except Exception as err:  # torn or foreign files (truncated pickle, bad JSON, ...): not an entry
        log.warning("Training-1 cache entry %s is unreadable (%s): ignoring it", entry, err)
        return None


def _store(root: Path, key: str, key_cfg: dict, r_file: Path, state: dict, meta: dict, calls: list) -> Path:
    """Write the entry to a temporary folder and rename it into place (call with the key's lock held)."""
    entry = root / key
    for stale in root.glob(f".tmp-{key}-*"):  # left by a writer that crashed; only the lock holder writes here
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=root))
    try:
        shutil.copyfile(r_file, tmp / "r.pt")
        torch.save(state, tmp / "state.pt")
        (tmp / "log.json").write_text(json.dumps(calls))
        (tmp / "entry.json").write_text(json.dumps({**meta, "key": key, "key_config": key_cfg}, indent=2,
                                                     default=str))
        if entry.exists():  # an unusable entry found under the lock: replace it
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return entry


def training1_stages(cfg: DictConfig, run, logger, run_dir: Path, device: torch.device,
                     compute: Callable[[Any], tuple[torch.nn.Module, torch.Tensor]],
                     build_r: Callable[[], torch.nn.Module]) -> tuple[torch.nn.Module, torch.Tensor]:
    """Return (r, lambda) with run.results filled as if the stages had run here.

    compute(logger) runs the stages (writing run_dir/r.pt); build_r() makes an untrained r of
    the configured shape on the run's device, for loading a cached state dict into.
    """
    res = run.results
    key_cfg = key_config(cfg, device)
    key = cache_key(cfg, device)
    record = {"enabled": bool(cfg.cache.training1), "hit": False, "key": key}
    res["training1_cache"] = record
    if not cfg.cache.training1:
        return compute(logger)

    root = Path(cfg.cache.training1_dir) if cfg.cache.training1_dir else default_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        log.warning("Training-1 cache: cannot use %s (%s); computing without the cache", root, err)
        record["enabled"] = False
        return compute(logger)
    entry = root / key
    record["dir"] = str(entry)
    loaded = _load(entry, key_cfg)
    if loaded is None:
        with _exclusive(root / f"{key}.lock") as waited:
            record["wait_s"] = round(waited, 3)
            loaded = _load(entry, key_cfg)  # the job we waited for may have published it
            if loaded is None:
                before = {k: json.dumps(v, default=str) for k, v in res.items()}
                recorder = RecordingLogger(logger)
                r, lam = compute(recorder)
                produced = {k: v for k, v in res.items()
                            if k not in ("timings", "samples", "training1_cache")
                            and json.dumps(v, default=str) != before.get(k)}
                meta = {"results": produced, "source_run_dir": str(run_dir), "created": time.time(),
                        "timings": {s: res["timings"].get(s) for s in STAGES},
                        "samples": {s: res["samples"].get(s, 0) for s in STAGES}}
                state = {"lambda": lam.detach().cpu(), "r_training": r.training, "rng": _rng_state()}
                try:
                    _store(root, key, key_cfg, run_dir / "r.pt", state, meta, recorder.calls)
                    record["stored"] = True
                    log.info("Training-1 cache: stored entry %s", entry)
                except OSError as err:
                    record["stored"] = False
                    log.warning("Training-1 cache: could not store entry %s (%s); the run goes on", entry, err)
                return r, lam

    # hit: the stages' results, curves, r and RNG state as the computing job left them
    log.info("Training-1 cache: reusing entry %s (computed by %s)", entry, loaded["source_run_dir"])
    res.update(loaded["results"])
    for stage in STAGES:
        res["timings"][stage] = 0.0
        res["samples"][stage] = 0
    record.update(hit=True, stages=list(STAGES), source_run_dir=loaded["source_run_dir"],
                  source_timings=loaded["timings"], source_samples=loaded["samples"])
    for step, metrics in loaded["log"]:
        logger.log_metrics(metrics, step)
    r = build_r()
    r.load_state_dict(loaded["r"]["state_dict"])
    r.train(loaded["state"]["r_training"])
    shutil.copyfile(entry / "r.pt", run_dir / "r.pt")
    _set_rng_state(loaded["state"]["rng"])
    return r, loaded["state"]["lambda"].to(device)
