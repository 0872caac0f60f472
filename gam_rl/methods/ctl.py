"""ctl: contrastive twist learning (Zhao, Brekelmans, Makhzani, Grosse, ICML 2024) for P_lambda.

Twists psi_t(s_{1:t}) define intermediate targets pi_t(s_{1:t}) proportional to r(s_{1:t}) psi_t(s_{1:t})
over the prefixes of t symbols, and the twisted proposal q(a | s) proportional to r(a | s) psi(s a); the
optimal twist is psi*(s) = Z(s) / r(s) = exp(V*(s)) (methods/twist.py), for which every pi_t is the
t-symbol marginal of p_lambda and q is p_lambda itself. CTL minimises sum_t KL(sigma_t || pi_t), sigma_t
the t-symbol marginal of the target p_lambda, whose gradient is contrastive:

    grad = - sum_t E_sigma[grad log psi_t(s_{1:t})] + sum_t E_{pi_t}[grad log psi_t(s_{1:t})].

Parametrisation: pi itself is the twisted proposal. Its raw logits l(s, a) = log r(a | s) + log psi(s a),
so log psi(s a) = l(s, a) - log r(a | s) and q = softmax(l) = pi: pi is r twisted by the learned psi, by
construction, and is what the run returns (no distillation step). A prefix that ends in EOS is a
complete string, whose twist is learned at the step it ends (its optimum is exp(lambda . phi(x))); from
the next step on it counts with its exact weight P(x) / pi(x).

Positive samples x ~ sigma: exact samples of p_lambda by rejection sampling from r (exact: exp(lambda .
phi) is bounded), drawn once into a pool (`positives`), and/or the rows of D (`positive_source`).
Negative samples: draws of pi (= q, on-policy), weighted towards pi_t by sequential importance
sampling, w_t(s_{1:t}) = r(s_{1:t}) psi_t(s_{1:t}) / pi(s_{1:t}), self-normalised over the draw at each t.
The learned log Z is an importance-sampled one from the final twisted proposal (`z_samples` draws of pi):
psi is fixed only up to a constant per length, so V(empty prefix) is not log Z here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.estimators import rejection_sample
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import LoopConfig, LoopModule, fit_loop, loop_module
from gam_rl.methods.registry import Method, register
from gam_rl.methods.twist_loop import twist_payload
from gam_rl.policy import eval_mode
from gam_rl.tokens import EOS, PAD, pad_cat

POSITIVE_SOURCES = ("rs", "data", "both")  # rs: exact samples of p_lambda | data: rows of D | both: the two pooled


def twist_log_psi(logits: torch.Tensor, log_r_all: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log psi(s_{1:t+1}) = l(s_t, a_t) - log r(a_t | s_t) at every step t of a padded batch (0 at PAD): the
    twist of the prefix that step t ends, from pi's raw logits and r's log-probabilities of every symbol."""
    picked = tokens.clamp(max=EOS).unsqueeze(2)
    return (logits.gather(2, picked) - log_r_all.gather(2, picked)).squeeze(2).masked_fill(tokens == PAD, 0.0)


def ctl_loss(pos_log_psi: torch.Tensor, pos_mask: torch.Tensor, neg_log_psi: torch.Tensor, neg_mask: torch.Tensor,
             neg_log_w: torch.Tensor) -> torch.Tensor:
    """- sum_t mean_i log psi_t(x+_i) + sum_t sum_i wbar_{i,t} log psi_t(x-_i), wbar_{., t} = softmax over the
    draw of the prefix weights log w_{i,t} (no gradient through them): the contrastive gradient above,
    per sequence (summed over t), for positives x+ ~ sigma and weighted negatives x-."""
    positive = (pos_log_psi * pos_mask).sum() / len(pos_log_psi)
    wbar = torch.softmax(neg_log_w.detach(), dim=0)  # over the draw, at every t
    negative = (wbar.to(neg_log_psi.dtype) * neg_log_psi * neg_mask).sum()
    return negative - positive


def prefix_log_weights(log_psi: torch.Tensor, log_r: torch.Tensor, log_q: torch.Tensor, mask: torch.Tensor,
                       log_w_complete: torch.Tensor, width: int) -> torch.Tensor:
    """log w_t of each draw of q = pi for t = 1 .. width: sum_{k<=t} (log r - log q)_k + log psi_t on the
    steps of the row; after its last step the complete string's exact log P(x) - log q(x). (B, width)."""
    cum = (log_r - log_q).masked_fill(~mask, 0.0).cumsum(1) + log_psi
    out = log_w_complete.to(cum.dtype).unsqueeze(1).expand(len(cum), width).clone()
    steps = mask.shape[1]
    out[:, :steps] = torch.where(mask, cum, out[:, :steps])
    return out


@dataclass
class CTLConfig(LoopConfig):
    """`method` section of ctl (conf/method/ctl.yaml): the loop's keys (draws of pi: on-policy) and the
    positive samples."""

    algorithm: str = setting("ctl", choices=("ctl",))
    target: str = setting("gam", choices=("gam",))  # exact positives: rejection sampling needs exp(lambda . phi)
    positive_source: str = setting("rs", choices=POSITIVE_SOURCES)
    positives: int = setting(20000, ge=1)  # rs: exact samples of p_lambda in the pool (drawn once, at the start)
    proposal_batch_rs: int = setting(10000, ge=1)  # rs: r-samples per rejection round
    max_proposals: float = setting(2.0e9, gt=0)  # rs: give up (with an error) past this many proposals
    z_samples: int = setting(10000, ge=1)  # draws of the final pi for its importance-sampled log Z

    def samples_pi(self) -> bool:
        return True


class CTLModule(LoopModule):
    loss_name = "dpg/ctl_loss"

    def __init__(self, *args, pool: torch.Tensor, r, seed: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.pool, self.base = pool, (r,)  # r in a tuple: scored, never trained
        self.generator = torch.Generator(device=pool.device).manual_seed(seed + 23)

    def r_log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        """log r(a | s_t) of every symbol a at every step (B, T, 3), without dropout or gradient."""
        r = self.base[0]
        with eval_mode(r):
            return torch.log_softmax(r.head(r.token_states(tokens)), -1)

    def loss(self, draw: WeightedDraw) -> torch.Tensor:
        positives = self.pool[torch.randint(len(self.pool), (self.cfg.minibatch,), device=self.pool.device,
                                            generator=self.generator)]
        tokens = pad_cat([positives, draw.tokens])  # one pass of pi over both
        log_r_all = self.r_log_probs(tokens)
        log_psi = twist_log_psi(self.pi.head(self.pi.token_states(tokens)), log_r_all, tokens)
        mask = tokens != PAD
        n_pos = len(positives)
        neg_tokens, neg_mask = tokens[n_pos:], mask[n_pos:]
        log_r_picked = log_r_all[n_pos:].gather(2, neg_tokens.clamp(max=EOS).unsqueeze(2)).squeeze(2)
        width = tokens.shape[1]  # the positives may be longer than the draw: its per-symbol log q padded with 0
        log_q = torch.nn.functional.pad(draw.log_q_tok.double(), (0, width - draw.log_q_tok.shape[1]))
        with torch.no_grad():
            log_w = prefix_log_weights(log_psi[n_pos:].detach().double(), log_r_picked.double(), log_q, neg_mask,
                                       draw.log_w, width)
        return ctl_loss(log_psi[:n_pos], mask[:n_pos], log_psi[n_pos:], neg_mask, log_w)


def positive_pool(cfg: CTLConfig, inputs: Training2Inputs) -> tuple[torch.Tensor, int]:
    """The positive samples of sigma = p_lambda and the proposals their rejection sampling drew."""
    parts, proposals = [], 0
    if cfg.positive_source in ("rs", "both"):
        generator = torch.Generator(device=inputs.r.device).manual_seed(inputs.seed + 29)
        exact = rejection_sample(inputs.r.eval(), inputs.p_lambda, cfg.positives, inputs.max_len,
                                 cfg.proposal_batch_rs, int(cfg.max_proposals), generator, progress="ctl-rs")
        parts.append(exact.tokens)
        proposals = exact.proposals
    if cfg.positive_source in ("data", "both"):
        parts.append(inputs.train)
    return pad_cat(parts), proposals


def importance_log_z(pi, target, samples: int, max_len: int, seed: int) -> float:
    """log (1/N) sum_i P(x_i) / pi(x_i), x_i ~ pi: log Z-hat from the twisted proposal."""
    generator = torch.Generator(device=pi.device).manual_seed(seed)
    with torch.no_grad():
        draw = pi.sample(samples, max_len, generator)
        log_w = target.log_weight(pi, draw).double()
    return float(torch.logsumexp(log_w, 0)) - math.log(samples)


def train_ctl(cfg: CTLConfig, inputs: Training2Inputs) -> Training2Result:
    pool, proposals = positive_pool(cfg, inputs)
    if len(pool) == 0:
        raise ValueError("method.positive_source='data' with an empty D: ctl has no positive samples")
    module = loop_module(CTLModule, cfg, inputs, pool=pool, r=inputs.r, seed=inputs.seed)
    module.draws.samples_drawn = proposals  # the positives' proposals count first: draws to the target line too
    result = fit_loop(module, inputs, clip=cfg.clip, learned_log_z=lambda: importance_log_z(
        module.pi, module.target, cfg.z_samples, inputs.max_len, inputs.seed + 31))
    result.draws += cfg.z_samples
    result.results.update(ctl_positives=len(pool), ctl_positive_proposals=proposals)
    result.twist = twist_payload(cfg.algorithm, "ctl", module.pi)  # psi from pi's logits and r (run: twist.pt)
    return result


register(Method("ctl", CTLConfig, train_ctl,
                "contrastive twist learning: pi = r twisted by psi, from exact samples of p_lambda and pi's own"))
