"""Sequential Monte Carlo over token sequences: Z = sum_x P(x) with an unbiased estimate, and
bidirectional bounds on log Z.

K particles are drawn symbol by symbol from a proposal q (r, or a trained pi), and weighted
towards a sequence of intermediate targets over "running prefixes or finished outputs":

    gamma_0(empty)   = exp V(empty)                         (untwisted: V = 0, gamma_0 = 1)
    gamma_t(s_{1:t}) = r(s_{1:t}) exp V(s_{1:t})            a prefix still running after t symbols
    gamma_t(x)       = P(x)                                 an output that ended at step <= t

An output ends at EOS or after max_len symbols without one ("truncated", as LSTMPolicy.sample and
gam_rl.exact count them: k < max_len bits then EOS, or max_len bits). The final target is P on
exactly the outputs importance_z sums over, so both estimate the same Z = sum_x P(x).

Step t draws x_t ~ q(. | s_{1:t-1}) for every running particle and multiplies its weight by

    w_t = gamma_t(s_{1:t}) / (gamma_{t-1}(s_{1:t-1}) q(x_t | s_{1:t-1}))
        = r(x_t | s) exp(V(s x_t) - V(s)) / q(x_t | s)                       (still running)
        = r(x_t | s) exp(log P(x) - log r(x) - V(s)) / q(x_t | s)            (ends at step t)

and a finished particle's w_t = 1 (gamma_t = gamma_{t-1} = P(x) there). log P(x) - log r(x) is
target.log_weight(r, .), so for P_lambda = r exp(lambda . phi) it is lambda . phi(x) and r is
never scored twice. V comes from `twist` (None: V = 0, "r with resampling"; with q = r the
running weights are then 1 and only the ends weigh).

Weights, resampling and the estimate. Each particle i of a run carries W_i, starting at
gamma_0 = exp V(empty); W_i <- W_i w_{t,i} at every step. After a step, while some particle of
the run still runs, ESS = (sum W)^2 / sum W^2 is compared with ess_threshold K; below it, the run
resamples: K ancestors a_j with P(a_j = i) = W_i / sum W (systematic by default), particle j
becomes a copy of particle a_j (its prefix, its LSTM states, its V, its done flag), and every
weight is reset to the mean, W_j <- (1/K) sum_i W_i. With that convention

    Z-hat = (1/K) sum_i W_i   (at any time; at the end, the estimate)

which is the standard estimator prod_t sum_i Wbar_{t-1,i} w_{t,i} (Wbar normalised, reset to
1/K at a resampling) times gamma_0, unbiased: E[Z-hat] = Z for any proposal, twist and
threshold (the twist only changes the variance; V = V* and q = pi* = p give Z-hat = Z exactly).
The final particles weighted by W_i / sum W approximate p = P / Z, and (1/K) sum_i W_i f(x_i)
is unbiased for sum_x P(x) f(x).

Bounds (bidirectional SMC: Zhao, Brekelmans, Makhzani, Grosse, ICML 2024, "Probabilistic
Inference in Language Models via Twisted Sequential Monte Carlo", after Grosse et al.'s
bidirectional Monte Carlo). Since E[Z-hat] = Z, Jensen gives E[log Z-hat] <= log Z: the mean of
log Z-hat over independent runs is a stochastic LOWER bound. Conditional SMC (`reference`: an
exact sample of p held as particle 0 through every step; particle 0's ancestor is itself, the
other K - 1 are resampled multinomially from all K weights) draws the particle system from SMC's
"extended target", under which Z-hat / Z is the density ratio to SMC's own law: so
E_CSMC[log Z-hat] - log Z = KL(extended target || SMC) >= 0, an UPPER bound, and
E_CSMC[1 / Z-hat] = 1 / Z exactly. The gap upper - lower is the symmetrised KL between the
two particle systems, and shrinks to 0 as the twist and the proposal approach the optimal ones.

Twist convention (methods/twist_loop.py's value_function, exact.learned_value_errors): twist maps
tokens (B, T) to V (B, T) where column t is V of the state s_t = the first t symbols tokens[:, :t],
read from the LSTM output at position t, so position t must hold a symbol (not PAD). smc asks for
V(s_{1:t}) with rows "s_{1:t} EOS" (exact.prefix_rows) and reads column t; V(empty) from [[EOS]]
column 0 (TwistModule.learned_log_z).

Runs are batched: smc_runs draws R independent runs as one batch of R x K particles (each run
resampled on its own), smc is one run of it. No loop over particles: one LSTM step per symbol
for all running particles (kernel/lstm.py's StepLSTM), finished particles are dropped from the
working rows, and resampling moves rows (states included) by index. A twist with steps(num) (a
run's LearnedTwist: methods/saved_twist.py's TwistSteps) is read one symbol at a time too, its
models' states moved with the particles; any other twist is a callable on whole rows, re-read at
every step (O(max_len^2) symbols per particle). On a cpu cell (K = 1000, max_len 61, 2 x 64 models,
one thread beside two busy jobs): 0.2 s per run untwisted, 0.3 s with ctl's twist read step by step,
2.7 s with the same twist on each prefix.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from gam_rl.kernel.lstm import StepLSTM
from gam_rl.policy import LSTMPolicy, Samples, eval_mode
from gam_rl.potentials import Potential
from gam_rl.tokens import BOS, EOS, ONE, PAD, VOCAB

RESAMPLING = ("systematic", "multinomial")
MAX_BATCH_PARTICLES = 1 << 16  # log_z_bounds: runs x particles per batch


class Steps(Protocol):
    """A proposal's (or r's) next-symbol log-probabilities for a batch of prefixes, advanced one
    symbol at a time; rows are a prefix of its buffers: the first len(prev) are the working rows."""

    def log_probs(self, prev: torch.Tensor) -> torch.Tensor:
        """Read prev (n,) (BOS first) into the first n rows: (n, VOCAB) float64 log q(. | s)."""

    def keep(self, index: torch.Tensor) -> None:
        """Row j becomes a copy of row index[j] (duplicates allowed): resampling and compaction."""


class PolicySteps:
    """An LSTMPolicy one symbol at a time (StepLSTM: no dropout, no autograd)."""

    def __init__(self, policy: LSTMPolicy, num: int):
        self.lstm = StepLSTM(policy.lstm, num)
        self.w, self.b = policy.head.weight.detach().t(), policy.head.bias.detach()

    def log_probs(self, prev: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(torch.addmm(self.b, self.lstm.step(prev), self.w), dim=1).double()

    def keep(self, index: torch.Tensor) -> None:
        self.lstm.keep(index)  # z[:m] = z[index]: a gathered copy, so any order and repeats are fine


def steps_of(model, num: int) -> Steps:
    """An LSTMPolicy's PolicySteps, or model.steps(num) for any other proposal (e.g. a table)."""
    return PolicySteps(model, num) if isinstance(model, LSTMPolicy) else model.steps(num)


@dataclass
class SMCResult:
    tokens: torch.Tensor  # (K, T) the final particles, padded like LSTMPolicy.sample's tokens (T <= max_len)
    log_weights: torch.Tensor  # (K,) float64 log W_i (self-normalise them); logsumexp - log K = log_z
    log_z: float  # log Z-hat, Z-hat = (1/K) sum_i W_i: SMC's unbiased estimate of Z = sum_x P(x)
    resamples: int  # how many times it resampled
    min_ess: float  # the smallest ESS / K after a step's weighting (before its resampling decision)
    proposals: int  # symbols drawn: running particles summed over the steps run (the LSTM steps)
    log_q: torch.Tensor | None = None  # (K,) float64 log q(x_i) of each final particle, carried by the particles
    log_r: torch.Tensor | None = None  # (K,) float64 log r(x_i) likewise


@dataclass
class SMCRuns:
    """smc_runs: R independent runs of K particles."""

    tokens: torch.Tensor  # (R, K, T)
    log_weights: torch.Tensor  # (R, K) float64
    log_z: torch.Tensor  # (R,) float64 log Z-hat per run
    resamples: torch.Tensor  # (R,) long
    min_ess: torch.Tensor  # (R,) float64, ESS / K
    proposals: int  # symbols drawn, all runs together
    log_q: torch.Tensor  # (R, K) float64 log q(x) of each final particle, summed over its steps as it was drawn
    log_r: torch.Tensor  # (R, K) float64 log r(x) likewise (both follow the particle through its resamplings)


def systematic_resample(log_w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """(R, K) log-weights -> (R, K) ancestors: one u ~ U[0, 1) per run, the K points (u + j) / K
    read through the cumulative normalised weights, so particle i gets floor or ceil of K Wbar_i
    copies (expectation K Wbar_i)."""
    R, K = log_w.shape
    cdf = torch.softmax(log_w.double(), dim=1).cumsum(1)
    cdf[:, -1] = 1.0  # rounding: every point lands on a particle
    u = (torch.rand(R, 1, dtype=torch.float64, device=log_w.device, generator=generator)
         + torch.arange(K, dtype=torch.float64, device=log_w.device)) / K
    return torch.searchsorted(cdf, u, right=True).clamp_(max=K - 1)


def multinomial_resample(log_w: torch.Tensor, generator: torch.Generator | None = None,
                         conditional: bool = False) -> torch.Tensor:
    """(R, K) log-weights -> (R, K) ancestors drawn i.i.d. from Wbar; conditional: ancestor 0 is 0
    (conditional SMC's reference) and the other K - 1 are drawn i.i.d. from all K weights."""
    R, K = log_w.shape
    w = torch.softmax(log_w.double(), dim=1)
    free = K - 1 if conditional else K
    drawn = torch.multinomial(w, free, replacement=True, generator=generator) if free else w.new_zeros(
        R, 0, dtype=torch.long)
    return torch.cat([drawn.new_zeros(R, 1), drawn], 1) if conditional else drawn


def _run_lse(log_w: torch.Tensor) -> torch.Tensor:
    """(R, K) -> (R,) logsumexp over each run."""
    return torch.logsumexp(log_w, dim=1)


def _check_reference(reference: torch.Tensor, runs: int, max_len: int) -> torch.Tensor:
    """(R, L) exact samples of p -> (R, max_len) rows, checked to be outputs of the sampler."""
    if reference.dim() != 2 or reference.shape[0] != runs:
        raise ValueError(f"reference: expected ({runs}, L) tokens, got shape {tuple(reference.shape)}")
    ref = torch.full((runs, max_len), PAD, dtype=torch.long, device=reference.device)
    width = min(reference.shape[1], max_len)
    if (reference[:, max_len:] != PAD).any():
        raise ValueError(f"reference: a row has more than max_len={max_len} symbols")
    ref[:, :width] = reference[:, :width]
    is_bit = ref <= ONE
    lead = is_bit.long().cumprod(1).sum(1)  # the leading bits
    after = ref.gather(1, lead.clamp(max=max_len - 1).unsqueeze(1)).squeeze(1)
    symbols = (ref != PAD).sum(1)
    well_formed = (lead == is_bit.sum(1)) & ((lead == max_len) | ((after == EOS) & (symbols == lead + 1)))
    if not well_formed.all():
        bad = int((~well_formed).nonzero()[0])
        raise ValueError(f"reference row {bad} is not an output of the sampler (bits, then EOS unless it has "
                         f"max_len={max_len} bits, then PAD): {reference[bad].tolist()}")
    return ref


@torch.no_grad()
def smc_runs(target: Potential, proposal, r: LSTMPolicy, particles: int, max_len: int, runs: int = 1, *,
             twist: Callable[[torch.Tensor], torch.Tensor] | None = None, ess_threshold: float = 0.5,
             generator: torch.Generator | None = None, reference: torch.Tensor | None = None,
             resampling: str = "systematic") -> SMCRuns:
    """`runs` independent SMC runs of `particles` particles as one batch (the module docstring's
    algorithm; each run resamples on its own). reference: (runs, L) exact samples of p, one per run:
    conditional SMC with reference row i as particle 0 of run i (its free slots resample
    multinomially whatever `resampling` says)."""
    if particles < 1 or runs < 1 or max_len < 1:
        raise ValueError(f"smc: particles={particles}, runs={runs}, max_len={max_len} must all be >= 1")
    if resampling not in RESAMPLING:
        raise ValueError(f"smc: resampling={resampling!r}, expected one of {RESAMPLING}")
    if not 0 <= ess_threshold <= 1:
        raise ValueError(f"smc: ess_threshold={ess_threshold} must be in [0, 1]")
    dev = r.device
    R, K, N = runs, particles, runs * particles
    ref = None if reference is None else _check_reference(reference.to(dev), R, max_len)
    with eval_mode(r), (eval_mode(proposal) if isinstance(proposal, torch.nn.Module) and proposal is not r
                        else contextlib.nullcontext()):
        q_steps = steps_of(proposal, N)
        r_steps = q_steps if proposal is r else PolicySteps(r, N)
        # a twist with steps(num) (a run's LearnedTwist) is read one symbol at a time, O(1) per symbol; any
        # other twist callable is called on each prefix
        twist_steps = twist.steps(N) if twist is not None and hasattr(twist, "steps") else None
        # V(empty): the state before the first symbol (learned_log_z's [[EOS]] column 0)
        if twist_steps is not None:
            v0 = twist_steps.v0
        else:
            v0 = 0.0 if twist is None else float(twist(torch.tensor([[EOS]], device=dev))[0, 0])
        tokens = torch.full((N, max_len), PAD, dtype=torch.long, device=dev)
        log_w = torch.full((N,), v0, dtype=torch.float64, device=dev)  # log W_i = log gamma_0
        v_prev = torch.full((N,), v0, dtype=torch.float64, device=dev)  # V(s_{1:t-1}) of each particle
        log_r = torch.zeros(N, dtype=torch.float64, device=dev)  # log r(s_{1:t}), for log P - log r at the end
        log_qs = torch.zeros(N, dtype=torch.float64, device=dev)  # log q(s_{1:t})
        running = torch.ones(N, dtype=torch.bool, device=dev)
        slot_of_row = torch.arange(N, device=dev)  # the particle in each working row of the steppers
        prev = torch.full((N,), BOS, dtype=torch.long, device=dev)
        resamples = torch.zeros(R, dtype=torch.long, device=dev)
        min_ess = torch.full((R,), math.inf, dtype=torch.float64, device=dev)
        is_ref = (torch.arange(N, device=dev) % K == 0) if ref is not None else None
        proposals = 0
        for t in range(max_len):
            n = len(slot_of_row)
            slots = slot_of_row
            active = running.view(R, K).any(1)  # the runs that take this step
            # draw x_t ~ q(. | s_{1:t-1}) by inverse CDF; the reference particle takes its own symbol
            log_q = q_steps.log_probs(prev)
            log_rt = log_q if r_steps is q_steps else r_steps.log_probs(prev)
            u = torch.rand(n, dtype=torch.float64, device=dev, generator=generator)
            tok = (u.unsqueeze(1) > log_q.exp().cumsum(1)[:, : VOCAB - 1]).sum(1)
            if ref is not None:
                forced = is_ref[slots]
                tok = torch.where(forced, ref[slots // K, t], tok)
            proposals += n
            tokens[slots, t] = tok
            lq = log_q.gather(1, tok.unsqueeze(1)).squeeze(1)  # log q(x_t | s_{1:t-1})
            lr = log_rt.gather(1, tok.unsqueeze(1)).squeeze(1)  # log r(x_t | s_{1:t-1})
            log_r[slots] += lr
            log_qs[slots] += lq
            ends = (tok == EOS) | (t == max_len - 1)
            inc = lr - lq - v_prev[slots]  # log r(x_t | s) - log q(x_t | s) - V(s_{1:t-1}), then + the new end
            if ends.any():  # log w_t = ... + log P(x) - log r(x)
                done = slots[ends]
                samples = Samples(tokens[done], log_r[done], tokens[done].eq(EOS).any(1))
                inc[ends] += target.log_weight(r, samples).double().to(dev)
            go = ~ends
            if twist_steps is not None:  # V(s_{1:t}) of every working row; the steps advance past x_t
                v_rows = twist_steps.value_after(tok).double()
                if go.any():
                    v_prev[slots[go]] = v_rows[go]
                    inc[go] += v_rows[go]
            elif go.any():  # log w_t = ... + V(s_{1:t}), read at column t + 1 of "s_{1:t} EOS"
                on = slots[go]
                if twist is not None:
                    rows = torch.cat([tokens[on, : t + 1], torch.full((len(on), 1), EOS, device=dev)], 1)
                    v_new = twist(rows)[:, t + 1].double().to(dev)
                    v_prev[on] = v_new
                    inc[go] += v_new
            log_w[slots] += inc
            running[slots[ends]] = False
            # ESS / K of each run that took the step: (sum W)^2 / sum W^2 / K (0 where every W is 0)
            lw = log_w.view(R, K)
            lse = _run_lse(lw)
            ess = torch.nan_to_num(torch.exp(2 * lse - _run_lse(2 * lw)) / K, nan=0.0)
            min_ess = torch.where(active, torch.minimum(min_ess, ess), min_ess)
            if not running.any():
                break
            # resample the runs below the threshold that still have a running particle (a run with
            # every weight 0 has Z-hat = 0 for good, and nothing to resample from)
            chosen = running.view(R, K).any(1) & (ess < ess_threshold) & torch.isfinite(lse)
            ancestors = torch.arange(N, device=dev)
            if chosen.any():
                idx = chosen.nonzero().squeeze(1)
                if ref is not None:
                    a = multinomial_resample(lw[idx], generator, conditional=True)
                elif resampling == "systematic":
                    a = systematic_resample(lw[idx], generator)
                else:
                    a = multinomial_resample(lw[idx], generator)
                ancestors.view(R, K)[idx] = a + (idx * K).unsqueeze(1)
                resamples += chosen.long()
                # W_j <- (1/K) sum_i W_i: Z-hat = mean W is unchanged by the resampling
                mean = (lse - math.log(K)).unsqueeze(1).expand(R, K)
                log_w = torch.where(chosen.unsqueeze(1), mean, lw).reshape(N)[ancestors]
                tokens, running = tokens[ancestors], running[ancestors]
                log_r, log_qs, v_prev = log_r[ancestors], log_qs[ancestors], v_prev[ancestors]
            # the working rows: the running particles in slot order, each from its ancestor's row
            row_of_slot = torch.full((N,), -1, dtype=torch.long, device=dev)
            row_of_slot[slot_of_row] = torch.arange(n, device=dev)
            new_slots = running.nonzero().squeeze(1)
            source = row_of_slot[ancestors[new_slots]]
            if len(source) != n or chosen.any():
                q_steps.keep(source)
                if r_steps is not q_steps:
                    r_steps.keep(source)
                if twist_steps is not None:
                    twist_steps.keep(source)
            slot_of_row = new_slots
            prev = tokens[new_slots, t]
    width = max(int((tokens != PAD).sum(1).max()), 1)
    log_w = log_w.view(R, K)
    return SMCRuns(tokens[:, :width].reshape(R, K, width), log_w, _run_lse(log_w) - math.log(K), resamples,
                   torch.where(min_ess == math.inf, 1.0, min_ess), proposals, log_qs.view(R, K), log_r.view(R, K))


def smc(target: Potential, proposal: LSTMPolicy, r: LSTMPolicy, particles: int, max_len: int, *,
        twist: Callable[[torch.Tensor], torch.Tensor] | None = None, ess_threshold: float = 0.5,
        generator: torch.Generator | None = None, reference: torch.Tensor | None = None,
        resampling: str = "systematic") -> SMCResult:
    """One SMC run of `particles` particles towards P = target (module docstring).

    proposal: q, an LSTMPolicy (r itself, or a trained pi), or any object with steps(num) -> Steps.
    r: the base model of the intermediate targets gamma_t = r exp V. twist: tokens -> V (B, T)
    (None: V = 0). Resamples when ESS < ess_threshold K (0: never, 1: at every step).
    reference: (1, L) an exact sample of p for conditional SMC (log Z-hat then bounds log Z from
    above in expectation). resampling: systematic (default) or multinomial."""
    out = smc_runs(target, proposal, r, particles, max_len, 1, twist=twist, ess_threshold=ess_threshold,
                   generator=generator, reference=reference, resampling=resampling)
    return SMCResult(out.tokens[0], out.log_weights[0], float(out.log_z[0]), int(out.resamples[0]),
                     float(out.min_ess[0]), out.proposals, out.log_q[0], out.log_r[0])


@dataclass
class LogZBounds:
    lower: float  # mean of log Z-hat over `runs` independent SMC runs (E <= log Z)
    lower_se: float  # its standard error
    upper: float | None  # mean of conditional-SMC log Z-hat over runs seeded by exact samples (E >= log Z)
    upper_se: float | None
    log_z: float  # log of the mean of the runs' Z-hats (the unbiased estimate pooled over runs)
    runs: int
    particles: int


def pooled_log_z(log_z_runs: torch.Tensor) -> tuple[float, float]:
    """log of the mean of independent runs' Z-hats (unbiased for Z), and the relative s.e. of that mean: the
    s.d. of Z-hat_k / Z-hat over sqrt(runs) (inf for one run)."""
    runs = len(log_z_runs)
    log_z = float(torch.logsumexp(log_z_runs, 0)) - math.log(runs)
    rel_se = float(torch.exp(log_z_runs - log_z).std()) / math.sqrt(runs) if runs > 1 else math.inf
    return log_z, rel_se


def _mean_se(x: torch.Tensor) -> tuple[float, float]:
    mean = float(x.mean())
    se = float(x.std(unbiased=True)) / math.sqrt(len(x)) if len(x) > 1 else math.inf
    return mean, se


def _batched_runs(target, proposal, r, particles, max_len, runs, reference, max_batch_particles, **kw) -> torch.Tensor:
    """log Z-hat of `runs` runs, as few batches of at most max_batch_particles particles as fit."""
    per = max(1, max_batch_particles // particles)
    out = []
    for start in range(0, runs, per):
        count = min(per, runs - start)
        ref = None if reference is None else reference[start : start + count]
        out.append(smc_runs(target, proposal, r, particles, max_len, count, reference=ref, **kw).log_z)
    return torch.cat(out)


def log_z_bounds(target: Potential, proposal: LSTMPolicy, r: LSTMPolicy, particles: int, max_len: int, runs: int, *,
                 twist: Callable[[torch.Tensor], torch.Tensor] | None = None, exact_samples: torch.Tensor | None = None,
                 ess_threshold: float = 0.5, generator: torch.Generator | None = None,
                 resampling: str = "systematic", max_batch_particles: int = MAX_BATCH_PARTICLES) -> LogZBounds:
    """Bidirectional bounds on log Z: `runs` independent SMC runs (lower: their mean log Z-hat) and,
    given exact_samples (runs, L) of p, `runs` conditional-SMC runs each holding one of them (upper).
    Runs are batched up to max_batch_particles particles at a time."""
    kw = dict(twist=twist, ess_threshold=ess_threshold, generator=generator, resampling=resampling)
    lower = _batched_runs(target, proposal, r, particles, max_len, runs, None, max_batch_particles, **kw)
    low, low_se = _mean_se(lower)
    up = up_se = None
    if exact_samples is not None:
        if len(exact_samples) != runs:
            raise ValueError(f"log_z_bounds: {len(exact_samples)} exact samples for {runs} runs (one per run)")
        upper = _batched_runs(target, proposal, r, particles, max_len, runs, exact_samples, max_batch_particles, **kw)
        up, up_se = _mean_se(upper)
    return LogZBounds(low, low_se, up, up_se, pooled_log_z(lower)[0], runs, particles)
