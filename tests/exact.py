"""Exact answers by enumeration, for tests: gam_rl.exact's output space as one tensor."""

import math

import torch

from gam_rl.exact import entropy, kl, output_batches, tv  # noqa: F401 (re-exported for the tests)


def all_outputs(max_len: int) -> torch.Tensor:
    """k < max_len bits + EOS (then PAD), or max_len bits with no EOS (truncated)."""
    return torch.cat(list(output_batches(max_len)))


def exact_distribution(log_potential: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Normalised log p over the enumerated space, and log Z."""
    log_z = torch.logsumexp(log_potential.double(), 0)
    return log_potential.double() - log_z, float(log_z)


def chi_square(draws: torch.Tensor, space: torch.Tensor, probs: torch.Tensor) -> tuple[float, float, int]:
    """Pearson's statistic of draws (token rows) against probs over the enumerated space, over the outputs with
    at least 5 expected draws (the rest pooled): (chi2, the 0.999 quantile of chi-square(dof) by the
    Wilson-Hilferty approximation, dof). A sampler that follows probs passes chi2 < bound 999 times in 1000."""
    index = {tuple(row.tolist()): i for i, row in enumerate(space)}
    width = space.shape[1]
    padded = torch.nn.functional.pad(draws, (0, width - draws.shape[1]), value=3)
    counts = torch.bincount(torch.tensor([index[tuple(row.tolist())] for row in padded]), minlength=len(space))
    expected = probs.double() * len(draws)
    big = expected >= 5
    observed = torch.cat([counts[big].double(), counts[~big].sum().double().reshape(1)])
    expect = torch.cat([expected[big], expected[~big].sum().reshape(1)])
    chi2 = float(((observed - expect) ** 2 / expect).sum())
    dof = len(observed) - 1
    z = 3.09
    return chi2, dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3, dof
