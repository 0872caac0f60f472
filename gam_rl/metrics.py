"""Evaluation metrics: cross-entropies in nats per symbol, motif frequency, length."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.tokens import bit_lengths


@dataclass
class EvalConfig:
    """`eval` section: the sample statistics of r and pi (motif frequency, length)."""

    samples: int = setting(5000, ge=1)
    max_len: int = setting(500, ge=1)  # the paper's limit when sampling for motif frequency
    batch_size: int = setting(5000, ge=1)
    exact: bool = False  # true: exact Z, KLs and TV by enumerating every output (small max_len only: gam_rl/exact.py)


def batched_log_prob(score: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                     batch_size: int = 5000) -> torch.Tensor:
    """score(x) over a large tensor in chunks, concatenated (no autograd); empty for no rows."""
    with torch.no_grad():
        if len(tokens) == 0:
            return torch.empty(0, device=tokens.device)
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


@dataclass
class PolicyEval:
    """CE(T, policy) and the statistics of its samples."""

    ce_test: float
    motif_freq: float
    avg_len: float
    truncated_frac: float

    def results(self, name: str) -> dict:
        return {f"ce_test_{name}": self.ce_test, f"motif_freq_{name}": self.motif_freq,
                f"avg_len_{name}": self.avg_len, f"truncated_frac_{name}": self.truncated_frac}


def evaluate_policy(policy: LSTMPolicy, test: torch.Tensor, contains_motif: Callable[[torch.Tensor], torch.Tensor],
                    cfg: EvalConfig, symbols_per_seq: int) -> PolicyEval:
    """CE(T, policy), and motif frequency / average length over cfg.samples of its samples."""
    ce = policy_cross_entropy(policy, test, symbols_per_seq)
    stats = sample_statistics(policy, contains_motif, cfg.samples, cfg.max_len, cfg.batch_size)
    return PolicyEval(ce, stats["motif_freq"], stats["avg_len"], stats["truncated_frac"])
