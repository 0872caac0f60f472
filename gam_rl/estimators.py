"""Monte-Carlo estimators in log space: SNIS moments, rejection sampling, IS for Z.

Weights are handled as log-weights throughout; a batch whose weights are all zero or
not finite raises EstimatorError instead of returning NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from gam_rl.policy import LSTMPolicy, Samples
from gam_rl.tokens import pad_cat

log = logging.getLogger("gam_rl")


class EstimatorError(RuntimeError):
    pass


def check_log_weights(log_w: torch.Tensor, what: str) -> None:
    if torch.isnan(log_w).any():
        raise EstimatorError(f"{what}: NaN importance log-weights ({int(torch.isnan(log_w).sum())} of {len(log_w)})")
    if torch.isposinf(log_w).any():
        raise EstimatorError(f"{what}: infinite importance weights")
    if not torch.isfinite(log_w).any():
        raise EstimatorError(f"{what}: every importance weight is zero ({len(log_w)} samples)")


def effective_sample_size(log_w: torch.Tensor) -> float:
    """ESS = (sum w)^2 / sum w^2, computed as exp(2 lse(log w) - lse(2 log w))."""
    log_w = log_w.double()
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


@dataclass
class SNISEstimate:
    moments: torch.Tensor  # (K,) E_p[phi] estimate
    ess: float


def snis_moments(log_w: torch.Tensor, phi: torch.Tensor) -> SNISEstimate:
    """E_p[phi] ~ sum_i w_i phi_i / sum_i w_i, with w_i = p~(x_i)/q(x_i), x_i ~ q."""
    check_log_weights(log_w, "SNIS")
    weights = torch.softmax(log_w.double(), dim=0)  # normalised weights w_i / sum_j w_j
    return SNISEstimate((weights.unsqueeze(1) * phi.double()).sum(0).float(), effective_sample_size(log_w))


def rejection_log_bound(lam: torch.Tensor) -> float:
    """log beta = sum_k max(lambda_k, 0): bounds lambda . phi when every phi_k is in [0, 1],
    so P_lambda(x) / r(x) = exp(lambda . phi(x)) <= beta."""
    return float(lam.clamp(min=0).sum())


def check_unit_box(phi: torch.Tensor, names: list[str]) -> None:
    """The rejection bound is only valid for features in [0, 1]: refuse anything else."""
    outside = (phi < 0) | (phi > 1)
    if outside.any():
        k = int(outside.any(0).nonzero()[0])
        raise EstimatorError(
            f"rejection sampling needs every feature in [0, 1]; feature {names[k]!r} took value "
            f"{float(phi[outside.any(1)][0, k]):.4g}. Cap the sampling length at the feature "
            f"normaliser (feature_max_len) or use an estimator without a bound (snis_r)."
        )


def accept(log_tilt: torch.Tensor, log_bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Accept x ~ r with probability exp(lambda . phi(x) - log beta): accepted x ~ p_lambda."""
    u = torch.rand(log_tilt.shape, device=log_tilt.device, generator=generator, dtype=torch.float64)
    return torch.log(u) < (log_tilt.double() - log_bound)


@dataclass
class RejectionResult:
    tokens: torch.Tensor  # (num, T) accepted sequences, exact samples of p_lambda
    proposals: int
    accepted: int  # all accepted proposals, including the surplus of the last batch

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposals, 1)


def rejection_sample(proposal: LSTMPolicy, phi: Callable[[torch.Tensor], torch.Tensor], names: list[str],
                     lam: torch.Tensor, log_bound: float, num: int, max_len: int, batch_size: int,
                     max_proposals: int, generator: torch.Generator | None = None,
                     progress: str = "rs") -> RejectionResult:
    """Draw `num` exact samples of p ~ proposal * exp(lam . phi) by rejection from `proposal`
    (phi is computed once per batch: it serves both the [0, 1] check and the tilt)."""
    accepted: list[torch.Tensor] = []
    have = proposals = 0
    next_report = 0.1
    while have < num:
        if proposals >= max_proposals:
            raise EstimatorError(
                f"rejection sampling accepted {have} of {proposals} proposals (rate {have / proposals:.2e}), "
                f"short of the {num} needed within max_proposals={max_proposals}")
        samples = proposal.sample(batch_size, max_len, generator)
        features = phi(samples.tokens)
        check_unit_box(features, names)
        keep = accept(features @ lam, log_bound, generator)
        proposals += batch_size
        if keep.any():
            accepted.append(samples.tokens[keep])
            have += int(keep.sum())
        if have >= next_report * num:
            log.info("[%s] %d/%d accepted from %d proposals (rate %.2e)", progress, min(have, num), num,
                     proposals, have / proposals)
            next_report += 0.1
    return RejectionResult(pad_cat(accepted)[:num], proposals, have)


@dataclass
class ZEstimate:
    log_z: float
    z: float
    rel_se: float  # standard error of Z-hat divided by Z-hat
    ess: float
    num: int


def importance_z(draw: Callable[[int], tuple[Samples, torch.Tensor]], num: int, batch_size: int,
                 rel_tol: float | None = None, min_samples: int = 0,
                 tail_seen: Callable[[], bool] | None = None) -> ZEstimate:
    """Z = E_q[P(x)/q(x)] ~ mean_i w_i, x_i ~ q. `draw(k)` returns k samples and their log w.

    rel_se = std(w) / (sqrt(N) mean(w)), the relative standard error of Z-hat (CLT).
    With `rel_tol`, sampling stops after the first batch (and at least `min_samples`) where
    rel_se <= rel_tol and `tail_seen()` is true; `num` is then the cap. The empirical rel_se
    cannot see heavy weights that have not been drawn yet (before the first one, the weights
    look uniform and rel_se looks small while Z-hat is far too low): `tail_seen` is the
    caller's test that the heavy part has been sampled often enough for rel_se to mean something.
    """
    log_ws = []
    drawn = 0
    while drawn < num:
        _, log_w = draw(min(batch_size, num - drawn))
        log_ws.append(log_w.double())
        drawn += len(log_w)
        if rel_tol is not None and drawn >= min_samples and (tail_seen is None or tail_seen()):
            current = torch.cat(log_ws)
            if torch.isfinite(current).any() and _z_from_log_w(current).rel_se <= rel_tol:
                break
    log_w = torch.cat(log_ws)
    check_log_weights(log_w, "importance-sampling Z")
    return _z_from_log_w(log_w)


class ExpectedAccepts:
    """sum_i w_i / beta over every draw added so far (w_i / beta clipped at 1): the expected
    number of exact samples rejection sampling with bound beta would accept from them, n Z-hat /
    beta. As a stopping test for importance_z (`tail_seen`) it is robust to the heavy tail that
    rel_se cannot see: while the heavy strings have not been drawn, Z-hat and the count stay low."""

    def __init__(self, log_beta: float, needed: float):
        self.log_beta, self.needed, self.value = log_beta, needed, 0.0

    def add(self, log_w: torch.Tensor) -> None:
        self.value += float(torch.exp((log_w.double() - self.log_beta).clamp(max=0.0)).sum())

    def __call__(self) -> bool:
        return self.value >= self.needed


def _z_from_log_w(log_w: torch.Tensor) -> ZEstimate:
    n = len(log_w)
    log_z = float(torch.logsumexp(log_w, 0) - math.log(n))
    # relative variance of the weights: E[w^2]/E[w]^2 - 1, in log space
    rel_var = max(float(torch.exp(torch.logsumexp(2 * log_w, 0) - math.log(n) - 2 * log_z)) - 1.0, 0.0)
    return ZEstimate(log_z, math.exp(log_z), math.sqrt(rel_var / n), effective_sample_size(log_w), n)


def cross_entropy_p_lambda(log_potential_test: torch.Tensor, z: ZEstimate, symbols_per_seq: int) -> tuple[float, float]:
    """CE(T, p_lambda) = -mean_T (log P_lambda(x) - log Z) / symbols, with the standard error
    that Z-hat's uncertainty induces (d log Z = dZ / Z)."""
    ce = -float((log_potential_test.double() - z.log_z).mean()) / symbols_per_seq
    return ce, z.rel_se / symbols_per_seq


def thin_by_weight(log_w: torch.Tensor, budget: int, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Unbiased thinning of a weighted sample to about `budget` items.

    Keep item i with probability p_i = min(1, w_i / c) and give it weight w_i / p_i, with c
    chosen so that sum_i p_i = budget. Then E[sum_kept (w_i / p_i) f(x_i)] = sum_i w_i f(x_i)
    for any f: heavy items are always kept with their own weight, light ones are kept at
    random with weight c. c is at most max_i w_i, so the heaviest item is always kept (never an
    empty selection) and flat weights are not thinned below sum_i w_i / max_i w_i items: about
    max(budget, sum w / max w) items are kept. Returns (indices kept, their new log-weights).
    """
    n = len(log_w)
    if budget >= n:
        return torch.arange(n, device=log_w.device), log_w
    if torch.isneginf(log_w).all():
        # every weight is 0: the estimate is exactly 0; keep one zero-weight item (a zero update,
        # as the unthinned paper path gives) rather than fail
        return torch.arange(1, device=log_w.device), log_w[:1]
    check_log_weights(log_w, "thinning")
    log_w64 = log_w.double()
    # sum_i min(1, w_i / c) is decreasing in c: bisect on log c
    lo, hi = float(log_w64[torch.isfinite(log_w64)].min()) - 1.0, float(log_w64.max())
    lo -= math.log(n)  # at c = min w / n every item is kept
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        expected = torch.exp(torch.clamp(log_w64 - mid, max=0.0)).sum()
        lo, hi = (mid, hi) if expected > budget else (lo, mid)
    log_c = hi
    log_p = torch.clamp(log_w64 - log_c, max=0.0)  # log p_i
    u = torch.rand(n, device=log_w.device, dtype=torch.float64, generator=generator)
    keep = (torch.log(u) < log_p).nonzero().squeeze(1)
    return keep, (log_w64[keep] - log_p[keep]).to(log_w.dtype)
