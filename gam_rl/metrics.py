"""Evaluation metrics: cross-entropies in nats per symbol, motif frequency, length."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
from torch import nn

from gam_rl.policy import LSTMPolicy
from gam_rl.tokens import bit_lengths


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run a block with dropout off and no autograd, restoring the module's mode after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


def batched_log_prob(score: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                     batch_size: int = 5000) -> torch.Tensor:
    """score(x) over a large tensor in chunks, concatenated (no autograd)."""
    with torch.no_grad():
        return torch.cat([score(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)])


def policy_cross_entropy(policy: LSTMPolicy, tokens: torch.Tensor, symbols_per_seq: int) -> float:
    """CE(S, pi) = -mean_{x in S} log pi(x) / symbols_per_seq (n + 1: the bits and EOS)."""
    with eval_mode(policy):
        logp = batched_log_prob(policy.log_prob, tokens.to(policy.device))
    return float(-logp.double().mean() / symbols_per_seq)


def sample_statistics(policy: LSTMPolicy, contains_motif: Callable[[torch.Tensor], torch.Tensor],
                      num: int, max_len: int, batch_size: int = 5000,
                      generator: torch.Generator | None = None) -> dict[str, float]:
    """Motif frequency and average length (bits) over `num` policy samples."""
    has_motif = lengths = truncated = 0.0
    for start in range(0, num, batch_size):
        samples = policy.sample(min(batch_size, num - start), max_len, generator)
        has_motif += float(contains_motif(samples.tokens).sum())
        lengths += float(bit_lengths(samples.tokens).sum())
        truncated += float((~samples.finished).sum())
    return {"motif_freq": has_motif / num, "avg_len": lengths / num, "truncated_frac": truncated / num}
