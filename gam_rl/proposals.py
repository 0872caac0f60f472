"""Proposals beyond r for the estimates of Training-1 and Z: a defensive mixture of r and a policy.

Where r rarely writes the motif (|D| <= 1000: about one draw in 800), every importance-sampled
estimate of p_lambda from r rests on a few hundred effective draws. A policy pi trained towards
p_lambda (a Training-2 run's pi.pt) writes the motif strings, but P_lambda / pi is unbounded:
one string that pi underrates can carry the whole estimate. The defensive mixture

    q(x) = a r(x) + (1 - a) pi(x),        0 < a < 1,

keeps the best of both: P_lambda / q = r exp(lambda . phi) / q <= exp(lambda . phi) / a, so the
weights stay bounded (rejection sampling's beta divided by a), while the strings pi writes come
(1 - a) of the time (Hesterberg's defensive importance sampling). Every draw carries log q(x) and
log r(x) (each string scored under the component that did not draw it), so a GAM's weight
log P_lambda - log q = log r + lambda . phi - log q needs no further scoring (potentials.Product).
"""

from __future__ import annotations

import math

import torch

from gam_rl.metrics import batched_log_prob
from gam_rl.policy import LSTMPolicy, Samples
from gam_rl.potentials import Potential
from gam_rl.tokens import EOS, pad_cat


class MixtureSamples(Samples):
    """Draws of a DefensiveMixture: log_prob is log q(x); log_base is log r(x)."""

    def __init__(self, tokens: torch.Tensor, log_prob: torch.Tensor, log_base: torch.Tensor):
        super().__init__(tokens, log_prob, tokens.eq(EOS).any(1))
        self.log_base = log_base


class DefensiveMixture(Potential):
    """q = base_weight * base + (1 - base_weight) * other, for two autoregressive policies."""

    def __init__(self, base: LSTMPolicy, other: LSTMPolicy, base_weight: float):
        if not 0.0 < base_weight < 1.0:
            raise ValueError(f"base_weight must be in (0, 1), got {base_weight}")
        self.base, self.other, self.base_weight = base, other, base_weight
        self.log_a, self.log_1ma = math.log(base_weight), math.log1p(-base_weight)
        self.device = base.device

    def _log_q(self, log_base: torch.Tensor, log_other: torch.Tensor) -> torch.Tensor:
        # log q = log(a r + (1 - a) pi), in float64
        return torch.logaddexp(self.log_a + log_base.double(), self.log_1ma + log_other.double())

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._log_q(self.base.log_potential(tokens), self.other.log_potential(tokens))

    @torch.no_grad()
    def sample(self, num: int, max_len: int, generator: torch.Generator | None = None) -> MixtureSamples:
        """Each draw from base with probability a, else from other; scored under both."""
        from_base = int((torch.rand(num, generator=generator, device=self.device) < self.base_weight).sum())
        base_draws = _draw(self.base, from_base, max_len, generator)
        other_draws = _draw(self.other, num - from_base, max_len, generator)
        # each draw carries its own component's log-probability; the other component scores it
        log_base = torch.cat([base_draws.log_prob.double(),
                              batched_log_prob(self.base.log_potential, other_draws.tokens).double()])
        log_other = torch.cat([batched_log_prob(self.other.log_potential, base_draws.tokens).double(),
                               other_draws.log_prob.double()])
        tokens = pad_cat([base_draws.tokens, other_draws.tokens])
        # in random order: a consumer that keeps only the last draws (Training-1's buffer) keeps a sample of q,
        # not of the component drawn last
        order = torch.randperm(num, generator=generator, device=self.device)
        log_q = self._log_q(log_base, log_other)
        return MixtureSamples(tokens[order], log_q[order], log_base[order])


def _draw(policy: LSTMPolicy, num: int, max_len: int, generator: torch.Generator | None) -> Samples:
    if num == 0:  # none from this component in this batch
        device = policy.device
        return Samples(torch.empty(0, 1, dtype=torch.long, device=device), torch.empty(0, device=device),
                       torch.empty(0, dtype=torch.bool, device=device))
    return policy.sample(num, max_len, generator)
