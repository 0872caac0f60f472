"""Potentials: unnormalised scores P(x) >= 0 on token batches, as batched log P(x).

They multiply, so the paper's model reads as its formula (naver/disco's `base * scorer`):

    gam = r * Tilt(features, lam)          # P_lambda(x) = r(x) exp(lambda . phi(x))
    true = TrueProcess(process)            # P(x) = 2^-n [x has n bits and contains the motif]

An LSTMPolicy is a potential too (P = the policy's probability, scored with dropout off).
Sampling code takes a (proposal q, target P) pair and asks the target for what it needs:

    target.log_weight(q, samples)       log P(x) - log q(x), the importance weight of x ~ q
    target.log_weight_bound(q, max_len) an upper bound of that over q's outputs (rejection
                                        sampling), or None when there is none

A product whose factors include q itself divides q out exactly: while q is r, the weight of
P_lambda is exp(lambda . phi(x)) and r is never scored again.
"""

from __future__ import annotations

import math

import torch

from gam_rl.features import Features
from gam_rl.process import MotifProcess


class Potential:
    """log P(x) for a padded token batch (B, T) -> (B,), -inf where P(x) = 0."""

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def log_upper_bound(self, max_len: int) -> float | None:
        """An upper bound of log P(x) over strings of at most max_len symbols, or None."""
        return None

    def log_weight(self, proposal: Potential, samples) -> torch.Tensor:
        """log P(x) - log q(x) for samples of q carrying their log q(x) (float64)."""
        if proposal is self:
            return torch.zeros(len(samples), dtype=torch.float64, device=samples.tokens.device)
        return self.log_potential(samples.tokens).double() - samples.log_prob.double()

    def log_weight_bound(self, proposal: Potential, max_len: int) -> float | None:
        """An upper bound of log P(x)/q(x) over q's outputs, or None."""
        return 0.0 if proposal is self else None

    def __mul__(self, other: Potential) -> Product:
        return Product(self, other)


class Product(Potential):
    """P(x) = prod_k P_k(x)."""

    def __init__(self, *factors: Potential):
        self.factors: list[Potential] = []
        for factor in factors:
            self.factors += factor.factors if isinstance(factor, Product) else [factor]

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        return sum(f.log_potential(tokens).double() for f in self.factors)

    def log_upper_bound(self, max_len: int) -> float | None:
        bounds = [f.log_upper_bound(max_len) for f in self.factors]
        return None if any(b is None for b in bounds) else float(sum(bounds))

    def _others(self, proposal: Potential) -> Product | None:
        """The product without one factor that *is* the proposal, or None if none is."""
        for k, factor in enumerate(self.factors):
            if factor is proposal:
                return Product(*self.factors[:k], *self.factors[k + 1 :])
        return None

    def log_weight(self, proposal: Potential, samples) -> torch.Tensor:
        others = self._others(proposal)
        mixed = self._others(getattr(proposal, "base", None))
        if others is None and mixed is not None and hasattr(samples, "log_base"):
            # q a defensive mixture a r + (1 - a) pi of a factor r (proposals.py): P / q = r * others / q, with
            # log r and log q carried by the draws
            return mixed.log_potential(samples.tokens).double() + samples.log_base - samples.log_prob.double()
        if others is None:
            return super().log_weight(proposal, samples)
        # P / q = (q * others) / q = others: q is not scored
        if not others.factors:
            return torch.zeros(len(samples), dtype=torch.float64, device=samples.tokens.device)
        return others.log_potential(samples.tokens).double()

    def log_weight_bound(self, proposal: Potential, max_len: int) -> float | None:
        others = self._others(proposal)
        if others is None and hasattr(proposal, "base_weight") and self._others(proposal.base) is not None:
            # a defensive mixture: q >= a r, so P / q <= (r * others) / (a r) = others / a (a planted mixture
            # has no such bound: past a swap its other component is pi)
            bound = self._others(proposal.base).log_upper_bound(max_len)
            return None if bound is None else bound - math.log(proposal.base_weight)
        return None if others is None else others.log_upper_bound(max_len)


class Tilt(Potential):
    """exp(lambda . phi(x)): the log-linear factor of a GAM."""

    def __init__(self, features: Features, lam: torch.Tensor):
        self.features = features
        self.lam = lam.detach().to(torch.float32)

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.features(tokens) @ self.lam.to(tokens.device)

    def log_upper_bound(self, max_len: int) -> float:
        # lambda . phi <= sum_k max(lambda_k lo_k, lambda_k hi_k) for phi_k in [lo_k, hi_k]
        lo, hi = self.features.bounds(max_len)
        lam = self.lam.cpu().double()
        return float(torch.maximum(lam * lo.double(), lam * hi.double()).sum())


class TrueProcess(Potential):
    """P(x) = whitenoise(x) [x has n bits and contains the motif] = 2^-n on the support."""

    def __init__(self, process: MotifProcess):
        self.process = process

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        support = self.process.well_formed(tokens) & self.process.contains_motif(tokens)
        out = torch.full(support.shape, -math.inf, device=tokens.device, dtype=torch.float64)
        out[support] = -self.process.n * math.log(2.0)
        return out

    def log_upper_bound(self, max_len: int) -> float:
        return -self.process.n * math.log(2.0)

    @property
    def log_z(self) -> float:
        return self.process.log_num_strings - self.process.n * math.log(2.0)


def gam(r: Potential, features: Features, lam: torch.Tensor) -> Product:
    """P_lambda = r * exp(lambda . phi)."""
    return r * Tilt(features, lam)


def tilt_of(potential: Potential) -> Tilt | None:
    """The exp(lambda . phi) factor of a GAM (or the potential itself if it is one); None if it has none."""
    factors = potential.factors if isinstance(potential, Product) else [potential]
    return next((f for f in factors if isinstance(f, Tilt)), None)
