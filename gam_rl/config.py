"""Validation of a composed run config, before any work starts.

Every problem names the offending key and value; all problems are reported at once.
Bit strings typed on the command line arrive as integers (Hydra parses 1001111 as an
int), so motif and features are normalised back to strings here.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig, open_dict

from gam_rl.features import FeatureMaskError, parse_mask
from gam_rl.process import MAX_EXACT_N

ALGORITHMS = ("distill", "dpg_off", "dpg_on", "pg")
TARGETS = ("gam", "true")
INITS = ("fresh", "r")  # dpg.init
NORMALISE = ("none", "running_z")  # dpg.normalise
SWAP_GATES = ("ce_valid", "kl_is")  # dpg.swap_gate
KL_GATE_MIN_ESS = 30.0  # dpg.swap_gate=kl_is: fewer effective samples than this never swap
ESTIMATORS = ("snis_r", "rs")
PROFILES = ("paper", "cpu", "smoke")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


def _as_bits(value) -> str | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return str(value)
    return value if isinstance(value, str) else None


def _lookup(cfg: DictConfig, key: str):
    """Value at a dotted key, or None where any part is missing."""
    value = cfg
    for part in key.split("."):
        value = value.get(part) if isinstance(value, DictConfig) else None
    return value


def _positive_int(cfg: DictConfig, key: str, problems: list[str], allow_none: bool = False) -> None:
    value = _lookup(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        problems.append(f"{key}={value!r}: must be a positive integer")


def _positive_number(cfg: DictConfig, key: str, problems: list[str], allow_none: bool = False) -> None:
    value = _lookup(cfg, key)
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        problems.append(f"{key}={value!r}: must be a positive number")


def _check_method(cfg: DictConfig, problems: list[str]) -> None:
    method = cfg.get("method")
    if not isinstance(method, DictConfig):
        problems.append(f"method={method!r}: must be a method config (method=dpg_off, distill, ...)")
        return
    if not isinstance(method.get("name"), str) or not method.get("name"):
        problems.append(f"method.name={method.get('name')!r}: must be a non-empty string")
    if method.get("algorithm") not in ALGORITHMS:
        problems.append(f"method.algorithm={method.get('algorithm')!r}: choose one of {list(ALGORITHMS)}")
    if method.get("target") not in TARGETS:
        problems.append(f"method.target={method.get('target')!r}: choose one of {list(TARGETS)}")
    if method.get("algorithm") == "distill" and method.get("target") == "true":
        problems.append("method.target='true': distillation samples P_lambda by rejection from r; "
                        "the true target is only available to the DPG algorithms")


def _thins(dpg: DictConfig) -> bool:
    """Whether DPG thins its draws: fewer items kept than drawn."""
    minibatch = dpg.get("minibatch")
    kept, drawn = dpg.get("keep_per_draw") or minibatch, dpg.get("proposal_batch") or minibatch
    return all(isinstance(v, int) for v in (kept, drawn)) and kept < max(drawn, minibatch)


def dpg_size_problems(*, minibatch: int, keep_per_draw: int | None, proposal_batch: int | None, replay: int,
                      swap_gate: str) -> list[str]:
    """Sizes of a DPG schedule that are fine alone but not together; shared by the config check
    (before any work) and DPGOptions (for library callers)."""
    kept, drawn = keep_per_draw or minibatch, proposal_batch or minibatch
    problems = []
    if replay and replay < max(minibatch, kept):
        problems.append(f"dpg.replay={replay}: must be 0 or >= dpg.keep_per_draw ({kept}) and >= "
                        f"dpg.minibatch ({minibatch}): the buffer holds at least one whole draw")
    if swap_gate == "kl_is" and min(kept, drawn) < KL_GATE_MIN_ESS:
        problems.append(f"dpg.swap_gate='kl_is' with {min(kept, drawn)} items per draw: the gate swaps only on an "
                        f"effective sample size >= {KL_GATE_MIN_ESS:.0f}; raise dpg.keep_per_draw / dpg.minibatch")
    return problems


def _check_dpg_combinations(cfg: DictConfig, replay, problems: list[str]) -> None:
    """dpg.* values that are fine alone but not together (only for the DPG methods)."""
    method = cfg.get("method")
    algorithm = method.get("algorithm") if isinstance(method, DictConfig) else None
    if algorithm == "distill":
        return
    sizes = {key: cfg.dpg.get(key) for key in ("minibatch", "keep_per_draw", "proposal_batch")}
    if isinstance(replay, int) and all(isinstance(v, int) or (v is None and k != "minibatch")
                                       for k, v in sizes.items()):  # malformed values are reported above
        problems += dpg_size_problems(**sizes, replay=replay, swap_gate=cfg.dpg.get("swap_gate"))
    if (cfg.dpg.get("baseline") is True and algorithm != "pg" and method.get("target") == "true"
            and _thins(cfg.dpg)):
        problems.append("dpg.baseline=true with thinning (dpg.keep_per_draw < dpg.proposal_batch) and "
                        "method.target='true': thinning drops the zero-weight samples that the baseline "
                        "term needs, which biases the gradient; turn one of them off")


def _check_lr_decay(cfg: DictConfig, section: str, problems: list[str]) -> None:
    decays, factor = cfg[section].get("lr_decays"), cfg[section].get("lr_decay_factor")
    if isinstance(decays, bool) or not isinstance(decays, int) or decays < 0:
        problems.append(f"{section}.lr_decays={decays!r}: must be a non-negative integer (0 = plain early stopping)")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < 1:
        problems.append(f"{section}.lr_decay_factor={factor!r}: must be in (0, 1)")


def _check_schedules(cfg: DictConfig, features: str | None, problems: list[str]) -> None:
    for key in ("chunk", "samples_per_step", "buffer", "max_epochs", "patience"):
        _positive_int(cfg, f"training1.{key}", problems)
    _positive_int(cfg, "r.min_batches", problems)
    _positive_number(cfg, "training1.lr", problems)
    for key in ("samples", "batch_size"):
        _positive_int(cfg, f"z.{key}", problems)
    for key in ("size", "valid_size", "proposal_batch", "batch_size", "max_epochs", "patience"):
        _positive_int(cfg, f"distill.{key}", problems)
    for key in ("lr", "clip", "max_proposals"):
        _positive_number(cfg, f"distill.{key}", problems)
    for section in ("r", "distill"):
        _check_lr_decay(cfg, section, problems)
    for key in ("minibatch", "updates_per_epoch", "max_epochs", "patience", "max_len"):
        _positive_int(cfg, f"dpg.{key}", problems)
    _positive_number(cfg, "dpg.lr", problems)
    _positive_number(cfg, "dpg.clip", problems, allow_none=True)  # null: no clipping
    _positive_int(cfg, "dpg.proposal_batch", problems, allow_none=True)
    _positive_int(cfg, "dpg.steps_per_draw", problems)
    _positive_int(cfg, "dpg.keep_per_draw", problems, allow_none=True)
    _positive_number(cfg, "dpg.target_margin", problems)
    for key, allowed in (("dpg.init", INITS), ("distill.init", INITS), ("dpg.normalise", NORMALISE),
                         ("dpg.swap_gate", SWAP_GATES)):
        if _lookup(cfg, key) not in allowed:
            problems.append(f"{key}={_lookup(cfg, key)!r}: choose one of {list(allowed)}")
    if not isinstance(cfg.dpg.get("baseline"), bool):
        problems.append(f"dpg.baseline={cfg.dpg.get('baseline')!r}: must be true or false")
    replay = cfg.dpg.get("replay")
    if isinstance(replay, bool) or not isinstance(replay, int) or replay < 0:
        problems.append(f"dpg.replay={replay!r}: must be a non-negative integer (0 = off)")
    _check_dpg_combinations(cfg, replay, problems)
    for section in ("training1", "z", "distill"):
        _positive_int(cfg, f"{section}.max_len", problems, allow_none=True)
    if cfg.training1.get("reuse") not in ("epoch", "run"):
        problems.append(f"training1.reuse={cfg.training1.get('reuse')!r}: choose one of ['epoch', 'run']")
    _positive_int(cfg, "z.min_samples", problems)
    _positive_int(cfg, "z.tail_hits", problems)
    if cfg.z.get("rel_tol") is not None:
        _positive_number(cfg, "z.rel_tol", problems)
    estimator = cfg.training1.get("estimator")
    if estimator not in ESTIMATORS:
        problems.append(f"training1.estimator={estimator!r}: choose one of {list(ESTIMATORS)}")
    # rejection sampling bounds lambda . phi by sum_k max(lambda_k, 0): valid only for phi in [0, 1].
    # The length features M = |x| / feature_max_len leave [0, 1] once samples may be longer.
    uses_rs = {"training1": estimator == "rs",
               "distill": isinstance(cfg.get("method"), DictConfig) and cfg.method.get("algorithm") == "distill"}
    has_length = isinstance(features, str) and any(c in features[:-7] for c in "Mv")
    n, cap = cfg.get("n"), cfg.get("feature_max_len")
    if has_length and isinstance(n, int) and isinstance(cap, int):
        for section, active in uses_rs.items():
            max_len = cfg[section].get("max_len") or 2 * n + 1
            if active and isinstance(max_len, int) and max_len > cap:
                problems.append(
                    f"{section}.max_len={max_len}: rejection sampling needs features in [0, 1], but with "
                    f"features={features!r} the length feature M = |x|/{cap} exceeds 1 for samples longer "
                    f"than feature_max_len={cap}; lower {section}.max_len or raise feature_max_len")


def validate(cfg: DictConfig) -> DictConfig:
    """Normalise motif/features to strings and check every key a run uses."""
    problems: list[str] = []
    n = cfg.get("n")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXACT_N:
        problems.append(f"n={n!r}: must be an integer in [1, {MAX_EXACT_N}]")
        n = None

    motif = _as_bits(cfg.get("motif"))
    if motif is None or not motif:
        problems.append(f"motif={cfg.get('motif')!r}: must be a non-empty bit string")
    elif set(motif) - {"0", "1"}:
        problems.append(f"motif={motif!r}: only the characters 0 and 1 are allowed")
    elif n is not None and len(motif) > n:
        problems.append(f"motif={motif!r}: length {len(motif)} is longer than n={n}")

    features = _as_bits(cfg.get("features"))
    if features is None:
        problems.append(f"features={cfg.get('features')!r}: must be a mask string such as 1001111")
    elif motif and not (set(motif) - {"0", "1"}):
        try:
            parse_mask(features, motif)
        except FeatureMaskError as err:
            problems.append(f"features={features!r}: {err}")

    _positive_int(cfg, "data.pools.train", problems)
    _positive_int(cfg, "data.pools.valid", problems)
    _positive_int(cfg, "data.pools.test", problems)
    pools = cfg.data.pools
    size = cfg.get("dataset_size")
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        problems.append(f"dataset_size={size!r}: must be a positive integer")
    elif isinstance(pools.train, int) and size > pools.train:
        problems.append(f"dataset_size={size}: above the train pool of {pools.train} strings (data.pools.train)")
    valid_size = cfg.data.get("valid_size")
    if valid_size is not None:
        _positive_int(cfg, "data.valid_size", problems)
        if isinstance(valid_size, int) and isinstance(pools.valid, int) and valid_size > pools.valid:
            problems.append(f"data.valid_size={valid_size}: above the validation pool (data.pools.valid={pools.valid})")

    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        problems.append(f"seed={seed!r}: must be a non-negative integer")

    _check_method(cfg, problems)
    if cfg.get("profile") not in PROFILES:
        problems.append(f"profile={cfg.get('profile')!r}: unknown profile; choose one of {list(PROFILES)}")

    device = cfg.get("device")
    if device not in DEVICES:
        problems.append(f"device={device!r}: choose one of {list(DEVICES)}")
    elif device == "cuda" and not torch.cuda.is_available():
        problems.append("device='cuda': CUDA is not available on this machine (use device=auto or cpu)")
    if cfg.get("threads") is not None:
        _positive_int(cfg, "threads", problems)

    _positive_int(cfg, "model.hidden", problems)
    _positive_int(cfg, "model.layers", problems)
    dropout = cfg.model.get("dropout")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        problems.append(f"model.dropout={dropout!r}: must be in [0, 1)")
    _positive_int(cfg, "feature_max_len", problems)
    _positive_number(cfg, "r.lr", problems)
    _positive_int(cfg, "r.batch_size", problems, allow_none=True)
    _positive_int(cfg, "r.max_epochs", problems)
    _positive_int(cfg, "r.patience", problems)
    _positive_number(cfg, "r.clip", problems)
    _positive_int(cfg, "eval.samples", problems)
    _positive_int(cfg, "eval.max_len", problems)
    _positive_int(cfg, "eval.batch_size", problems)
    _positive_int(cfg, "log_every", problems)
    _check_schedules(cfg, features, problems)

    if problems:
        raise ConfigError(problems)
    with open_dict(cfg):
        cfg.motif, cfg.features = motif, features
    return cfg


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
