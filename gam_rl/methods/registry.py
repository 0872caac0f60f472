"""The one list of Training-2 methods: `algorithm` name -> (config class, train function).

A method's own file registers it at import (`register(Method(...))`); `methods()` imports every
module of the gam_rl.methods package first, so a new file in that folder is found without being
named anywhere else. The schema (which config class checks `method.*`), the Hydra ConfigStore
(`/schema/method/<algorithm>`), the pipeline, the sweep presets' check and the scripts read this
registry; no code outside a method's own file tests a method's name.
"""

from __future__ import annotations

import copy
import functools
import importlib
import logging
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.metrics import policy_cross_entropy

log = logging.getLogger("gam_rl")


@dataclass(frozen=True)
class Method:
    algorithm: str  # the value of `method.algorithm` that selects it
    config: type  # its dataclass: the schema of the `method` section, keys it uses only
    train: Callable[..., Training2Result]  # train(cfg, inputs: Training2Inputs) -> Training2Result
    summary: str = ""  # one line for `gam-rl --help` and the docs


_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add a method (at import of its module). Registering another method under a taken name is
    an error: two files would otherwise silently fight over one `algorithm`."""
    known = _REGISTRY.get(method.algorithm)
    if known is not None and known.train is not method.train:
        raise ValueError(f"Training-2 method {method.algorithm!r} is registered twice "
                         f"({known.train.__module__} and {method.train.__module__})")
    _REGISTRY[method.algorithm] = method
    return method


# modules of the package that hold shared machinery, not a method (imported by the methods themselves)
_SHARED = {"contract", "registry"}


@functools.cache
def _load_all() -> None:
    import gam_rl.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{package.__name__}.{info.name}")


def methods() -> dict[str, Method]:
    """Every registered method, by algorithm name (in the order their modules registered them)."""
    _load_all()
    return dict(_REGISTRY)


def get(algorithm: str) -> Method:
    found = methods().get(algorithm)
    if found is None:
        raise KeyError(f"method.algorithm={algorithm!r}: choose one of {sorted(methods())}")
    return found


def train(cfg, inputs: Training2Inputs) -> Training2Result:
    """Run the method that `cfg.algorithm` names. Where pi started is check 0 of its selection: the
    returned pi is the start when no check of the method beats it on V (Training2Result.kept_start)."""
    # CE(V) of the start: r's, already measured, when pi starts as a copy of r
    start_ce = inputs.ce_valid_r if cfg.init == "r" else policy_cross_entropy(inputs.pi, inputs.valid, inputs.symbols)
    start_weights = copy.deepcopy(inputs.pi.state_dict())
    fit = get(cfg.algorithm).train(cfg, inputs)
    fit.keep_start_unless_beaten(start_ce, start_weights)
    fit.reached_at_start(start_ce)
    if fit.kept_start:
        log.warning("[%s] no check beat the start on V (best CE(V, pi) %s against %.4f): pi is the start again "
                    "(%s); results.json: t2_kept_start, t2_trained_ce_valid", cfg.name, f"{fit.trained_ce_valid:.4f}",
                    start_ce, "r" if cfg.init == "r" else "the fresh LSTM")
    return fit
