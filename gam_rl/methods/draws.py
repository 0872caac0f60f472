"""Weighted proposal draws for the DPG family: sample q, weight against P, thin, replay.

An update of the family is sum_i c_i grad log pi(x_i) over items x_i (stages/dpg.py). This
module makes the items: a fresh draw of N samples x ~ q, each with its importance weight
w = P(x)/q(x) and its share h = 1/N of the N-sample estimate

    (1/N) sum_i w_i g(x_i)  ~  E_q[(P/q) g] = sum_x P(x) g(x).

Thinning (`keep_per_draw` < N) keeps item i with probability p_i = min(1, w_i/c) and divides
its share by p_i (estimators.thin_by_weight): the same estimate in expectation (unbiased),
with every heavy sample kept and only ~keep_per_draw items to backpropagate.

Replay (`replay` > 0) keeps the last `replay` items in a buffer, draws afresh every
`steps_per_draw` updates and trains each update on a random minibatch of the buffer, rescaled
so that it estimates the average of the draws in the buffer. Each item keeps the weight of the
proposal that drew it, so the estimate stays a valid importance-sampling estimate of the
gradient, but not an independent one: a draw reused for many updates (and a grad-norm clip
that binds) trades bias in the optimisation for variance. A fresh draw per update (replay 0,
the paper) is the unbiased stochastic gradient.

The running Z-hat is the mean of every weight drawn so far: E_q[P/q] = Z for any q, so the
draws of every proposal count.

An adaptive draw size (`ess_per_draw`) sizes each fresh draw from the effective sample size of
the one before (next_draw_size); every draw is still its own N-sample estimate (share 1/N), so
draws of different sizes mix in the buffer without bias.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gam_rl.estimators import effective_sample_size, thin_by_weight
from gam_rl.planting import MotifPlanting, PlantedMixture
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import Potential
from gam_rl.tokens import pad_cat


@dataclass
class WeightedDraw:
    """Items of the proposal with what every later update needs to re-weight them: item i
    stands for exp(log_w + log_h) of its draw's estimate."""

    tokens: torch.Tensor
    log_w: torch.Tensor  # float64: log P(x) - log q(x), q the proposal that drew x
    log_q: torch.Tensor  # float64: log q(x)
    log_h: torch.Tensor  # float64: log of the item's share: -log N - log(keep probability) (+ replay rescale)
    share: torch.Tensor  # float64: 1 / (items its draw contributed); summed over a buffer: the draws in it
    log_q_tok: torch.Tensor | None = None  # (B, T) float: log q(x_t | x_<t) per symbol, 0 at PAD (sampler's)

    FIELDS = ("log_w", "log_q", "log_h", "share")  # per-item tensors besides tokens

    def __len__(self) -> int:
        return len(self.tokens)

    def index(self, idx: torch.Tensor) -> WeightedDraw:
        return WeightedDraw(self.tokens[idx], *(getattr(self, k)[idx] for k in self.FIELDS),
                            None if self.log_q_tok is None else self.log_q_tok[idx])

    @staticmethod
    def cat(draws: list[WeightedDraw]) -> WeightedDraw:
        per_token = None if any(d.log_q_tok is None for d in draws) else pad_cat([d.log_q_tok for d in draws], 0.0)
        return WeightedDraw(pad_cat([d.tokens for d in draws]),
                            *(torch.cat([getattr(d, k) for d in draws]) for k in WeightedDraw.FIELDS), per_token)

    def tail(self, size: int) -> WeightedDraw:
        return self.index(torch.arange(max(0, len(self) - size), len(self), device=self.log_w.device))


class RunningZ:
    """Z-hat = mean of every importance weight P/q drawn so far (zero weights included)."""

    def __init__(self):
        self.log_sum, self.count = -math.inf, 0

    def add(self, log_w: torch.Tensor) -> None:
        self.count += len(log_w)
        if torch.isfinite(log_w).any():
            self.log_sum = float(torch.logaddexp(torch.tensor(self.log_sum, dtype=torch.float64),
                                                 torch.logsumexp(log_w.double(), 0)))

    @property
    def log_z(self) -> float:
        # 0 (Z taken as 1) until some draw has a nonzero weight: log 0 would turn w / Z-hat into 0 / 0
        return self.log_sum - math.log(self.count) if math.isfinite(self.log_sum) else 0.0


class ProposalDraws:
    """A Training-2 method's weighted items, one minibatch per `next_batch()` (the loop calls it inside the
    training step, so a draw of pi is of pi as it is at that update).

    `proposal` is the policy that samples: r (then copies of pi, at swaps) for dpg_off, pi
    itself for dpg_on and pg (sampling runs without gradient and dropout)."""

    def __init__(self, proposal: LSTMPolicy, target: Potential, *, minibatch: int, proposal_batch: int | None,
                 keep_per_draw: int | None, replay: int, steps_per_draw: int, max_len: int,
                 generator: torch.Generator, ess_per_draw: int | None = None, min_proposal_batch: int | None = None,
                 shrink_at_ess_fraction: float = 0.5, planting: MotifPlanting | None = None, plant_share: float = 0.0):
        self.proposal, self.target, self.max_len, self.generator = proposal, target, max_len, generator
        # plant_share > 0: each fresh draw is of PlantedMixture(proposal, planting, plant_share), so a swap of
        # `proposal` changes the mixture's other component too
        self.planting, self.plant_share = planting, plant_share
        self.minibatch, self.replay = minibatch, replay
        self.proposal_batch = max(proposal_batch or minibatch, minibatch)
        self.keep_per_draw = keep_per_draw or minibatch
        # adaptive draw size: aim each fresh draw at ess_per_draw effective samples (None: always proposal_batch)
        self.ess_per_draw = ess_per_draw
        self.min_proposal_batch = min(self.proposal_batch, min_proposal_batch or max(minibatch, self.keep_per_draw))
        self.shrink_at_ess_fraction = shrink_at_ess_fraction  # a draw shrinks only once ESS / N reaches this
        self.draw_size = self.proposal_batch  # the size of the next fresh draw
        self.steps_per_draw = max(1, steps_per_draw)
        self.running_z = RunningZ()
        self.samples_drawn, self.last_ess, self.last_draw_size = 0, math.nan, 0
        self._buffer: WeightedDraw | None = None
        self._pending: WeightedDraw | None = None  # drawn (and looked at) by a swap gate, not yet trained on
        self._updates = 0

    def fresh(self) -> WeightedDraw:
        """Sample the proposal, weight, thin without bias to ~keep_per_draw items."""
        if self._pending is not None:
            draw, self._pending = self._pending, None
            return draw
        with torch.no_grad():
            q = self.sampler()
            samples = q.sample(self.draw_size, self.max_len, self.generator)  # carries log q(x)
            self.samples_drawn += len(samples)
            log_w = self.target.log_weight(q, samples).double()  # log P(x) - log q(x)
            self.running_z.add(log_w)
            ess = effective_sample_size(log_w) if torch.isfinite(log_w).any() else 0.0
            if ess > 0:
                self.last_ess = ess
            self.last_draw_size, self.draw_size = len(samples), self.next_draw_size(ess, len(samples))
            keep, thinned = thin_by_weight(log_w, self.keep_per_draw, self.generator)
            kept_w = log_w[keep]
            # share of item i: (w_i / p_i) / (N w_i) = 1 / (N p_i); a zero weight keeps 1 / N where it is kept
            # (no thinning, or the all-zero draw's one item): thinning drops it (p_i = min(1, 0 / c) = 0)
            log_h = torch.where(torch.isfinite(kept_w), thinned - kept_w, 0.0) - math.log(len(log_w))
            share = torch.full((len(keep),), 1.0 / len(keep), dtype=torch.float64, device=log_w.device)
            per_symbol = None if samples.token_log_prob is None else samples.token_log_prob[keep]
            return WeightedDraw(samples.tokens[keep], kept_w, samples.log_prob.double()[keep], log_h, share, per_symbol)

    def sampler(self) -> Potential:
        """What a fresh draw samples: the proposal, or its mixture with the planted draws."""
        if self.plant_share and self.planting is not None:
            return PlantedMixture(self.proposal, self.planting, self.plant_share)
        return self.proposal

    def next_draw_size(self, ess: float, drawn: int) -> int:
        """N' = ess_per_draw / (ESS / N) of the draw just made: once q is close to p (after swaps) its
        draws are nearly unweighted and a few thousand samples carry what 50,000 did. Grows at once;
        shrinks only once the draw's ESS / N is at least shrink_at_ess_fraction (while q is still far
        from p, a few heavy weights make the ESS say little about the tail that a smaller draw would
        miss), and then at most by half per draw (one lucky draw does not collapse it); always within
        [min_proposal_batch, proposal_batch]. A draw without a finite ESS goes back to proposal_batch."""
        if self.ess_per_draw is None:
            return self.proposal_batch
        fraction = ess / drawn if drawn else 0.0
        if not fraction > 0:  # no nonzero weight in the draw
            return self.proposal_batch
        wanted = math.ceil(self.ess_per_draw / fraction)
        if wanted < drawn and fraction < self.shrink_at_ess_fraction:  # q still far from p: hold the size
            return int(min(self.proposal_batch, max(self.min_proposal_batch, drawn)))
        return int(min(self.proposal_batch, max(self.min_proposal_batch, drawn // 2, wanted)))

    def peek(self) -> WeightedDraw:
        """A fresh draw of the current proposal that the next update will train on."""
        self._pending = None  # an older pending draw may be of another proposal
        self._pending = self.fresh()
        return self._pending

    def replayed(self) -> WeightedDraw:
        """A random minibatch of the buffer, refreshed with a new draw every steps_per_draw updates."""
        if self._buffer is None or self._updates % self.steps_per_draw == 0:
            draw = self.fresh()
            self._buffer = draw if self._buffer is None else WeightedDraw.cat([self._buffer, draw])
            self._buffer = self._buffer.tail(self.replay)
        # each draw's items sum to that draw's N-sample estimate: a random minibatch of the buffer,
        # rescaled by (buffer items / minibatch) / (draws in buffer), estimates their average. Draws
        # in buffer = sum of the shares: a draw counts 1 whatever it contributed, a partly evicted one
        # its fraction.
        pick = torch.randint(len(self._buffer), (self.minibatch,), device=self._buffer.log_w.device,
                             generator=self.generator)
        batch = self._buffer.index(pick)
        scale = len(self._buffer) / (self.minibatch * float(self._buffer.share.sum()))
        batch.log_h = batch.log_h + math.log(scale)
        return batch

    def next_batch(self) -> WeightedDraw:
        batch = self.replayed() if self.replay else self.fresh()
        self._updates += 1
        return batch
