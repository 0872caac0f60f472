"""A proposal that writes the motif: r's sampler with the motif's bits planted at a random start.

Where r rarely writes the motif (|D| <= 1000: about one draw in 400-800), P_lambda is close to r
restricted to the strings that contain it, and a proposal of r or of an early pi spends most of
its draws on strings that P_lambda all but excludes. Planting writes the motif into every draw
while keeping r everywhere else, and its probability of every string is known exactly:

    q_j   r's sampler, except that at steps j .. j+m-1 (if the row is still running) it writes the
          motif's m bits instead of sampling; j is drawn uniformly from the K = n - m + 1 starts
          that fit a string of n bits
    q(x)  = (1/K) sum_j q_j(x), with, for x whose EOS is at step L,
    q_j(x) = r(x)                                        if L < j   (the row ended before the start)
           = r(x) / prod_{t=j}^{j+m-1} r(x_t | x_<t)      if x[j : j+m] is the motif
           = 0                                           otherwise

Every term is read off r's per-symbol log-probabilities of x, so q(x) of any string (one drawn
by another proposal too) costs one pass of r, and every draw carries log q(x) and log r(x). The
weights P_lambda / q = exp(lambda . phi) r / q are finite wherever q > 0, and P_lambda > 0 outside
q's support only on strings without the motif (which a mixture with r or pi covers: PlantedMixture).

PlantedMixture is what the Training-2 loop draws from with `method.plant_motif = s`:
q = s q_plant + (1 - s) q_current, q_current the loop's own proposal (r, then copies of pi).
"""

from __future__ import annotations

import math

import torch

from gam_rl.metrics import batched_log_prob
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.potentials import Potential
from gam_rl.proposals import MixtureSamples
from gam_rl.smc import PolicySteps
from gam_rl.tokens import BOS, EOS, PAD, VOCAB, bit_lengths, pad_cat


class MotifPlanting(Potential):
    """q(x) = (1/K) sum_j q_j(x): r's sampler with `motif` written at steps j .. j+m-1 (module docstring)."""

    def __init__(self, r: LSTMPolicy, motif: str, n: int):
        if not motif or set(motif) - {"0", "1"} or len(motif) > n:
            raise ValueError(f"planting: motif {motif!r} must be a non-empty bit string of at most n={n} bits")
        self.r, self.motif, self.n = r, motif, n
        self.m, self.starts = len(motif), n - len(motif) + 1  # K = n - m + 1 starts j = 0 .. n - m
        self.bits = torch.tensor([int(b) for b in motif], dtype=torch.long, device=r.device)
        self.device = r.device

    def _check_len(self, max_len: int) -> None:
        if max_len < self.n + 1:
            raise ValueError(f"planting: max_len={max_len} is below n + 1 = {self.n + 1} (the motif's last start "
                             "must leave room for its bits and EOS)")

    def log_q_r(self, tokens: torch.Tensor, token_log_r: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(log q(x), log r(x)) of each row (float64); token_log_r: r's per-symbol log-probabilities of the
        rows if known (the sampler's), else one pass of r."""
        if token_log_r is None:
            with eval_mode(self.r):
                token_log_r = self.r.token_log_probs(tokens)
        width = self.n + 1  # every window j .. j+m-1 lies within the first n columns
        if tokens.shape[1] < width:
            tokens = torch.nn.functional.pad(tokens, (0, width - tokens.shape[1]), value=PAD)
            token_log_r = torch.nn.functional.pad(token_log_r, (0, width - token_log_r.shape[1]), value=0.0)
        tlp = token_log_r.double()
        log_r = tlp.sum(1)
        # S_j = sum_{t=j}^{j+m-1} log r(x_t | x_<t), from the running sum
        cum = torch.nn.functional.pad(tlp.cumsum(1), (1, 0))
        starts = torch.arange(self.starts, device=tokens.device)
        window = cum[:, starts + self.m] - cum[:, starts]  # (B, K)
        # x[j : j+m] is the motif (EOS and PAD never equal a bit)
        match = (tokens[:, : self.n].unfold(1, self.m, 1)[:, : self.starts] == self.bits).all(2)  # (B, K)
        ended_before = bit_lengths(tokens).unsqueeze(1) < starts  # EOS at step L < j: q_j(x) = r(x)
        log_qj = torch.where(ended_before, log_r.unsqueeze(1),
                             torch.where(match, log_r.unsqueeze(1) - window, -math.inf))
        return torch.logsumexp(log_qj, 1) - math.log(self.starts), log_r

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.log_q_r(tokens)[0]

    @torch.no_grad()
    def sample(self, num: int, max_len: int, generator: torch.Generator | None = None) -> MixtureSamples:
        """num draws of q, each with log q(x) (log_prob) and log r(x) (log_base). The LSTM steps one symbol at a
        time over all rows (no per-row Python); symbol t of a sampled step is drawn by inverse CDF."""
        self._check_len(max_len)
        dev = self.device
        start = torch.randint(self.starts, (num,), device=dev, generator=generator)
        tokens = torch.full((num, max_len), PAD, dtype=torch.long, device=dev)
        token_log_r = torch.zeros(num, max_len, dtype=torch.float64, device=dev)
        running = torch.ones(num, dtype=torch.bool, device=dev)
        prev = torch.full((num,), BOS, dtype=torch.long, device=dev)
        with eval_mode(self.r):
            steps = PolicySteps(self.r, num)
            for t in range(max_len):
                if not running.any():
                    break
                log_p = steps.log_probs(prev)  # (num, VOCAB) log r(. | x_<t)
                u = torch.rand(num, dtype=torch.float64, device=dev, generator=generator)
                tok = (u.unsqueeze(1) > log_p.exp().cumsum(1)[:, : VOCAB - 1]).sum(1)
                offset = t - start
                planted = (offset >= 0) & (offset < self.m)
                tok = torch.where(planted, self.bits[offset.clamp(0, self.m - 1)], tok)  # the motif's bit
                tok = torch.where(running, tok, PAD)
                token_log_r[:, t] = torch.where(running, log_p.gather(1, tok.clamp(max=VOCAB - 1)[:, None])[:, 0], 0.0)
                tokens[:, t] = tok
                running = running & (tok != EOS)
                prev = torch.where(running, tok, BOS)
        width = int((tokens != PAD).sum(1).max()) if num else 1
        tokens, token_log_r = tokens[:, : max(width, 1)], token_log_r[:, : max(width, 1)]
        log_q, log_r = self.log_q_r(tokens, token_log_r)
        return MixtureSamples(tokens, log_q, log_r)


class PlantedMixture(Potential):
    """q = share * q_plant + (1 - share) * current, current an LSTMPolicy (r, or the loop's copy of pi).
    Its draws carry log q and log r (`base` is r: a GAM's weight r exp(lambda . phi) / q needs no more scoring,
    potentials.Product.log_weight)."""

    def __init__(self, current: LSTMPolicy, planting: MotifPlanting, share: float):
        if not 0.0 < share <= 1.0:
            raise ValueError(f"planting: share must be in (0, 1], got {share}")
        self.current, self.planting, self.share = current, planting, share
        self.base = planting.r
        self.device = planting.device

    def _log_q(self, log_plant: torch.Tensor, log_current: torch.Tensor) -> torch.Tensor:
        # log q = log(s q_plant + (1 - s) q_current)
        if self.share == 1.0:
            return log_plant
        return torch.logaddexp(math.log(self.share) + log_plant, math.log1p(-self.share) + log_current.double())

    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._log_q(self.planting.log_potential(tokens), self.current.log_potential(tokens))

    @torch.no_grad()
    def sample(self, num: int, max_len: int, generator: torch.Generator | None = None) -> MixtureSamples:
        """Each draw planted with probability share, else from current; each scored under the other."""
        planted = int((torch.rand(num, generator=generator, device=self.device) < self.share).sum())
        plant = self.planting.sample(planted, max_len, generator)
        if planted < num:
            own = self.current.sample(num - planted, max_len, generator)
            own_q_plant, own_r = self.planting.log_q_r(own.tokens, None if self.current is not self.base
                                                       else own.token_log_prob)
            own_current = own.log_prob.double()
        else:
            own = None
        with eval_mode(self.current):
            plant_current = (plant.log_base if self.current is self.base
                             else batched_log_prob(self.current.log_potential, plant.tokens).double())
        parts = [(plant.tokens, plant.log_prob, plant_current, plant.log_base)]
        if own is not None:
            parts.append((own.tokens, own_q_plant, own_current, own_r))
        tokens = pad_cat([p[0] for p in parts])
        log_plant, log_current, log_r = (torch.cat([p[k] for p in parts]) for k in (1, 2, 3))
        order = torch.randperm(num, generator=generator, device=self.device)  # a sample of q in any prefix
        return MixtureSamples(tokens[order], self._log_q(log_plant, log_current)[order], log_r[order])
