"""Global sequence features phi(x), selected by a mask string, computed on token batches.

Mask grammar (paper.md section 3): optional letters, then exactly 7 positional digits.
The last 7 characters address the positional features below ('1' = on, '0' = off);
letters before them add per-sequence length features. A binary feature is 1 when its
pattern is ABSENT, so the fitted motif weight is strongly negative.

  pos 0  motif                  pos 4  ('10101' repeated)[:L]
  pos 1  motif + '0'            pos 5  ('1001001' repeated)[:L+2]
  pos 2  motif[:L//2]           pos 6  ('00110011' repeated)[:L//2]
  pos 3  first bit: 1 unless the sequence starts with '1' (empty -> 1)
  M = |x| / max_len,  v = |x|^2 / max_len^2, with |x| each sequence's own bit count.

The distractor strings repeat the reference code's literal base strings and cut them,
so '10101' * k gives '1010110101...', as the authors' features did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.patterns import WindowCodes, row_chunks
from gam_rl.tokens import ONE

POSITIONAL = 7
LENGTH_LETTERS = ("M", "v")


class FeatureMaskError(ValueError):
    pass


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    pattern: str | None  # absent-pattern features; None for first-bit and length features
    kind: str  # "absent", "first_bit", "M", "v"


def positional_patterns(motif: str) -> list[tuple[str, str | None, str]]:
    L = len(motif)

    def repeated(base: str, length: int) -> str:
        return (base * (length // len(base) + 1))[:length]

    return [
        ("motif", motif, "absent"),
        ("supermotif", motif + "0", "absent"),
        ("submotif", motif[: L // 2], "absent"),
        ("first_bit", None, "first_bit"),
        ("distractor_10101", repeated("10101", L), "absent"),
        ("distractor_1001001", repeated("1001001", L + 2), "absent"),
        ("distractor_00110011", repeated("00110011", L // 2), "absent"),
    ]


def parse_mask(mask: str, motif: str) -> list[FeatureSpec]:
    """Mask string -> ordered feature specs (letters first, then positions 0..6)."""
    if not isinstance(mask, str) or not mask:
        raise FeatureMaskError(f"feature mask must be a non-empty string, got {mask!r}")
    if len(mask) < POSITIONAL:
        raise FeatureMaskError(
            f"feature mask {mask!r} needs {POSITIONAL} positional digits at its end, "
            f"has {len(mask)} characters"
        )
    letters, digits = mask[:-POSITIONAL], mask[-POSITIONAL:]
    bad_digits = sorted(set(digits) - {"0", "1"})
    if bad_digits:
        raise FeatureMaskError(
            f"feature mask {mask!r}: the last {POSITIONAL} characters must be 0/1, found {bad_digits}"
        )
    unknown = sorted(set(letters) - set(LENGTH_LETTERS))
    if unknown:
        raise FeatureMaskError(
            f"feature mask {mask!r}: unknown feature letter(s) {unknown}; "
            f"known letters are {list(LENGTH_LETTERS)} before the {POSITIONAL} digits"
        )
    if len(set(letters)) != len(letters):
        raise FeatureMaskError(f"feature mask {mask!r}: a letter is repeated")
    specs = [FeatureSpec(letter, None, letter) for letter in letters]
    for on, (name, pattern, kind) in zip(digits, positional_patterns(motif), strict=True):
        if on == "1":
            if kind == "absent" and not pattern:
                raise FeatureMaskError(
                    f"feature mask {mask!r}: feature {name} is empty for motif {motif!r}"
                )
            specs.append(FeatureSpec(name, pattern, kind))
    if not specs:
        raise FeatureMaskError(f"feature mask {mask!r} selects no feature")
    return specs


class Features:
    """phi: padded token batch (B, T) -> float tensor (B, K)."""

    def __init__(self, mask: str, motif: str, max_len: int = 100):
        self.mask, self.motif, self.max_len = mask, motif, max_len
        self.specs = parse_mask(mask, motif)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.specs]

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def binary(self) -> bool:
        """True when every feature takes values in {0, 1} (no length features)."""
        return all(s.kind in ("absent", "first_bit") for s in self.specs)

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
