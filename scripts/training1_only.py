"""Run only the stages before Training-2 (r, its evaluation, Training-1, Z) of one configuration and
print what they measured on the validation set, with their seconds: how the per-|D| schedules in
conf/dataset_size/<profile>/ are chosen (on V, on a cell other than the one reported).

usage: python scripts/training1_only.py [--stream-seed S] [gam-rl overrides ...]
  e.g. python scripts/training1_only.py motif=1011100111001 seed=4444 dataset_size=10000 r.batch_size=250
--stream-seed S: the same D, V and T (drawn from `seed`), but every later random stream (r's start,
  dropout and batches, Training-1's and Z's draws) from S instead: the run-to-run spread of a cell.
One JSON line per run goes to stdout; progress to stderr. Nothing is cached or written elsewhere.
"""

import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_module

from gam_rl import schema
from gam_rl.cli import _quiet_lightning, check_command_line
from gam_rl.features import Features
from gam_rl.pipeline import Run, load_data, resolve_device, training1


class _NoLogger:
    def log_metrics(self, metrics, step=None):
        pass


def main(argv: list[str]) -> None:
    stream_seed = None
    if argv[:1] == ["--stream-seed"]:
        if len(argv) < 2 or not argv[1].lstrip("-").isdigit():
            sys.exit(f"--stream-seed needs an integer, got {argv[1] if len(argv) > 1 else 'nothing'}")
        stream_seed, argv = int(argv[1]), argv[2:]
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(message)s")
    _quiet_lightning()
    args, problems = check_command_line(argv)
    if problems:
        sys.exit("invalid configuration:\n  - " + "\n  - ".join(problems))
    with initialize_config_module("gam_rl.conf", version_base="1.3"):
        cfg = schema.load(compose("config", overrides=args))
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    import lightning.pytorch as pl

    pl.seed_everything(cfg.seed, workers=False, verbose=False)
    run = Run(cfg)
    data = load_data(cfg, run, device)
    features = Features.from_config(cfg.features, cfg.motif.pattern)
    if stream_seed is not None:  # the data are drawn: from here on every stream follows stream_seed
        cfg.seed = stream_seed
        pl.seed_everything(stream_seed, workers=False, verbose=False)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        accelerator = "gpu" if device.type == "cuda" else "cpu"
        t1 = training1(cfg, run, data, features, _NoLogger(), Path(tmp), device, accelerator)
    out = {"overrides": argv, "stream_seed": stream_seed, "seconds": round(time.time() - started, 1),
           "timings": run.results["timings"],
           "samples": run.results["samples"], **{k: v for k, v in t1.results().items()
                                                  if k not in ("lambda", "moments_data", "moments_model")}}
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
