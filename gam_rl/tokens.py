"""Token conventions shared by every module.

A sequence is a row of a padded LongTensor: bits 0/1, then EOS, then PAD up to the
batch width. A sequence sampled up to the length limit may have no EOS (it is then
"truncated"). Model inputs start with BOS, which the LSTM sees as a zero vector.
"""

from __future__ import annotations

import torch

ZERO, ONE, EOS, PAD = 0, 1, 2, 3
BOS = PAD  # the input-side start symbol; index 3 maps to the zero input vector
VOCAB = 3  # symbols a policy predicts: 0, 1, EOS


def encode(strings: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
    """Bit strings -> padded token batch (B, max_len + 1) with EOS appended."""
    if not strings:
        return torch.empty(0, 1, dtype=torch.long, device=device)
    width = max(len(s) for s in strings) + 1
    out = torch.full((len(strings), width), PAD, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in strings])
    joined = "".join(strings)
    if joined and set(joined) - {"0", "1"}:
        raise ValueError(f"not a bit string: characters {sorted(set(joined) - {'0', '1'})}")
    bits = torch.frombuffer(bytearray(joined.encode()), dtype=torch.uint8).long() - ord("0")
    # scatter all bits at once: row index repeated by length, column = position in row
    rows = torch.repeat_interleave(torch.arange(len(strings)), lengths)
    starts = torch.cumsum(lengths, 0) - lengths
    cols = torch.arange(len(joined)) - torch.repeat_interleave(starts, lengths)
    out[rows, cols] = bits
    out[torch.arange(len(strings)), lengths] = EOS
    return out.to(device)


def bit_lengths(tokens: torch.Tensor) -> torch.Tensor:
    """Number of bits in each row (everything before EOS/PAD)."""
    return (tokens <= ONE).sum(dim=1)


def decode(tokens: torch.Tensor) -> list[str]:
    """Padded token batch -> bit strings (EOS and PAD dropped). For files and tests."""
    rows = tokens.cpu().tolist()
    return ["".join("1" if t == ONE else "0" for t in row if t <= ONE) for row in rows]


def pad_cat(batches: list[torch.Tensor], value: float = PAD) -> torch.Tensor:
    """Concatenate (B, T) batches of different widths, padding with PAD (or `value`)."""
    width = max(b.shape[1] for b in batches)
    return torch.cat([torch.nn.functional.pad(b, (0, width - b.shape[1]), value=value) for b in batches])
