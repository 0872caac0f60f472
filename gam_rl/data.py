"""Train/validation/test splits of the exact process, cached on disk as plain text.

Pools (paper.md section 2): a train pool (20000), a validation pool (2000) and a test
set (5000), drawn i.i.d. in that order from one generator seeded by the motif alone,
so every run seed and every |D| sees the same strings. D is the first |D| lines of the
train pool (D's of different sizes are nested), V the first |V| of the validation pool.

A cache folder holds train.txt, valid.txt, test.txt (one bit string per line) and
meta.json with the key that determines them plus a SHA-256 of each file. A folder
whose key, checksums or lines do not match is rebuilt, never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gam_rl.config_fields import MISSING, setting
from gam_rl.files import shared_mode
from gam_rl.process import MotifProcess
from gam_rl.tokens import encode

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "valid", "test")


@dataclass
class PoolsConfig:
    """Strings drawn per pool (paper: 20000 / 2000 / 5000); D and V are prefixes of their pools."""

    train: int = setting(20000, ge=1)
    valid: int = setting(2000, ge=1)
    test: int = setting(5000, ge=1)


@dataclass
class DataConfig:
    """`data` section: where the split files live and how large the pools are."""

    cache_dir: str | None = None  # None: $GAM_RL_CACHE/data, else ~/.cache/gam_rl/data
    pools: PoolsConfig = setting(factory=PoolsConfig)


@dataclass
class DatasetSizeConfig:
    """`dataset_size` section (conf/dataset_size/<|D|>.yaml): |D| and |V|."""

    size: int = setting(MISSING, ge=1)  # |D|: the first `size` strings of the train pool
    valid_size: int | None = setting(None, ge=1)  # |V|; None: the paper's rule (valid_size_for)


def default_cache_dir() -> Path:
    root = os.environ.get("GAM_RL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gam_rl")
    return Path(root) / "data"


def data_seed_for(motif: str) -> int:
    """Fixed per motif, independent of the run seed."""
    return int.from_bytes(hashlib.sha256(f"gam_rl-data:{motif}".encode()).digest()[:4], "big")


def valid_size_for(dataset_size: int) -> int:
    """|V| = min(max(min(|D|,500), |D|/4), 2000) rounded down to a multiple of 500
    (500, 500, 1000, 2000, 2000 for the Table 1 sizes). Below |D| = 500 the rounding
    would give 0, so |V| = |D| there."""
    v = min(max(min(dataset_size, 500), dataset_size // 4), 2000)
    return (v // 500) * 500 or v


@dataclass
class Splits:
    """Token tensors of one run's D, V, T, plus where they came from."""

    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    data_dir: Path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cache_key(motif: str, n: int, sizes: dict[str, int]) -> dict:
    return {"format": FORMAT_VERSION, "motif": motif, "n": n, "sizes": sizes,
            "data_seed": data_seed_for(motif), "sampler": "kmp-unrank"}


def _key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]


def _check_folder(folder: Path, key: dict, process: MotifProcess) -> str | None:
    """None when the folder is a valid cache for `key`, else the reason it is not."""
    meta_path = folder / "meta.json"
    if not meta_path.exists():
        return "no meta.json"
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        return f"unreadable meta.json ({err})"
    if meta.get("key") != key:
        return "meta.json key differs from the requested data"
    for split in SPLITS:
        path = folder / f"{split}.txt"
        if not path.exists():
            return f"{split}.txt is missing"
        if meta.get("sha256", {}).get(split) != _sha256(path):
            return f"{split}.txt checksum differs from meta.json"
        lines = path.read_text().splitlines()
        if len(lines) != key["sizes"][split]:
            return f"{split}.txt has {len(lines)} lines, expected {key['sizes'][split]}"
        tokens = encode(lines)
        if not bool((process.well_formed(tokens) & process.contains_motif(tokens)).all()):
            return f"{split}.txt has lines that are not {process.n}-bit strings with the motif"
    return None


def ensure_split_files(motif: str, n: int, sizes: dict[str, int], cache_dir: Path | None = None) -> Path:
    """Return the folder holding valid split files, building (or rebuilding) it if needed."""
    process = MotifProcess(motif, n)
    key = _cache_key(motif, n, sizes)
    cache_dir = Path(cache_dir) if cache_dir else default_cache_dir()
    folder = cache_dir / f"{motif}_n{n}_{_key_digest(key)}"
    if folder.exists():
        reason = _check_folder(folder, key, process)
        if reason is None:
            return folder
        log.warning("data cache %s is invalid (%s): rebuilding it", folder, reason)
        shutil.rmtree(folder, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(key["data_seed"])
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_dir))
    shared_mode(tmp, directory=True)
    sha = {}
    for split in SPLITS:  # order matters: one generator stream, train then valid then test
        lines = process.sample_strings(sizes[split], rng)
        path = tmp / f"{split}.txt"
        path.write_text("".join(line + "\n" for line in lines))
        sha[split] = _sha256(path)
    (tmp / "meta.json").write_text(json.dumps({"key": key, "sha256": sha}, indent=2))
    try:
        os.rename(tmp, folder)  # atomic publish; fails if a concurrent job published first
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = _check_folder(folder, key, process)
        if reason is not None:
            raise RuntimeError(f"data cache {folder} is invalid after a concurrent build: {reason}") from None
    log.info("built data cache %s", folder)
    return folder


def load_splits(motif: str, n: int, dataset_size: int, valid_size: int | None, pool_sizes: dict[str, int],
                cache_dir: Path | None = None, device: torch.device | str = "cpu") -> Splits:
    valid_size = valid_size or valid_size_for(dataset_size)  # the sizes were checked with the configuration
    folder = ensure_split_files(motif, n, pool_sizes, cache_dir)

    def read(split: str, count: int) -> torch.Tensor:
        lines = (folder / f"{split}.txt").read_text().splitlines()[:count]
        return encode(lines, device)

    return Splits(read("train", dataset_size), read("valid", valid_size),
                  read("test", pool_sizes["test"]), folder)
