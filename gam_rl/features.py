"""Global sequence features phi(x), computed on token batches, chosen by name.

The catalogue (paper.md section 3; L = motif length). A binary feature is 1 when its pattern
is ABSENT, so the fitted motif weight is strongly negative:

  motif                  the motif                    distractor_10101      ('10101' repeated)[:L]
  supermotif             motif + '0'                  distractor_1001001    ('1001001' repeated)[:L+2]
  submotif               motif[:L//2]                 distractor_00110011   ('00110011' repeated)[:L//2]
  first_bit              1 unless the sequence starts with '1' (empty -> 1)
  M = |x| / max_len,  v = |x|^2 / max_len^2, with |x| each sequence's own bit count
  absent:<bits>          any other pattern, e.g. absent:0000 (named absent_0000)

A feature set is a list of these names (conf/features/*.yaml). The paper's mask strings are
names of feature sets: optional letters M, v, then 7 digits switching on the positional
features motif, supermotif, submotif, first_bit and the three distractors, in that order
(`Mv1001111` = M, v, motif, first_bit, distractor_10101, distractor_1001001,
distractor_00110011). The distractor strings repeat the reference code's literal base
strings and cut them, so '10101' * k gives '1010110101...', as the authors' features did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.config_fields import MISSING, setting
from gam_rl.patterns import WindowCodes, row_chunks
from gam_rl.tokens import ONE

POSITIONAL = ("motif", "supermotif", "submotif", "first_bit", "distractor_10101", "distractor_1001001",
              "distractor_00110011")  # the mask's 7 digits, in order
LENGTH_LETTERS = ("M", "v")
CUSTOM_PREFIX = "absent:"


@dataclass
class FeaturesConfig:
    """`features` section: which phi a run uses."""

    name: str = setting(MISSING)  # names runs, results and the report; the paper's sets are mask strings
    use: list[str] | None = None  # the features by catalogue name; None: those the mask string `name` selects
    max_len: int = setting(100, ge=1)  # the divisor of the length features M and v (the paper's 100)


class FeatureMaskError(ValueError):
    pass


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    pattern: str | None  # absent-pattern features; None for first-bit and length features
    kind: str  # "absent", "first_bit", "M", "v"


def catalogue(motif: str) -> dict[str, FeatureSpec]:
    """Every named feature for one motif."""
    L = len(motif)

    def repeated(base: str, length: int) -> str:
        return (base * (length // len(base) + 1))[:length]

    absent = {"motif": motif, "supermotif": motif + "0", "submotif": motif[: L // 2],
              "distractor_10101": repeated("10101", L), "distractor_1001001": repeated("1001001", L + 2),
              "distractor_00110011": repeated("00110011", L // 2)}
    specs = {name: FeatureSpec(name, pattern, "absent") for name, pattern in absent.items()}
    specs["first_bit"] = FeatureSpec("first_bit", None, "first_bit")
    specs.update({letter: FeatureSpec(letter, None, letter) for letter in LENGTH_LETTERS})
    return specs


def resolve(names: list[str], motif: str) -> list[FeatureSpec]:
    """Feature names (catalogue names or absent:<bits>) -> specs, in the given order."""
    known = catalogue(motif)
    specs, problems = [], []
    for name in names:
        if isinstance(name, str) and name.startswith(CUSTOM_PREFIX):
            bits = name[len(CUSTOM_PREFIX):]
            if not bits or set(bits) - {"0", "1"}:
                problems.append(f"{name!r}: {CUSTOM_PREFIX} needs a non-empty bit string")
            else:
                specs.append(FeatureSpec(f"absent_{bits}", bits, "absent"))
        elif name not in known:
            problems.append(f"unknown feature {name!r}; known: {list(known)} or {CUSTOM_PREFIX}<bits>")
        elif known[name].kind == "absent" and not known[name].pattern:
            problems.append(f"feature {name} is empty for motif {motif!r}")
        else:
            specs.append(known[name])
    names_out = [s.name for s in specs]
    if len(set(names_out)) != len(names_out):
        problems.append(f"a feature is listed twice: {names}")
    if not names:
        problems.append("no feature selected")
    if problems:
        raise FeatureMaskError("; ".join(problems))
    return specs


def mask_names(mask: str) -> list[str]:
    """The feature names a mask string selects (letters first, then positions 0..6)."""
    if not isinstance(mask, str) or not mask:
        raise FeatureMaskError(f"feature mask must be a non-empty string, got {mask!r}")
    width = len(POSITIONAL)
    if len(mask) < width:
        raise FeatureMaskError(f"feature mask {mask!r} needs {width} positional digits at its end, "
                               f"has {len(mask)} characters")
    letters, digits = mask[:-width], mask[-width:]
    bad_digits = sorted(set(digits) - {"0", "1"})
    if bad_digits:
        raise FeatureMaskError(f"feature mask {mask!r}: the last {width} characters must be 0/1, found {bad_digits}")
    unknown = sorted(set(letters) - set(LENGTH_LETTERS))
    if unknown:
        raise FeatureMaskError(f"feature mask {mask!r}: unknown feature letter(s) {unknown}; "
                               f"known letters are {list(LENGTH_LETTERS)} before the {width} digits")
    if len(set(letters)) != len(letters):
        raise FeatureMaskError(f"feature mask {mask!r}: a letter is repeated")
    names = list(letters) + [name for on, name in zip(digits, POSITIONAL, strict=True) if on == "1"]
    if not names:
        raise FeatureMaskError(f"feature mask {mask!r} selects no feature")
    return names


def parse_mask(mask: str, motif: str) -> list[FeatureSpec]:
    """Mask string -> ordered feature specs (letters first, then positions 0..6)."""
    return resolve(mask_names(mask), motif)


def config_names(cfg: FeaturesConfig) -> list[str]:
    """The feature names of a `features` section: `use`, else what the mask string `name` selects;
    a `use` list that contradicts a mask-string name is refused (the name would lie)."""
    if cfg.use is None:
        return mask_names(cfg.name)
    try:
        from_mask = mask_names(cfg.name)
    except FeatureMaskError:
        return list(cfg.use)  # a set with a name of its own
    if from_mask != list(cfg.use):
        raise FeatureMaskError(f"features.use={list(cfg.use)} is not what the mask name {cfg.name!r} selects "
                               f"({from_mask}); give the set another name")
    return list(cfg.use)


class Features:
    """phi: padded token batch (B, T) -> float tensor (B, K)."""

    def __init__(self, names: list[str] | str, motif: str, max_len: int = 100):
        """names: feature names (catalogue, absent:<bits>) or a mask string."""
        self.motif, self.max_len = motif, max_len
        self.specs = resolve(mask_names(names) if isinstance(names, str) else list(names), motif)

    @classmethod
    def from_config(cls, cfg: FeaturesConfig, motif: str) -> Features:
        return cls(config_names(cfg), motif, cfg.max_len)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    def bounds(self, sample_max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi): every phi_k(x) lies in [lo_k, hi_k] for outputs of a sampler with a limit of
        sample_max_len symbols (at most sample_max_len bits: a truncated row has no EOS)."""
        longest = sample_max_len / self.max_len
        hi = [longest if s.kind == "M" else longest**2 if s.kind == "v" else 1.0 for s in self.specs]
        return torch.zeros(len(self.specs)), torch.tensor(hi)

    def __call__(self, tokens: torch.Tensor) -> torch.Tensor:
        # chunks of rows; within a chunk the patterns share one set of window codes (patterns.py)
        out = torch.empty((tokens.shape[0], len(self.specs)), dtype=torch.float32, device=tokens.device)
        for start, rows in row_chunks(tokens):
            windows = WindowCodes(rows)
            phi = out[start : start + len(rows)]
            lengths = None
            for k, spec in enumerate(self.specs):
                if spec.kind == "absent":
                    phi[:, k] = ~windows.occurs(spec.pattern)
                elif spec.kind == "first_bit":
                    phi[:, k] = ~windows.first_is(ONE)
                else:
                    if lengths is None:  # |x| / max_len, |x| = bits per row (tokens.bit_lengths)
                        lengths = windows.bit_lengths().to(torch.float32) / self.max_len
                    phi[:, k] = lengths if spec.kind == "M" else lengths * lengths
        return out
