"""Typed configuration fields that carry their admissible values.

Every section of a run's configuration is a dataclass defined beside the code that reads it
(`MLEConfig` in stages/mle.py, `DPGConfig` in stages/dpg.py, ...), with fields made by
`setting`:

    lr: float = setting(1e-3, gt=0)                          # a positive number
    batch_size: int | None = setting(None, ge=1)             # None, or an integer >= 1
    estimator: str = setting("snis_r", choices=ESTIMATORS)   # one of the module's own registry

gam_rl.schema checks a composed configuration against these dataclasses: unknown keys, types
(through OmegaConf), ranges and choices, every problem at once. This module imports nothing
from gam_rl, so that any module can define its section without import cycles.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

from omegaconf import MISSING

__all__ = ["MISSING", "setting", "constraint_problem"]


def setting(default: Any = MISSING, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
            lt: float | None = None, choices: Iterable[str] | None = None, bits: bool = False,
            factory: Callable[[], Any] | None = None) -> Any:
    """A dataclass field with its constraints in the metadata (None values are never checked
    against a range: a field typed `X | None` says what None means in its comment)."""
    metadata = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if bits:
        metadata["bits"] = True
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def constraint_problem(value: Any, metadata: dict) -> str | None:
    """What is wrong with a (type-checked) value under a field's constraints, or None."""
    if value is None:
        return None
    if "choices" in metadata and value not in metadata["choices"]:
        return f"choose one of {list(metadata['choices'])}"
    if metadata.get("bits") and (not value or set(value) - {"0", "1"}):
        return "must be a non-empty string of 0 and 1"
    bounds = (("ge", lambda v, b: v >= b, ">="), ("gt", lambda v, b: v > b, ">"),
              ("le", lambda v, b: v <= b, "<="), ("lt", lambda v, b: v < b, "<"))
    failed = [f"{sign} {metadata[key]:g}" for key, holds, sign in bounds if key in metadata
              and not holds(value, metadata[key])]
    if failed:
        allowed = [f"{sign} {metadata[key]:g}" for key, _, sign in bounds if key in metadata]
        return "must be " + " and ".join(allowed)
    return None


def flatten(config: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: a resolved configuration by dotted key; lists stay values."""
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
