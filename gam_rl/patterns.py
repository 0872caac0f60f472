"""Substring search over padded token batches, vectorised over the batch."""

from __future__ import annotations

import torch


def occurs(tokens: torch.Tensor, pattern: str) -> torch.Tensor:
    """Bool (B,): does the bit string `pattern` occur in each row of `tokens`?

    A window matches when every position equals the pattern bit; EOS/PAD never equal a
    bit, so matches cannot straddle the end of a sequence. The loop runs over the
    pattern's characters (a handful), each step a (B, W) tensor comparison.
    """
    batch, width = tokens.shape
    m = len(pattern)
    if m == 0:
        return torch.ones(batch, dtype=torch.bool, device=tokens.device)
    windows = width - m + 1
    if windows <= 0:
        return torch.zeros(batch, dtype=torch.bool, device=tokens.device)
    match = tokens[:, :windows] == int(pattern[0])
    for i in range(1, m):
        match &= tokens[:, i : i + windows] == int(pattern[i])
    return match.any(dim=1)
