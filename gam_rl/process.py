"""The exact data process: uniform over length-n bit strings that contain a motif.

p_true(x) = whitenoise(x) * [motif in x] / Z with whitenoise = 2^-n, i.e. uniform over
the N(n) length-n strings containing the motif. N(n) is counted exactly with the KMP
automaton of the motif, and sampling unranks a uniform integer in [0, N(n)), so every
string has probability exactly 1/N(n): no rejection loop, no planted-motif bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from gam_rl.config_fields import MISSING, setting
from gam_rl.patterns import occurs
from gam_rl.tokens import EOS, ONE, PAD

MAX_EXACT_N = 62  # counts stay below 2^63, so int64 arithmetic is exact


@dataclass
class MotifConfig:
    """`motif` section: the motif of the data process (conf/motif/<pattern>.yaml)."""

    pattern: str = setting(MISSING, bits=True)  # at most n bits


def validate_motif(motif: str, n: int) -> None:
    if not isinstance(motif, str) or not motif:
        raise ValueError(f"motif must be a non-empty bit string, got {motif!r}")
    bad = sorted(set(motif) - {"0", "1"})
    if bad:
        raise ValueError(f"motif {motif!r} has characters other than 0/1: {bad}")
    if len(motif) > n:
        raise ValueError(f"motif {motif!r} (length {len(motif)}) is longer than n={n}")


def kmp_automaton(motif: str) -> np.ndarray:
    """delta[s, b]: state after reading bit b in state s (s = length of the matched prefix).

    State L = len(motif) means the motif has occurred; it is absorbing.
    """
    L = len(motif)
    fail = [0] * (L + 1)  # classic KMP failure function over prefixes
    k = 0
    for i in range(1, L):
        while k and motif[i] != motif[k]:
            k = fail[k]
        if motif[i] == motif[k]:
            k += 1
        fail[i + 1] = k
    delta = np.zeros((L + 1, 2), dtype=np.int64)
    for s in range(L + 1):
        for b in (0, 1):
            if s == L:
                delta[s, b] = L
                continue
            k = s
            while k and motif[k] != str(b):
                k = fail[k]
            delta[s, b] = k + 1 if motif[k] == str(b) else 0
    return delta


class MotifProcess:
    """Exact sampler, scorer and entropy of p_true for one motif and length n."""

    def __init__(self, motif: str, n: int):
        validate_motif(motif, n)
        if not 1 <= n <= MAX_EXACT_N:
            raise ValueError(f"n must be in [1, {MAX_EXACT_N}] for exact counting, got {n}")
        self.motif, self.n = motif, n
        self.delta = kmp_automaton(motif)
        L = len(motif)
        # completions[t, s] = number of t-bit continuations from state s that contain the
        # motif: completions[0, s] = [s == L]; completions[t, s] = sum_b completions[t-1, delta[s, b]]
        comp = np.zeros((n + 1, L + 1), dtype=np.int64)
        comp[0, L] = 1
        for t in range(1, n + 1):
            comp[t] = comp[t - 1, self.delta[:, 0]] + comp[t - 1, self.delta[:, 1]]
        self.completions = comp
        self.num_strings = int(comp[n, 0])  # N(n): strings of length n containing the motif

    @property
    def log_num_strings(self) -> float:
        return math.log(self.num_strings)

    @property
    def entropy_per_symbol(self) -> float:
        """H(p_true) / (n + 1): nats per predicted symbol (n bits + EOS)."""
        return self.log_num_strings / (self.n + 1)

    def sample_bits(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k exact uniform samples as a (k, n) uint8 array, by unranking uniform ranks.

        At position t in state s, the strings starting with bit 0 are the first
        completions[n-t-1, delta[s,0]] of the remaining rank range: take 0 if the rank is
        below that, otherwise take 1 and subtract it.
        """
        ranks = rng.integers(0, self.num_strings, size=k, dtype=np.int64)  # unbiased
        state = np.zeros(k, dtype=np.int64)
        bits = np.empty((k, self.n), dtype=np.uint8)
        for t in range(self.n):
            with_zero = self.completions[self.n - t - 1, self.delta[state, 0]]
            bit = ranks >= with_zero
            ranks -= np.where(bit, with_zero, 0)
            state = self.delta[state, bit.astype(np.int64)]
            bits[:, t] = bit
        assert (state == len(self.motif)).all() and (ranks == 0).all()
        return bits

    def sample_strings(self, k: int, rng: np.random.Generator) -> list[str]:
        bits = self.sample_bits(k, rng)
        chars = (bits + ord("0")).astype(np.uint8)
        return [row.tobytes().decode() for row in chars]

    def contains_motif(self, tokens: torch.Tensor) -> torch.Tensor:
        return occurs(tokens, self.motif)

    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """log p_true(x) for a padded token batch: -log N(n), or -inf when x does not have
        exactly n bits followed by EOS or lacks the motif."""
        valid = self.well_formed(tokens) & self.contains_motif(tokens)
        out = torch.full(valid.shape, -math.inf, dtype=torch.float64, device=tokens.device)
        out[valid] = -self.log_num_strings
        return out

    def well_formed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Rows that are exactly n bits followed by EOS (then only PAD)."""
        if tokens.shape[1] < self.n + 1:
            return torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        bits_ok = (tokens[:, : self.n] <= ONE).all(dim=1)
        eos_ok = tokens[:, self.n] == EOS
        tail_ok = (tokens[:, self.n + 1 :] == PAD).all(dim=1)
        return bits_ok & eos_ok & tail_ok
