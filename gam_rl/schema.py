"""The typed run configuration: its sections, their registration with Hydra, and the check.

Each section is a dataclass beside the code that reads it (config_fields.setting gives its
fields their ranges and choices); `Config` puts them together and `METHODS` says which schema
a `method` file follows. `check(container)` checks a composed, resolved configuration:
unknown keys (with a did-you-mean), types, ranges, choices, then the few rules that relate
several keys. It reports every problem at once, and a clean configuration comes back as the
typed objects the stages receive.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from gam_rl import exact
from gam_rl.config_fields import MISSING, constraint_problem, setting
from gam_rl.data import DataConfig, DatasetSizeConfig, valid_size_for
from gam_rl.features import FeatureMaskError, Features, FeaturesConfig
from gam_rl.methods import registry
from gam_rl.metrics import EvalConfig
from gam_rl.policy import LSTMPolicy, ModelConfig
from gam_rl.process import MAX_EXACT_N, MotifConfig
from gam_rl.run_io import LoggerConfig, run_problems
from gam_rl.stages.mle import MLEConfig
from gam_rl.stages.moment_matching import MIX_R_DEFAULT, MomentMatchingConfig
from gam_rl.stages.partition import ZConfig
from gam_rl.training1_cache import CacheConfig
from gam_rl.tuning import TuneConfig

DEVICES = ("auto", "cpu", "cuda")
# method.algorithm -> the dataclass of its `method` section: the registry's list (methods/registry.py)
METHODS: dict[str, type] = {name: method.config for name, method in registry.methods().items()}


@dataclass
class Config:
    """One run: a Table 1 cell (motif, features, dataset_size, seed) and one method."""

    motif: MotifConfig = MISSING
    features: FeaturesConfig = MISSING
    dataset_size: DatasetSizeConfig = MISSING
    method: Any = MISSING  # the schema METHODS[method.algorithm]
    seed: int = setting(1234, ge=0)  # model initialisation and sampling; the data depend on the motif only
    # Training-2's own seed (pi's fresh weights, its draws, its dropout), on the same r and lambda: a second seed of
    # Training-2 on one cell; None: seed + 3 (every run before this key). The run folder then ends in _t<seed>.
    training2_seed: int | None = setting(None, ge=0)
    profile: str = setting(MISSING)  # the name of the profile that set the sizes (conf/profile/)
    n: int = setting(30, ge=1, le=MAX_EXACT_N)  # string length of the data process
    max_len: int = setting(61, ge=1)  # symbols when sampling r, q, pi or P_lambda in training (2n + 1)
    device: str = setting("auto", choices=DEVICES)
    threads: int | None = setting(None, ge=1)  # torch intra-op threads; None: torch's default
    resume: bool = True  # skip a run whose folder holds complete results of this configuration
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    r: MLEConfig = field(default_factory=MLEConfig)
    training1: MomentMatchingConfig = field(default_factory=MomentMatchingConfig)
    z: ZConfig = field(default_factory=ZConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)  # a tuning sweep's (conf/hparams_search/)


def method_name(own: str, when_own: str | None = None, *, _root_: DictConfig) -> str:
    """`${method_name:own[,when_own]}`, the `name` a method file gives its runs: the name of the method file
    the run chose (Hydra's choice of the `method` group), so a variant that derives from `own` without
    setting a name is named after its own file, never after its base; when the chosen file is `own`
    itself, `when_own` (e.g. fdpg_${.divergence}) or `own`. Composed outside Hydra's app (no choice
    known), `when_own` or `own`."""
    choice = OmegaConf.select(_root_, "hydra.runtime.choices.method", default=None)
    if choice is None and HydraConfig.initialized():
        choice = HydraConfig.get().runtime.choices.get("method")
    if choice is None or choice == own:
        return when_own or own
    return str(choice)


def training2_tag(training2_seed: int | None) -> str:
    """`${t2_tag:${training2_seed}}`: the run folder's suffix for its own Training-2 seed ('' without one)."""
    return "" if training2_seed is None else f"_t{training2_seed}"


def cell_run(folder: str, *, _root_: DictConfig) -> str:
    """`${cell_run:FOLDER}`: the run folder inside FOLDER (a sweep's folder) of this job's cell and method, named as
    conf/config.yaml's hydra.sweep.subdir names it: <motif>_<features>_D<|D|>_s<seed>_<method name>. For
    training1.proposal in a sweep: each job takes the pi of its own cell from an earlier sweep."""
    keys = ("motif.pattern", "features.name", "dataset_size.size", "seed", "method.name")
    motif, features, size, seed, method = (OmegaConf.select(_root_, k, throw_on_missing=True) for k in keys)
    tag = training2_tag(OmegaConf.select(_root_, "training2_seed", default=None))
    return str(Path(folder) / f"{motif}_{features}_D{size}_s{seed}{tag}_{method}")


def register() -> None:
    """The schemas in Hydra's ConfigStore: conf/config.yaml starts from `gam_rl_schema`, and each
    method file from its algorithm's schema, /schema/method/<algorithm> (e.g. /schema/method/dpg_off)."""
    OmegaConf.register_new_resolver("method_name", method_name, replace=True)
    OmegaConf.register_new_resolver("cell_run", cell_run, replace=True)
    OmegaConf.register_new_resolver("t2_tag", training2_tag, replace=True)
    store = ConfigStore.instance()
    store.store(name="gam_rl_schema", node=Config)
    for name, config in METHODS.items():
        store.store(group="schema/method", name=name, node=config)


register()


class ConfigError(ValueError):
    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(problems))


# ---- types, ranges, unknown keys ---------------------------------------------------------------

@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _section_type(hint: Any) -> type | None:
    return hint if dataclasses.is_dataclass(hint) else None


def _type_words(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    base = args[0] if args else hint
    origin = typing.get_origin(base) or base
    words = {int: "an integer", float: "a number", bool: "true or false", str: "a string", list: "a list",
             dict: "a mapping"}.get(origin, str(base))
    return words + (" or null" if type(None) in typing.get_args(hint) else "")


def _paths(cls: type, prefix: str = "") -> list[str]:
    """Every leaf path of a schema (the method section as every method schema has it)."""
    out = []
    for name, hint in _hints(cls).items():
        if name == "method" and cls is Config:
            out += sorted({f"method.{p}" for schema in set(METHODS.values()) for p in _paths(schema)})
        elif _section_type(hint):
            out += _paths(hint, f"{prefix}{name}.")
        else:
            out.append(prefix + name)
    return out


def _leaves(value: Any, path: str) -> list[str]:
    if isinstance(value, dict) and value:
        return [leaf for k, v in value.items() for leaf in _leaves(v, f"{path}.{k}")]
    return [path]


def _unknown(path: str, siblings: list[str], prefix: str, root: type) -> str:
    """An unknown key, with the closest known one: a sibling, a key of the same name elsewhere,
    or a close path; a key of another method's schema says so."""
    every = _paths(root)
    if path in every and root is Config:  # e.g. method.replay under method=distill
        owners = sorted({name for name, cls in METHODS.items() if path[len("method."):] in _paths(cls)})
        return f"{path}: not a key of this method (it belongs to {owners})"
    leaf = path.rsplit(".", 1)[-1]
    direct = path == prefix + leaf  # not a leaf inside an unknown section
    close = [prefix + c for c in difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)] if direct else []
    close = close or [p for p in every if p.rsplit(".", 1)[-1] == leaf][:1]
    close = close or difflib.get_close_matches(path, every, n=1, cutoff=0.6)
    return f"{path}: unknown key" + (f"; did you mean {close[0]}?" if close else "")


@functools.cache
def _typed_node(cls: type) -> DictConfig:
    """One typed node per section class, reused for the type checks of every leaf assigned to it."""
    return OmegaConf.structured(cls)


def _check_section(cls: type, values: Any, prefix: str, out: list[str], root: type = Config) -> Any:
    """Check one section's values against its dataclass; the typed instance, or None on a problem.
    root: the whole configuration's dataclass (where a did-you-mean looks for keys)."""
    if not isinstance(values, dict):
        out.append(f"{prefix[:-1]}={values!r}: must be a section with the keys {list(_hints(cls))}")
        return None
    hints, found = _hints(cls), len(out)
    for key, value in values.items():
        if key not in hints:
            out += [_unknown(path, list(hints), prefix, root) for path in _leaves(value, prefix + key)]
    typed, kwargs = _typed_node(cls), {}
    for f in dataclasses.fields(cls):
        path, hint = prefix + f.name, hints[f.name]
        value = values.get(f.name, f.default)
        if isinstance(value, str) and value == MISSING:  # "???" in a file, or a schema field without a default
            out.append(f"{path}: missing; give it a value ({path}=...)")
            continue
        if f.name not in values:
            continue  # the dataclass default
        if cls is Config and f.name == "method":
            algorithm = value.get("algorithm") if isinstance(value, dict) else None
            if algorithm not in METHODS:
                out.append(f"method.algorithm={algorithm!r}: choose one of {list(METHODS)}")
            else:
                kwargs[f.name] = _check_section(METHODS[algorithm], value, "method.", out)
        elif _section_type(hint):
            kwargs[f.name] = _check_section(hint, value, path + ".", out, root)
        else:
            try:
                if hint is bool and not isinstance(value, bool):  # OmegaConf would read 3 as true
                    raise ValidationError(f"{value!r} is not a boolean")
                typed[f.name] = value  # OmegaConf's own type check and conversion
            except ValidationError:
                out.append(f"{path}={value!r}: must be {_type_words(hint)}")
                continue
            converted = typed[f.name]
            if OmegaConf.is_config(converted):
                converted = OmegaConf.to_container(converted)
            problem = constraint_problem(converted, f.metadata)
            if problem:
                choices = [str(c) for c in f.metadata.get("choices", ())]
                if isinstance(value, bool) and str(value).lower() in choices:  # YAML read true / false as a boolean
                    out.append(f"{path}={value!r}: {problem}; the command line reads {str(value).lower()} as a "
                               f"boolean: quote it, {path}='{str(value).lower()}'")
                    continue
                close = difflib.get_close_matches(str(value), choices, 1)
                out.append(f"{path}={value!r}: {problem}" + (f"; did you mean {close[0]}?" if close else ""))
            kwargs[f.name] = converted
    return cls(**kwargs) if len(out) == found else None


# ---- rules that relate several keys --------------------------------------------------------------

def cross_field_problems(cfg: Config) -> list[str]:
    out = []
    motif, n = cfg.motif.pattern, cfg.n
    if len(motif) > n:
        out.append(f"motif.pattern={motif!r}: {len(motif)} bits, longer than n={n}")
    try:
        Features.from_config(cfg.features, motif)
    except FeatureMaskError as err:
        key = "features.name" if cfg.features.use is None else "features.use"
        out.append(f"{key}={getattr(cfg.features, key.split('.')[1])!r}: {err}")
    pools, size = cfg.data.pools, cfg.dataset_size.size
    if size > pools.train:
        out.append(f"dataset_size.size={size}: above the train pool of {pools.train} strings (data.pools.train)")
    valid_size = cfg.dataset_size.valid_size or valid_size_for(size)
    if valid_size > pools.valid:
        out.append(f"dataset_size.valid_size={valid_size}: above the validation pool (data.pools.valid="
                   f"{pools.valid})")
    if cfg.max_len <= n:
        out.append(f"max_len={cfg.max_len}: the sampling limit must exceed n={n} (n bits and EOS)")
    if cfg.eval.exact and exact.max_len_problem(cfg.max_len):
        out.append(exact.max_len_problem(cfg.max_len))
    if cfg.z.estimator == "smc" and cfg.z.samples < 2 * cfg.z.particles:
        out.append(f"z.samples={cfg.z.samples} with z.estimator='smc' and z.particles={cfg.z.particles}: Z-hat's "
                   "s.e. needs at least two SMC runs; raise z.samples to 2 x z.particles or lower z.particles")
    out += _proposal_problems(cfg)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        out.append("device='cuda': CUDA is not available on this machine (use device=auto or cpu)")
    if hasattr(cfg.method, "problems"):
        out += cfg.method.problems()
    return out


def _proposal_problems(cfg: Config) -> list[str]:
    """training1.proposal: given exactly when training1.estimator=snis_mix, a finished run folder with pi.pt."""
    t1 = cfg.training1
    if t1.estimator != "snis_mix":
        out = []
        for key, value, default in (("proposal", t1.proposal, None), ("mix_r", t1.mix_r, MIX_R_DEFAULT)):
            if value != default:
                out.append(f"training1.{key}={value!r}: read only by training1.estimator=snis_mix (the estimator "
                           f"is {t1.estimator!r}); drop it or set training1.estimator=snis_mix")
        return out
    if t1.proposal is None:
        return ["training1.estimator='snis_mix': needs training1.proposal=<run folder>, a finished run whose pi.pt "
                "is mixed with r as the proposal"]
    out = run_problems(Path(t1.proposal), "training1.proposal")
    if not out:  # a pi.pt that does not load is found now, not after r's fit
        try:
            LSTMPolicy.load(Path(t1.proposal) / "pi.pt")
        except Exception as err:  # noqa: BLE001 (any failure to read it is the same problem for the user)
            out.append(f"training1.proposal={t1.proposal!r}: its pi.pt does not load as a policy "
                       f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})")
    if cfg.z.estimator == "smc":
        out.append("z.estimator='smc' with training1.estimator='snis_mix': the Z stage draws from Training-1's "
                   "mixture by importance sampling; use z.estimator=is (SMC runs from r alone)")
    return out


# ---- entry points ---------------------------------------------------------------------------------

def check(container: dict) -> tuple[Config | None, list[str]]:
    """The typed configuration of a resolved container (a plain dict without Hydra's own `hydra`
    key) and every problem found in it; the configuration is None when there is a problem."""
    out: list[str] = []
    cfg = _check_section(Config, container, "", out)
    if cfg is not None:
        out += cross_field_problems(cfg)
    return (cfg if not out else None), out


def problems(container: dict) -> list[str]:
    return check(container)[1]


def check_command(cls: type, container: dict) -> tuple[Any, list[str]]:
    """Another command's configuration (a dataclass `cls` whose problems() relates its keys): the typed
    object and every problem, with the same messages as a run's check."""
    out: list[str] = []
    typed = _check_section(cls, container, "", out, root=cls)
    if typed is not None and hasattr(typed, "problems"):
        out += typed.problems()
    return (typed if not out else None), out


def record(cfg: Config) -> dict:
    """What a run records and resumes on: the checked configuration with every default filled in."""
    return dataclasses.asdict(cfg)


def load(cfg: DictConfig | dict) -> Config:
    """Check a composed configuration and return it typed; ConfigError lists every problem."""
    if isinstance(cfg, dict):
        container = cfg
    else:  # each section resolved in place (with Hydra's section beside it, if composed with it), Hydra's left out
        container = {k: OmegaConf.to_container(v, resolve=True) if OmegaConf.is_config(v) else v
                     for k, v in cfg.items() if k != "hydra"}
    typed, found = check({k: v for k, v in container.items() if k != "hydra"})
    if found:
        raise ConfigError(found)
    return typed
