"""Exact answers by enumeration: every output a sampler with a length limit can produce."""

import itertools

import torch

from gam_rl.tokens import EOS, PAD


def all_outputs(max_len: int) -> torch.Tensor:
    """k < max_len bits + EOS (then PAD), or max_len bits with no EOS (truncated)."""
    rows = []
    for k in range(max_len):
        for bits in itertools.product([0, 1], repeat=k):
            rows.append(list(bits) + [EOS] + [PAD] * (max_len - k - 1))
    rows += [list(bits) for bits in itertools.product([0, 1], repeat=max_len)]
    return torch.tensor(rows)


def exact_distribution(log_potential: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Normalised log p over the enumerated space, and log Z."""
    log_z = torch.logsumexp(log_potential.double(), 0)
    return log_potential.double() - log_z, float(log_z)


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p || q) = sum_x p(x) (log p(x) - log q(x)), over the support of p."""
    p = log_p.exp()
    support = p > 0
    return float((p[support] * (log_p[support] - log_q.double()[support])).sum())


def entropy(log_p: torch.Tensor) -> float:
    p = log_p.exp()
    support = p > 0
    return float(-(p[support] * log_p[support]).sum())
