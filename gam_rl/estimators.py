"""Monte-Carlo estimators in log space: SNIS moments, rejection and quasi-rejection sampling, IS
for Z, thinning.

Sampling estimators take a (proposal q, target P) pair of potentials (gam_rl.potentials) and
ask the target for the importance weight P(x)/q(x) and, for rejection, its bound.

Weights are handled as log-weights throughout; a batch whose weights are all zero or
not finite raises EstimatorError instead of returning NaN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from statistics import NormalDist

import torch

from gam_rl.policy import Samples
from gam_rl.progress import Progress
from gam_rl.tokens import pad_cat


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
class MomentEstimate:
    moments: torch.Tensor  # (K,) estimate of E_p[phi]
    se: torch.Tensor  # (K,) its standard error
    ess: float  # effective sample size (rejection sampling: the accepted count)


def snis_moments(log_w: torch.Tensor, phi: torch.Tensor) -> MomentEstimate:
    """E_p[phi] ~ sum_i w_i phi_i / sum_i w_i, with w_i = p~(x_i)/q(x_i), x_i ~ q.

    Standard error by the delta method, Var ~ sum_i wbar_i^2 (phi_i - E_hat)^2 with wbar the
    normalised weights: right for large N, too small while the heavy part is still unseen."""
    check_log_weights(log_w, "SNIS")
    weights = torch.softmax(log_w.double(), dim=0).unsqueeze(1)  # normalised weights w_i / sum_j w_j
    phi = phi.double()
    moments = (weights * phi).sum(0)
    se = torch.sqrt((weights**2 * (phi - moments) ** 2).sum(0))
    return MomentEstimate(moments.float(), se.float(), effective_sample_size(log_w))


@dataclass
class NoiseTest:
    """moments_within_noise's verdict: are K estimated gaps all within their noise at `level`?"""

    passed: bool
    max_z: float  # max_k |gap_k| / se_k (inf: a feature with se_k = 0 that misses; nan: a nan gap or s.e.)
    threshold: float  # the max |z| that passes: Phi^{-1}((1 + level^(1/K)) / 2), K the features tested
    tested: int  # K: the features with a finite, positive s.e.
    level: float


def moments_within_noise(gap: torch.Tensor, se: torch.Tensor, level: float = 0.95) -> NoiseTest:
    """Whether every gap_k (e.g. mean_D phi_k - E_hat phi_k) is within the noise of its estimate:
    max_k |z_k| <= c_K with z_k = gap_k / se_k and c_K = Phi^{-1}((1 + level^(1/K)) / 2).

    Calibration: where every true gap is 0 and the estimates are Gaussian, gap ~ N(0, Sigma)
    with diag(Sigma) = se^2, the test passes with probability P(|z_k| <= c_K for all k). The
    per-feature z_k from one SNIS sample are correlated, and only their s.e. (not Sigma) is at
    hand; Sidak's inequality (1967) bounds any centred Gaussian vector, whatever its
    correlations: P(|z_k| <= c_k for all k) >= prod_k P(|z_k| <= c_k) = (level^(1/K))^K = level.
    So the pass rate at the truth is exactly `level` for independent z_k and higher (up to
    2 Phi(c_K) - 1 for perfectly correlated ones) otherwise: at 95%, c_K = 1.96, 2.49, 2.57,
    2.68 for K = 1, 4, 5, 7 (Bonferroni's Phi^{-1}(1 - (1 - level) / 2K) is slightly larger).
    A chi-square test on z^T Sigma^{-1} z would be exact under correlation, but needs Sigma, and
    with binary features that overlap (the motif and its supermotif) Sigma is near singular.

    An L1 mismatch sum_k |gap_k| against 2 sqrt(sum_k se_k^2) is not such a test: with equal
    s.e. it asks sum_k |z_k| < 2 sqrt(K), which N(0, 1) draws meet about 76% of the time for
    K = 4, 66% for 5, 45% for 7 (E sum |z_k| = 0.8 K grows faster than sqrt(K)).

    A feature with se_k = 0 (constant over the sample) is not a random quantity: gap_k = 0 is
    left out of K, any other gap is infinitely off (fails). A nan gap or s.e., or an infinite
    s.e., fails: that estimate says nothing. K = 0 (every feature exact) passes."""
    if not 0 < level < 1:
        raise ValueError(f"moments_within_noise: level={level} must be in (0, 1)")
    gap, se = gap.double().flatten(), se.double().flatten()
    if gap.shape != se.shape:
        raise ValueError(f"moments_within_noise: {len(gap)} gaps and {len(se)} standard errors")
    noisy = torch.isfinite(se) & (se > 0)
    z = torch.where(noisy, gap.abs() / torch.where(noisy, se, 1.0), torch.where(gap == 0, 0.0, math.inf))
    z = torch.where(torch.isnan(gap) | torch.isnan(se) | torch.isposinf(se), math.nan, z)
    tested = int(noisy.sum())
    threshold = NormalDist().inv_cdf((1 + level ** (1 / max(tested, 1))) / 2)
    max_z = float(z.max()) if len(z) else 0.0  # torch's max propagates nan
    return NoiseTest(bool(max_z <= threshold), max_z, threshold, tested, level)


@dataclass
class MomentGap:
    gap: torch.Tensor  # (K,) estimate of E_p[phi] - E_q[phi]
    se: torch.Tensor  # (K,) its standard error
    ess: float  # effective sample size of the weights


def snis_moment_gap(log_w: torch.Tensor, phi: torch.Tensor) -> MomentGap:
    """E_p[phi] - E_q[phi] from the same draws x_i ~ q: sum_i wbar_i phi_i - mean_i phi_i, with wbar
    the normalised weights p~(x_i)/q(x_i). Paired, so it is close to 0 with a small s.e. when q ~ p.

    Standard error by the delta method: each draw's influence on the difference is
    N wbar_i (phi_i - E_hat_p) - (phi_i - E_hat_q), and Var ~ sum_i influence_i^2 / N^2 (as for
    snis_moments: too small while the weights' heavy part is unseen)."""
    check_log_weights(log_w, "SNIS")
    n = len(log_w)
    weights = torch.softmax(log_w.double(), dim=0).unsqueeze(1)
    phi = phi.double()
    mean_p, mean_q = (weights * phi).sum(0), phi.mean(0)
    influence = n * weights * (phi - mean_p) - (phi - mean_q)
    se = torch.sqrt((influence**2).sum(0)) / n
    return MomentGap(mean_p - mean_q, se, effective_sample_size(log_w))


def accept(log_w: torch.Tensor, log_bound: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Accept x ~ q with probability min(1, P(x) / (beta q(x))) = exp(min(0, log w - log beta)):
    accepted x ~ P / Z when beta bounds P/q (rejection), x ~ p_beta below that (quasi-rejection)."""
    u = torch.rand(log_w.shape, device=log_w.device, generator=generator, dtype=torch.float64)
    return torch.log(u) < (log_w.double() - log_bound).clamp(max=0.0)  # log u < 0: the clamp changes no decision


def rejection_moments(log_w: torch.Tensor, phi: torch.Tensor, log_bound: float,
                      generator: torch.Generator | None = None) -> MomentEstimate | None:
    """E_p[phi] as the mean phi of the accepted proposals (exact samples of p); None if none is."""
    keep = accept(log_w, log_bound, generator)
    count = int(keep.sum())
    if not count:
        return None
    kept = phi[keep].double()
    se = kept.std(0, unbiased=False) / math.sqrt(count)
    return MomentEstimate(kept.mean(0).float(), se.float(), float(count))


@dataclass
class RejectionResult:
    tokens: torch.Tensor  # (num, T) accepted sequences, exact samples of p = P / Z
    proposals: int
    accepted: int  # all accepted proposals, including the surplus of the last batch

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / max(self.proposals, 1)


def rejection_sample(proposal, target, num: int, max_len: int, batch_size: int, max_proposals: int,
                     generator: torch.Generator | None = None, progress: str = "rs") -> RejectionResult:
    """Draw `num` exact samples of p = P / Z by rejection from `proposal` q: accept x ~ q with
    probability P(x) / (beta q(x)), log beta = target.log_weight_bound(q, max_len)."""
    log_bound = target.log_weight_bound(proposal, max_len)
    if log_bound is None:
        raise EstimatorError(f"rejection sampling: {type(target).__name__} has no known bound on P/q for a "
                             f"{type(proposal).__name__} proposal")
    return RejectionResult(*_accepted_draws(proposal, target, num, max_len, batch_size, max_proposals, log_bound,
                                            generator, progress, "rejection sampling"))


def _accepted_draws(proposal, target, num: int, max_len: int, batch_size: int, max_proposals: int, log_beta: float,
                    generator: torch.Generator | None, progress: str, what: str) -> tuple[torch.Tensor, int, int]:
    """x ~ q in batches of `batch_size`, each kept by `accept` at log beta, until `num` are kept:
    (the first `num` kept, proposals drawn, proposals kept). The loop of rejection and QRS."""
    accepted: list[torch.Tensor] = []
    have = proposals = 0
    bar = Progress(progress, num, "accepted")
    while have < num:
        if proposals >= max_proposals:
            raise EstimatorError(
                f"{what} accepted {have} of {proposals} proposals (rate {have / max(proposals, 1):.2e}), "
                f"short of the {num} needed within max_proposals={max_proposals}")
        samples = proposal.sample(batch_size, max_len, generator)
        keep = accept(target.log_weight(proposal, samples), log_beta, generator)
        proposals += batch_size
        if keep.any():
            accepted.append(samples.tokens[keep])
            have += int(keep.sum())
        bar.update(min(have, num), f"{proposals:,} proposals, acceptance {have / proposals:.2e}")
    bar.close()
    return pad_cat(accepted)[:num], proposals, have


# ---- quasi-rejection sampling (Eikema et al. 2022) ------------------------------------------------
# Accept x ~ q with probability min(1, w(x) / beta), w = P/q, for any beta > 0: the accepted x
# follow p_beta(x) = min(q(x), P(x) / beta) / a(beta), a(beta) = E_q[min(1, w / beta)] the
# acceptance rate; p_beta = p = P / Z once beta >= max P/q (rejection sampling). A lower beta
# costs fewer proposals per sample and moves p_beta towards q; one batch of q estimates how far.

@dataclass
class QRSDiagnostics:
    """Quasi-rejection sampling at one beta, estimated from one batch x_i ~ q (self-normalised)."""

    log_beta: float
    acceptance: float  # a(beta) = E_q[min(1, w / beta)]
    tv: float  # TV(p, p_beta) = 1/2 E_q[|w / Z - min(1, w / beta) / a|]
    kl: float  # KL(p || p_beta) = E_q[(w / Z) (log a - log Z + max(log beta, log w))]


@dataclass
class QRSResult(RejectionResult):
    """tokens: samples of p_beta (of p when beta >= max P/q); accepted / proposals estimates a(beta)."""

    log_beta: float


def _qrs_curves(log_w: torch.Tensor, log_betas: torch.Tensor, cells: int = 1 << 21
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log a, TV, KL) at each log beta from log-weights x_i ~ q, as the distance between the two
    weighted samples p-hat_i = w_i / sum w and p_beta-hat_i = m_i / sum m, m_i = min(1, w_i / beta);
    about `cells` (beta, x_i) pairs at a time."""
    log_w = log_w.double().flatten()
    log_betas = log_betas.double().to(log_w.device).flatten()
    n = len(log_w)
    log_s = torch.logsumexp(log_w, 0)  # log sum_i w_i = log (n Z-hat)
    w_bar = torch.exp(log_w - log_s)  # p-hat_i
    log_a, tv, kl = [], [], []
    for b in log_betas.split(max(1, cells // n)):
        b = b.unsqueeze(1)
        log_m = (log_w - b).clamp(max=0.0)  # log m_i = min(0, log w_i - log beta)
        log_sm = torch.logsumexp(log_m, 1)  # log sum_i m_i = log (n a-hat)
        m_bar = torch.exp(log_m - log_sm.unsqueeze(1))  # p_beta-hat_i
        log_a.append(log_sm - math.log(n))
        tv.append(0.5 * (w_bar - m_bar).abs().sum(1))
        # log p/p_beta = log w - log m + log a - log Z = max(log w, log beta) + log (n a) - log (n Z)
        kl.append(((w_bar * torch.maximum(log_w, b)).sum(1) + log_sm - log_s).clamp(min=0.0))
    log_a, tv, kl = torch.cat(log_a), torch.cat(tv), torch.cat(kl)
    # beta >= max w: m_i = w_i / beta, p_beta-hat = p-hat exactly (rejection sampling), a = Z-hat / beta
    exact = log_betas >= log_w.max()
    log_a = torch.where(exact, log_s - math.log(n) - log_betas, log_a)
    return log_a, tv.masked_fill(exact, 0.0), kl.masked_fill(exact, 0.0)


def qrs_diagnostics(log_w: torch.Tensor, log_betas) -> list[QRSDiagnostics]:
    """Acceptance a(beta), TV(p, p_beta) and KL(p || p_beta) at each log beta (a 1-D tensor or a
    list), estimated from one batch of log-weights log w_i = log P(x_i) - log q(x_i), x_i ~ q.

    Self-normalised (Z-hat = mean w), so TV and KL are those of the weighted samples p-hat and
    p_beta-hat: >= 0, and exactly 0 once beta >= max_i w_i. Like Z-hat they cannot see heavy
    weights that the batch has not drawn: a beta above every drawn weight looks exact."""
    check_log_weights(log_w, "quasi-rejection diagnostics")
    log_betas = torch.as_tensor(log_betas, dtype=torch.float64).reshape(-1)
    if not torch.isfinite(log_betas).all():
        raise ValueError(f"quasi-rejection diagnostics: log beta must be finite, got {log_betas.tolist()}")
    log_a, tv, kl = _qrs_curves(log_w, log_betas)
    return [QRSDiagnostics(float(b), math.exp(float(la)), float(t), float(k))
            for b, la, t, k in zip(log_betas, log_a, tv, kl, strict=True)]


@dataclass
class QRSEstimate(QRSDiagnostics):
    """qrs_diagnostics at one beta with delta-method standard errors, from `draws` draws x_i ~ q."""

    acceptance_se: float
    tv_se: float
    kl_se: float
    draws: int


def qrs_estimate(log_w: torch.Tensor, log_beta: float) -> QRSEstimate:
    """Acceptance a(beta), TV(p, p_beta) and KL(p || p_beta) at one log beta (qrs_diagnostics' values)
    with their standard errors, from log-weights of draws x_i ~ q that did NOT choose beta (a pilot's
    own numbers at the beta it chose are biased low: choose_log_beta stops where they cross max_tv).

    With u_i = w_i / Z-hat and v_i = m_i / a-hat (m_i = min(1, w_i / beta), Z-hat = mean w, a-hat =
    mean m), each estimate is a smooth function of sample means, and its standard error is
    sqrt(sum_i I_i^2) / n with the delta-method influence I_i of draw i:

        acceptance  a-hat = mean m_i                      I_i = m_i - a-hat (the plain s.e. of a mean)
        TV  = 1/2 mean |u_i - v_i|                        I_i = h_i - TV - S_u (u_i - 1) + S_v (v_i - 1),
              h_i = 1/2 |u_i - v_i|, s_i = sign(u_i - v_i), S_u = 1/2 mean s_i u_i, S_v = 1/2 mean s_i v_i
              (the derivatives of TV in Z-hat and a-hat, times Z-hat and a-hat)
        KL  = sum_i (u_i / n) l_i + log a-hat - log Z-hat, l_i = max(log w_i, log beta)
                                                          I_i = u_i (l_i - lbar) + v_i - u_i,
              lbar = mean u_i l_i.

    Like Z-hat's they are right for large n and too small while the heavy part of the weights is
    unseen; at beta >= max_i w_i every estimate but a-hat is exactly 0, and so are their s.e."""
    check_log_weights(log_w, "quasi-rejection estimate")
    diag = qrs_diagnostics(log_w, [log_beta])[0]
    log_w = log_w.double().flatten()
    n, b = len(log_w), diag.log_beta
    log_m = (log_w - b).clamp(max=0.0)
    u = torch.exp(log_w - torch.logsumexp(log_w, 0) + math.log(n))  # w_i / Z-hat
    v = torch.exp(log_m - torch.logsumexp(log_m, 0) + math.log(n))  # m_i / a-hat
    m = log_m.exp()
    acceptance_se = float(torch.sqrt(((m - m.mean()) ** 2).sum())) / n
    if b >= float(log_w.max()):  # p_beta-hat = p-hat exactly (rejection sampling)
        return QRSEstimate(**vars(diag), acceptance_se=acceptance_se, tv_se=0.0, kl_se=0.0, draws=n)
    diff = u - v
    s = torch.sign(diff)
    h = 0.5 * diff.abs()
    tv_infl = h - h.mean() - 0.5 * (s * u).mean() * (u - 1) + 0.5 * (s * v).mean() * (v - 1)
    ell = torch.maximum(log_w, torch.tensor(b, dtype=torch.float64))
    kl_infl = u * (ell - (u * ell).mean()) + v - u
    tv_se, kl_se = (float(torch.sqrt((i**2).sum())) / n for i in (tv_infl, kl_infl))
    return QRSEstimate(**vars(diag), acceptance_se=acceptance_se, tv_se=tv_se, kl_se=kl_se, draws=n)


def choose_log_beta(log_w: torch.Tensor, *, beta: float | None = None, target_acceptance: float | None = None,
                    max_tv: float | None = None, rounds: int = 10, points: int = 16) -> QRSDiagnostics:
    """Beta for quasi-rejection sampling from a pilot batch of log-weights (x_i ~ q), given exactly one of:
    `beta` (fixed), `target_acceptance` (the beta whose estimated a(beta) is that value) or `max_tv`
    (the smallest beta, i.e. the cheapest sampler, whose estimated TV(p, p_beta) <= max_tv).
    Returns the pilot's diagnostics at that beta.

    a(beta) decreases and TV(p, p_beta) does not increase with beta: each is searched on a grid of
    `points` + 1 log betas between min and max log w_i, refined `rounds` times around the crossing.
    Past max w, a = Z-hat / beta in closed form (and TV = KL = 0)."""
    given = {k: v for k, v in (("beta", beta), ("target_acceptance", target_acceptance), ("max_tv", max_tv))
             if v is not None}
    if len(given) != 1:
        raise ValueError(f"quasi-rejection beta: give exactly one of beta, target_acceptance, max_tv (got "
                         f"{sorted(given) or 'none'})")
    check_log_weights(log_w, "quasi-rejection beta")
    log_w = log_w.double().flatten()
    finite = log_w[torch.isfinite(log_w)]
    lo, hi = float(finite.min()), float(finite.max())
    if beta is not None:
        if not (0 < beta < math.inf):
            raise ValueError(f"quasi-rejection beta: beta={beta} must be a positive number")
        return qrs_diagnostics(log_w, [math.log(beta)])[0]
    if target_acceptance is not None:
        if not 0 < target_acceptance <= 1:
            raise ValueError(f"quasi-rejection beta: target_acceptance={target_acceptance} must be in (0, 1]")
        reachable = len(finite) / len(log_w)  # a(beta) -> share of w_i > 0 as beta -> 0
        if target_acceptance > reachable:
            raise EstimatorError(f"quasi-rejection beta: target_acceptance={target_acceptance} is above the highest "
                                 f"acceptance any beta reaches, {reachable:.4g} (the share of pilot proposals with "
                                 "P(x) > 0)")
        log_target = math.log(target_acceptance)
        log_beta_exact = float(torch.logsumexp(log_w, 0)) - math.log(len(log_w)) - log_target  # Z-hat / a
        if log_beta_exact >= hi:  # beyond max w: rejection sampling at the target's rate
            return qrs_diagnostics(log_w, [log_beta_exact])[0]
        if target_acceptance == reachable:
            return qrs_diagnostics(log_w, [lo])[0]
        return _crossing(log_w, lo, hi, lambda log_a, tv: log_a <= log_target, rounds, points)
    if not 0 < max_tv < 1:
        raise ValueError(f"quasi-rejection beta: max_tv={max_tv} must be in (0, 1)")
    at_lo = qrs_diagnostics(log_w, [lo])[0]  # beta <= min w: p_beta = q, acceptance 1 on P > 0
    if at_lo.tv <= max_tv:
        return at_lo
    return _crossing(log_w, lo, hi, lambda log_a, tv: tv <= max_tv, rounds, points)


def _crossing(log_w: torch.Tensor, lo: float, hi: float, holds: Callable, rounds: int, points: int
              ) -> QRSDiagnostics:
    """The smallest log beta in (lo, hi] where holds(log a, TV), a condition false at lo and true
    from some log beta on (true at hi), to (hi - lo) / points^rounds; the diagnostics there."""
    for _ in range(rounds):
        grid = torch.linspace(lo, hi, points + 1, dtype=torch.float64)
        log_a, tv, _ = _qrs_curves(log_w, grid)
        ok = holds(log_a, tv)
        ok[-1] = True  # hi holds (recomputed values can differ in the last bit)
        first = max(int(ok.nonzero()[0]), 1)
        lo, hi = float(grid[first - 1]), float(grid[first])
    return qrs_diagnostics(log_w, [hi])[0]


def quasi_rejection_sample(proposal, target, num: int, max_len: int, batch_size: int, max_proposals: int,
                           log_beta: float, generator: torch.Generator | None = None,
                           progress: str = "qrs") -> QRSResult:
    """Draw `num` samples of p_beta = min(q, P / beta) / a(beta) by quasi-rejection from `proposal`
    q (Eikema et al. 2022): accept x ~ q with probability min(1, P(x) / (beta q(x))). Any beta > 0
    works; at beta >= max P/q (e.g. target.log_weight_bound) it is rejection_sample, draw for draw.
    choose_log_beta picks beta from a pilot batch and says how far p_beta is from p."""
    if not math.isfinite(log_beta):
        raise ValueError(f"quasi-rejection sampling: log beta must be finite, got {log_beta}")
    return QRSResult(*_accepted_draws(proposal, target, num, max_len, batch_size, max_proposals, log_beta,
                                      generator, progress, "quasi-rejection sampling"), float(log_beta))


@dataclass
class ZEstimate:
    log_z: float
    z: float
    rel_se: float  # standard error of Z-hat divided by Z-hat
    ess: float
    num: int


def importance_z(proposal, target, num: int, batch_size: int, max_len: int,
                 generator: torch.Generator | None = None, *, rel_tol: float | None = None,
                 min_samples: int = 0, tail_hits: float | None = None,
                 observe: Callable[[Samples, torch.Tensor], None] | None = None) -> ZEstimate:
    """Z = E_q[P(x)/q(x)] ~ mean_i w_i, x_i ~ q, from batches of `batch_size` samples of q.

    rel_se = std(w) / (sqrt(N) mean(w)), the relative standard error of Z-hat (CLT).
    With `rel_tol`, sampling stops after the first batch (and at least `min_samples`) where
    rel_se <= rel_tol; `num` is then the cap. The empirical rel_se cannot see heavy weights that
    have not been drawn yet (before the first one, the weights look uniform and rel_se looks
    small while Z-hat is far too low): with `tail_hits`, the stop also waits until the draws
    hold that many expected rejection-sampling accepts (ExpectedAccepts, with the target's
    bound on P/q). observe(samples, log_w) sees every batch (e.g. for SNIS moments).
    """
    log_bound = target.log_weight_bound(proposal, max_len) if tail_hits else None
    accepts = ExpectedAccepts(log_bound, tail_hits) if log_bound is not None else None
    log_ws = []
    drawn = 0
    while drawn < num:
        samples = proposal.sample(min(batch_size, num - drawn), max_len, generator)
        log_w = target.log_weight(proposal, samples).double()
        if observe is not None:
            observe(samples, log_w)
        if accepts is not None:
            accepts.add(log_w)
        log_ws.append(log_w)
        drawn += len(log_w)
        if rel_tol is not None and drawn >= min_samples and (accepts is None or accepts()):
            current = torch.cat(log_ws)
            if torch.isfinite(current).any() and _z_from_log_w(current).rel_se <= rel_tol:
                break
    log_w = torch.cat(log_ws)
    check_log_weights(log_w, "importance-sampling Z")
    return _z_from_log_w(log_w)


class ExpectedAccepts:
    """sum_i w_i / beta over every draw added so far (w_i / beta clipped at 1): the expected
    number of exact samples rejection sampling with bound beta would accept from them, n Z-hat /
    beta. As a stopping test for importance_z (`tail_hits`) it is robust to the heavy tail that
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
