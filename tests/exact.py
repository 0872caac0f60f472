"""Exact answers by enumeration, for tests: gam_rl.exact's output space as one tensor."""

import torch

from gam_rl.exact import entropy, kl, output_batches, tv  # noqa: F401 (re-exported for the tests)


def all_outputs(max_len: int) -> torch.Tensor:
    """k < max_len bits + EOS (then PAD), or max_len bits with no EOS (truncated)."""
    return torch.cat(list(output_batches(max_len)))


def exact_distribution(log_potential: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Normalised log p over the enumerated space, and log Z."""
    log_z = torch.logsumexp(log_potential.double(), 0)
    return log_potential.double() - log_z, float(log_z)
