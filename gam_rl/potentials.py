"""Potentials: unnormalised scores P(x) >= 0, exposed as batched log P(x).

Training-2 accepts any object with `log_potential(tokens) -> (B,)`; the GAM and the true
process are two of them.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch

from gam_rl.features import Features
from gam_rl.metrics import eval_mode
from gam_rl.policy import LSTMPolicy
from gam_rl.process import MotifProcess


class Potential(Protocol):
    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor: ...


class GAMPotential:
    """log P_lambda(x) = log r(x) + lambda . phi(x), scored with r's dropout off."""

    def __init__(self, r: LSTMPolicy, features: Features, lam: torch.Tensor):
        self.r, self.features = r, features
        self.lam = lam.detach().to(r.device, torch.float32)

    def log_tilt(self, tokens: torch.Tensor) -> torch.Tensor:
        """lambda . phi(x) = log P_lambda(x) - log r(x): the importance weight against r."""
        return self.features(tokens) @ self.lam

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        with eval_mode(self.r):
            return self.r.log_prob(tokens) + self.log_tilt(tokens)


class TrueProcessPotential:
    """P(x) = whitenoise(x) * [x has n bits and contains the motif] = 2^-n on the support."""

    def __init__(self, process: MotifProcess):
        self.process = process

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        support = self.process.well_formed(tokens) & self.process.contains_motif(tokens)
        out = torch.full(support.shape, -math.inf, device=tokens.device)
        out[support] = -self.process.n * math.log(2.0)
        return out

    @property
    def log_z(self) -> float:
        return self.process.log_num_strings - self.process.n * math.log(2.0)
