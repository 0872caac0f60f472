"""Exact evaluation on small problems: every output of the sampler, enumerated.

A sampler with the limit max_len (symbols, EOS included) writes k < max_len bits then EOS, or
max_len bits and stops without EOS (truncated): 2^(max_len + 1) - 1 outputs in all, and an
LSTM policy's probabilities sum to exactly 1 over them. On that space, with the potential
P_lambda = r exp(lambda . phi) scored on every output:

    Z = sum_x P_lambda(x),   p_lambda = P_lambda / Z,   p_true = uniform over the n-bit strings
    that contain the motif (then EOS), and for a policy pi:
    KL(p || pi) = sum_x p (log p - log pi),   TV(p, pi) = 1/2 sum_x |p - pi|.

KLs are in nats per sequence; cross-entropies in nats per symbol (n + 1), as everywhere else.
`eval.exact=true` puts these numbers in results.json under `exact` (pipeline.py) and, for the
DPG family, logs KL(p || pi), KL(pi || p) and TV at every check (`ExactCurve`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import lightning.pytorch as pl
import torch
import torch.nn.functional as F

from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import Potential, Product
from gam_rl.tokens import EOS, PAD, VOCAB

MAX_OUTPUTS = 2**20  # the largest enumerated space: max_len <= 19


def num_outputs(max_len: int) -> int:
    """sum_{k < max_len} 2^k finished strings + 2^max_len truncated ones."""
    return 2 ** (max_len + 1) - 1


def max_len_problem(max_len: int) -> str | None:
    """Why eval.exact cannot run at this max_len, or None."""
    if num_outputs(max_len) <= MAX_OUTPUTS:
        return None
    largest = int(math.log2(MAX_OUTPUTS + 1)) - 1
    return (f"eval.exact=true with max_len={max_len}: the sampler has 2^{max_len + 1} - 1 outputs, above the "
            f"exact-evaluation cap of 2^{int(math.log2(MAX_OUTPUTS))} (max_len <= {largest}); lower max_len "
            "(and n), e.g. profile=toy, or set eval.exact=false")


def output_batches(max_len: int, batch_size: int = 65536) -> Iterator[torch.Tensor]:
    """Every output as a (B, max_len) token batch: for each bit count k the integers 0 .. 2^k - 1
    written in k bits (then EOS and PAD for k < max_len), in chunks of at most batch_size rows."""
    for k in range(max_len + 1):
        for start in range(0, 2**k, batch_size):
            ints = torch.arange(start, min(start + batch_size, 2**k))
            rows = torch.full((len(ints), max_len), PAD, dtype=torch.long)
            if k:
                shifts = torch.arange(k - 1, -1, -1)
                rows[:, :k] = (ints.unsqueeze(1) >> shifts) & 1  # most significant bit first
            if k < max_len:
                rows[:, k] = EOS
            yield rows


class OutputSpace:
    """The enumerated outputs of one max_len, kept as int8 batches to score any policy on."""

    def __init__(self, max_len: int, batch_size: int = 65536):
        problem = max_len_problem(max_len)
        if problem:
            raise ValueError(problem)
        self.max_len = max_len
        self.batches = [b.to(torch.int8) for b in output_batches(max_len, batch_size)]
        self.size = sum(len(b) for b in self.batches)

    def score(self, fn: Callable[[torch.Tensor], torch.Tensor], device: torch.device | str = "cpu") -> torch.Tensor:
        """fn(tokens) on every output, concatenated as float64 (no autograd)."""
        with torch.no_grad():
            return torch.cat([fn(b.long().to(device)).double().cpu() for b in self.batches])

    def log_prob(self, policy: LSTMPolicy) -> torch.Tensor:
        """log pi(x) of every output, in output_batches' order (tree_log_prob)."""
        return tree_log_prob(policy, self.max_len)

    def log_potential(self, potential: Potential, device: torch.device | str = "cpu") -> torch.Tensor:
        """log P(x) of every output: a policy factor through the prefix tree, the rest per batch."""
        if isinstance(potential, LSTMPolicy):
            return self.log_prob(potential)
        if isinstance(potential, Product):
            return sum(self.log_potential(factor, device) for factor in potential.factors)
        return self.score(potential.log_potential, device)


def tree_log_prob(policy: LSTMPolicy, max_len: int, *, grad: bool = False) -> torch.Tensor:
    """log pi(x) of every output by one LSTM step per prefix of the binary tree (2^k prefixes at
    depth k) instead of one pass per output: 2^max_len - 1 steps in max_len batched calls.

    A prefix s of k bits has log pi(s) = sum of its bits' log-probabilities; the output s EOS has
    log pi(s) + log pi(EOS | s), and a prefix of max_len bits is the truncated output s itself.
    Prefix i at depth k has children 2i (bit 0) and 2i + 1 (bit 1): output_batches' order.
    Dropout off; grad: keep autograd (differentiable in pi's weights; else none)."""
    with eval_mode(policy), torch.set_grad_enabled(grad):
        dev, layers, hidden = policy.device, policy.layers, policy.hidden
        dtype = policy.head.weight.dtype
        state = (torch.zeros(layers, 1, hidden, device=dev, dtype=dtype),) * 2
        inputs = torch.zeros(1, 1, VOCAB, device=dev, dtype=dtype)  # BOS: the zero vector
        log_prefix = torch.zeros(1, dtype=torch.float64, device=dev)
        ended = []
        for k in range(max_len):
            out, state = policy.lstm(inputs, state)
            logp = torch.log_softmax(policy.head(out[:, 0]), dim=-1).double()  # (2^k, 3): next-symbol log-probs
            ended.append(log_prefix + logp[:, EOS])  # s EOS, for every k-bit prefix s
            log_prefix = (log_prefix.unsqueeze(1) + logp[:, :EOS]).reshape(-1)  # children s0, s1
            if k + 1 < max_len:
                state = tuple(t.repeat_interleave(2, dim=1) for t in state)
                bits = torch.arange(2 ** (k + 1), device=dev) % 2  # the child's last bit
                inputs = F.one_hot(bits, VOCAB).to(dtype).unsqueeze(1)
        return torch.cat(ended + [log_prefix]).cpu()  # then the max_len-bit truncated outputs


# ---- divergences between distributions given as log-probabilities over the same space -----------

def fixed_sum(x: torch.Tensor) -> float:
    """sum x, correctly rounded (math.fsum): the same at any thread count, where torch's sum over more
    than 32,768 elements adds per-thread partial sums (the last digit moved between 1 and 2 threads)."""
    return math.fsum(x.double().reshape(-1).tolist())


def fixed_logsumexp(x: torch.Tensor) -> float:
    """log sum exp(x) through fixed_sum."""
    top = float(x.max())
    return top if not math.isfinite(top) else top + math.log(fixed_sum((x.double() - top).exp()))


def kl(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """KL(p || q) = sum_{p > 0} p (log p - log q) (inf where q = 0 < p)."""
    log_p, log_q = log_p.double(), log_q.double()
    support = torch.isfinite(log_p)
    p = log_p[support].exp()
    return fixed_sum(p * (log_p[support] - log_q[support]))


def tv(log_p: torch.Tensor, log_q: torch.Tensor) -> float:
    """TV(p, q) = 1/2 sum_x |p(x) - q(x)|."""
    return 0.5 * fixed_sum((log_p.double().exp() - log_q.double().exp()).abs())


def entropy(log_p: torch.Tensor) -> float:
    log_p = log_p.double()
    support = torch.isfinite(log_p)
    return -fixed_sum(log_p[support].exp() * log_p[support])


def divergences(name: str, log_p: torch.Tensor, log_pi: torch.Tensor, log_p_true: torch.Tensor | None) -> dict:
    """KL both ways and TV between p_lambda and a policy; KL(p_true || policy) when given."""
    out = {f"kl_p_{name}": kl(log_p, log_pi), f"kl_{name}_p": kl(log_pi, log_p), f"tv_p_{name}": tv(log_p, log_pi)}
    if log_p_true is not None:
        out[f"kl_true_{name}"] = kl(log_p_true, log_pi)
    return out


@dataclass
class ExactTarget:
    """p = P / Z over the enumerated space, with the space kept to score policies on."""

    space: OutputSpace
    log_p: torch.Tensor  # (outputs,) float64, log p(x)
    log_z: float  # log sum_x P(x)
    log_p_true: torch.Tensor | None  # (outputs,) log p_true(x), -inf off its support

    @classmethod
    def of(cls, target: Potential, space: OutputSpace, device, true_log_prob=None) -> ExactTarget:
        log_unnorm = space.log_potential(target, device)
        log_z = fixed_logsumexp(log_unnorm)  # log Z = log sum_x P(x)
        log_p_true = space.score(true_log_prob, device) if true_log_prob is not None else None
        return cls(space, log_unnorm - log_z, log_z, log_p_true)

    def policy_divergences(self, policy: LSTMPolicy, name: str = "pi") -> dict:
        return divergences(name, self.log_p, self.space.log_prob(policy), self.log_p_true)


def qrs_divergences(target: ExactTarget, log_q: torch.Tensor, log_beta: float) -> dict:
    """What quasi-rejection sampling from q at beta gives, exactly: p_beta(x) = min(q(x), P(x)/beta) / a,
    a = sum_x min(q(x), P(x)/beta) the acceptance rate; TV(p, p_beta) and KL(p || p_beta). As
    results.json's exact.qrs_acceptance, exact.qrs_tv, exact.qrs_kl for method=distill_qrs: the truth
    behind its estimates distill_qrs_acceptance_est, distill_qrs_tv, distill_qrs_kl (and *_pilot)."""
    log_accepted = torch.minimum(log_q, target.log_p + target.log_z - log_beta)  # log min(q, P / beta)
    log_a = fixed_logsumexp(log_accepted)
    log_p_beta = log_accepted - log_a
    return {"qrs_acceptance": math.exp(log_a), "qrs_tv": tv(target.log_p, log_p_beta),
            "qrs_kl": kl(target.log_p, log_p_beta)}


def exact_results(target: ExactTarget, r: LSTMPolicy, pi: LSTMPolicy | None, log_p_test: torch.Tensor,
                  symbols: int, results: dict) -> dict:
    """results.json's `exact` section.

    log_p_test: log P_lambda on T (unnormalised); results: the run's own, with the importance-sampled
    {z_hat, z_rel_se, ce_test_p_lambda, ce_test_p_lambda_se} of the Z stage (their errors are given in
    its standard errors) and CE(T, r), CE(T, pi), already exact (a policy is normalised), copied."""
    ce_p = -float((log_p_test.double() - target.log_z).mean()) / symbols  # CE(T, p_lambda) with the exact Z
    out = {"outputs": target.space.size, "max_len": target.space.max_len, "log_z": target.log_z,
           "z": math.exp(target.log_z), "ce_test_r": results.get("ce_test_r"), "ce_test_p_lambda": ce_p,
           "h_p_lambda": entropy(target.log_p) / symbols,
           "mass_truncated_p_lambda": fixed_sum(target.log_p[-2**target.space.max_len:].exp())}
    if target.log_p_true is not None:
        out["kl_true_p"] = kl(target.log_p_true, target.log_p)
    out.update(target.policy_divergences(r, "r"))
    if pi is not None:
        out["ce_test_pi"] = results.get("ce_test_pi")
        out.update(target.policy_divergences(pi, "pi"))
    z_hat, rel_se = results.get("z_hat"), results.get("z_rel_se")
    if z_hat and rel_se:  # (Z-hat - Z) / s.e.(Z-hat), s.e. = rel_se Z-hat
        out["z_hat_error_se"] = (z_hat - out["z"]) / (rel_se * z_hat)
    if results.get("log_z_hat") is not None:  # the Z stage's estimator's error (z.estimator: is or smc)
        out["log_z_hat_error"] = results["log_z_hat"] - target.log_z
    lower, upper = results.get("log_z_lower"), results.get("log_z_upper")
    if lower is not None and upper is not None:  # z.bounds: where the exact log Z lies, in each bound's s.e.
        out["log_z_in_bounds"] = bool(lower <= target.log_z <= upper)
        lower_se, upper_se = results.get("log_z_lower_se"), results.get("log_z_upper_se")
        out["log_z_lower_gap_se"] = (target.log_z - lower) / lower_se if lower_se else None  # 0: every run alike
        out["log_z_upper_gap_se"] = (upper - target.log_z) / upper_se if upper_se else None
    ce_hat, ce_se = results.get("ce_test_p_lambda"), results.get("ce_test_p_lambda_se")
    if ce_hat is not None and ce_se:
        out["ce_test_p_lambda_error_se"] = (ce_hat - ce_p) / ce_se
    return out


# ---- the twist: soft values of prefixes -------------------------------------------------------

def prefix_log_z(target: ExactTarget, prefix: str) -> float:
    """log Z(s) = log of the sum of P over the outputs that start with the bits s: for each bit count
    m >= |s| the m-bit outputs whose first |s| bits are s, a block of 2^(m - |s|) in output_batches' order
    (the m-bit outputs start at index 2^m - 1)."""
    k, v = len(prefix), int(prefix, 2) if prefix else 0
    blocks = [target.log_p[2**m - 1 + v * 2 ** (m - k): 2**m - 1 + (v + 1) * 2 ** (m - k)]
              for m in range(k, target.space.max_len + 1)]
    return target.log_z + fixed_logsumexp(torch.cat(blocks))


def prefix_rows(prefixes: list[str]) -> torch.Tensor:
    """Each prefix's bits then EOS (PAD after): row i's position |s_i| is the state s_i."""
    width = max(len(s) for s in prefixes) + 1
    rows = torch.full((len(prefixes), width), PAD, dtype=torch.long)
    for i, s in enumerate(prefixes):
        rows[i, : len(s)] = torch.tensor([int(b) for b in s], dtype=torch.long)
        rows[i, len(s)] = EOS
    return rows


def twist_values(target: ExactTarget, r: LSTMPolicy, prefixes: list[str]) -> torch.Tensor:
    """V*(s) = log Z(s) - log r(s) for every prefix (float64): the soft value of the state s in the
    token MDP (stages/twist.py); V*(empty) = log Z."""
    rows = prefix_rows(prefixes).to(r.device)
    with eval_mode(r):
        per_step = r.token_log_probs(rows).double().cpu()
    lengths = torch.tensor([len(s) for s in prefixes])
    # log r(s): the bits of s only (the EOS after them is not part of the prefix)
    log_r_prefix = (per_step * (torch.arange(per_step.shape[1]) < lengths.unsqueeze(1))).sum(1)
    return torch.tensor([prefix_log_z(target, s) for s in prefixes], dtype=torch.float64) - log_r_prefix


VALUE_PREFIXES = ["", "0", "1", "00", "01", "10", "11", "000", "001", "010", "011", "100", "101", "110", "111"]


def learned_value_errors(target: ExactTarget, r: LSTMPolicy, values: Callable[[torch.Tensor], torch.Tensor],
                         prefixes: list[str] = VALUE_PREFIXES) -> dict:
    """A method's learned V(s) (tokens -> (B, T) values of the states) against V*(s) on the prefixes
    of at most 3 bits: the learned log Z = V(empty), its error, and the largest error over the prefixes."""
    prefixes = [s for s in prefixes if len(s) < target.space.max_len]
    rows = prefix_rows(prefixes).to(r.device)
    learned = values(rows).double().cpu()[torch.arange(len(prefixes)), torch.tensor([len(s) for s in prefixes])]
    error = learned - twist_values(target, r, prefixes)
    return {"learned_log_z": float(learned[0]), "learned_log_z_error": float(error[0]),
            "learned_values_max_error": float(error.abs().max()), "learned_values_prefixes": len(prefixes)}


class ExactCurve(pl.Callback):
    """At every check of a Training-2 stage: exact KL(p_lambda || pi), KL(pi || p_lambda) and
    TV(p_lambda, pi) (and, with_true, KL(p_true || pi): DPG on the true process), logged as
    <stage>/exact_* with the stage's own values of that check (one pass over the prefix tree)."""

    def __init__(self, target: ExactTarget, stage: str, attr: str = "pi", with_true: bool = False):
        self.target, self.stage, self.attr, self.with_true = target, stage, attr, with_true
        self.last: dict = {}

    def on_validation_epoch_end(self, trainer, module):
        if trainer.sanity_checking:
            return
        log_pi = self.target.space.log_prob(getattr(module, self.attr))
        self.last = divergences("pi", self.target.log_p, log_pi, self.target.log_p_true if self.with_true else None)
        for key, value in self.last.items():
            module.log(f"{self.stage}/exact_{key}", value)
