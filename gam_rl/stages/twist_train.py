"""Training-2 by learning the twist (stages/twist.py has the equations): pcl, ac_dpg, ppo_dpg.

Same draws (stages/draws.py), checks, swap gate, plateau and target line as DPG (stages/dpg.py):
TwistModule is a DPGModule whose update is one of

    pcl      minimise 1/2 mean_t C(t)^2, C the path consistency of pi's soft Q-logits, on the draw,
             plus `data_share` of rows of D (any trajectory satisfies the same equation)
    ac_dpg   critic: minimise critic_loss(V(s_t), y_t) (exp or square), y_t the Monte-Carlo (or TD) target;
             actor (after `critic_warmup` updates): theta += alpha sum_t c_t grad log pi(a_t | s_t),
             c_t = h [pi*(a_t | s_t) - b pi(a_t | s_t)] / q(a_t | s_t), pi* from the critic: at every
             state q visits, descent on CE(pi*(.|s), pi(.|s)), minimised at pi = pi* = p's conditional
    ppo_dpg  x ~ pi (one update old: Lightning prefetches; the weights P/q correct it): ppo_epochs
             passes of the clipped surrogate in minibatches, stopped once the approximate
             KL(pi_old || pi) per symbol passes 1.5 target_kl; advantage P/(Z-hat q) - pi_old/q
             per sequence (DPG with its baseline), or ac_dpg's per-token one with a critic

The updates are manual (several optimiser steps per draw for ppo_dpg), so `updates` in the
results counts optimiser steps. The learned log Z, V(empty prefix), is logged at every check.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch
from torch import nn

from gam_rl.policy import LSTMPolicy, Samples, eval_mode
from gam_rl.potentials import Potential
from gam_rl.progress import Progress
from gam_rl.stages.dpg import DPGModule, DPGResult, fit_checked, proposal_draws
from gam_rl.stages.draws import ProposalDraws, WeightedDraw
from gam_rl.stages.twist import (
    TwistConfig,
    critic_loss,
    critic_targets,
    pcl_consistency,
    ppo_surrogate,
    td_targets,
    twisted_log_prob,
)
from gam_rl.tokens import EOS, PAD, pad_cat


class Critic(nn.Module):
    """V(s_t) at every position: a linear head on pi's own LSTM states (kind head) or on a separate
    LSTM that starts as a copy of r (kind separate). The head starts at V = 0."""

    def __init__(self, kind: str, pi: LSTMPolicy, r: LSTMPolicy):
        super().__init__()
        self.kind = kind
        self.body = copy.deepcopy(r).train().requires_grad_(True) if kind == "separate" else None
        self.value = nn.Linear((self.body or pi).hidden, 1)
        nn.init.zeros_(self.value.weight)
        nn.init.zeros_(self.value.bias)

    def forward(self, tokens: torch.Tensor, pi_states: torch.Tensor) -> torch.Tensor:
        states = pi_states if self.body is None else self.body.token_states(tokens)
        return self.value(states).squeeze(2)


def terminal_reward(target: Potential, r: LSTMPolicy, tokens: torch.Tensor, log_r_seq: torch.Tensor) -> torch.Tensor:
    """log P(x) - log r(x), the final reward of the token MDP, as the importance weight of x under r
    (Potential.log_weight: for P = r * Tilt, lambda . phi(x) without scoring r again). (B,) float."""
    return target.log_weight(r, Samples(tokens, log_r_seq, tokens.eq(EOS).any(1))).float()


class TwistModule(DPGModule):
    """DPGModule (draws, checks, swap gate, target line) with the twist methods' updates, stepped by
    hand: r, frozen, gives the per-step rewards; the critic (or pcl's offset) has its own lr."""

    def __init__(self, pi: LSTMPolicy, draws: ProposalDraws, cfg: TwistConfig, *, r: LSTMPolicy, target: Potential,
                 data: torch.Tensor | None, seed: int, **kwargs):
        super().__init__(pi, draws, cfg, **kwargs)
        self.automatic_optimization = False  # ppo_dpg takes several steps per draw; all three step by hand
        self.base = (r,)  # r, scored under eval_mode (no dropout, no autograd): in a tuple, not a submodule
        self.target = target
        self.critic = Critic(cfg.critic, pi, r).to(pi.device) if cfg.critic != "none" else None
        # what the plateau rule snapshots and restores: pi with its critic (pcl: its offset u), so the
        # kept policy and the learned values come from the same check
        self.trained = nn.ModuleDict({"pi": pi, **({"critic": self.critic} if self.critic is not None else {})})
        self.data = data if cfg.data_share > 0 else None
        self.data_generator = torch.Generator(device=pi.device).manual_seed(seed + 17)
        self.draws_trained = 0  # training steps (draws or minibatches of the proposal) so far
        self.warming_up = False  # warm_up(): only the critic (pcl: the offset head) learns

    def configure_optimizers(self):
        groups = [{"params": list(self.pi.parameters()), "lr": self.cfg.lr}]
        if self.critic is not None:  # head: the value head only (it shares pi's LSTM) | separate: its LSTM too
            groups.append({"params": list(self.critic.parameters()), "lr": self.cfg.critic_lr})
        return torch.optim.Adam(groups)

    # ---- what every update needs -----------------------------------------------------------
    def rewards(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log r(a_t | s_t) per step (B, T) and the terminal reward log P(x) - log r(x) (B,)."""
        r = self.base[0]
        with eval_mode(r):
            log_r = r.token_log_probs(tokens)
        return log_r, terminal_reward(self.target, r, tokens, log_r.sum(1))

    def values(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """V(s_t): pcl's logsumexp of its Q-logits (Q = pi's logits + the offset head's u(s_t), if any),
        or the critic's."""
        if self.cfg.algorithm != "pcl":
            return self.critic(tokens, states)
        values = torch.logsumexp(self.pi.head(states), -1)
        return values if self.critic is None else values + self.critic(tokens, states)

    def learns_values(self) -> bool:
        """pcl always; ac_dpg and ppo_dpg with a critic."""
        return self.cfg.algorithm == "pcl" or self.critic is not None

    def learned_log_z(self) -> float | None:
        """V(empty prefix): the state before the first symbol of any row (None: no values learned)."""
        if not self.learns_values():
            return None
        return float(self.value_function()(torch.tensor([[EOS]], device=self.pi.device))[0, 0])

    def value_function(self):
        """tokens -> V(s_t) (B, T) with dropout off and no autograd: the learned soft values."""
        def values(tokens: torch.Tensor) -> torch.Tensor:
            tokens = tokens.to(self.pi.device)  # Lightning hands the module back on the CPU after fit
            with eval_mode(self.pi), (eval_mode(self.critic) if self.critic is not None else contextlib.nullcontext()):
                return self.values(tokens, self.pi.token_states(tokens))
        return values

    def dropout_free(self) -> bool:
        """Whether pi and the critic run without dropout (then train-mode values are the eval-mode ones)."""
        body = None if self.critic is None else self.critic.body
        return self.pi.dropout_p == 0 and (body is None or body.dropout_p == 0)

    def warm_up(self, updates: int) -> None:
        """`updates` fresh draws on which only the critic (pcl: the offset head u) learns, with its own
        Adam, before the first check: pi does not move, so the plateau rule does not count them."""
        opt = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.critic_lr)
        self.warming_up = True
        progress = Progress(f"{self.cfg.algorithm} critic warm-up", updates, "updates")
        try:
            for k in range(updates):
                draw = self.draws.next_batch()
                loss = self.pcl_loss(draw) if self.cfg.algorithm == "pcl" else self.ac_loss(draw)
                opt.zero_grad()
                loss.backward()
                if self.cfg.clip is not None:
                    torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.cfg.clip)
                opt.step()
                progress.update(k + 1, f"loss {float(loss.detach()):.4f}")
        finally:
            self.warming_up = False
            progress.close()

    def step(self, loss: torch.Tensor) -> None:
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.cfg.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.clip, gradient_clip_algorithm="norm")
        opt.step()

    # ---- the updates -----------------------------------------------------------------------
    def training_step(self, draw: WeightedDraw, batch_idx):
        if self.cfg.algorithm == "ppo_dpg":
            self.ppo_update(draw)
        else:
            loss = self.pcl_loss(draw) if self.cfg.algorithm == "pcl" else self.ac_loss(draw)
            self.step(loss)
        self.draws_trained += 1
        self.log("dpg/ess", self.draws.last_ess, on_step=True, on_epoch=False, batch_size=len(draw))

    def pcl_loss(self, draw: WeightedDraw) -> torch.Tensor:
        tokens = draw.tokens
        if self.warming_up:  # u alone, fitted to the draw's Monte-Carlo targets (critic_loss): V -> V* for pi = r
            mask = tokens != PAD
            log_r, terminal = self.rewards(tokens)
            with torch.no_grad():
                states = self.pi.token_states(tokens)
                base = torch.logsumexp(self.pi.head(states), -1)
            values = base + self.critic(tokens, states)
            targets = critic_targets(log_r, draw.log_q_tok, terminal, mask)
            return critic_loss(values, targets, mask, self.cfg.critic_fit)
        if self.data is not None:  # rows of D: trajectories of p_true, which satisfy the same consistency
            count = max(1, round(self.cfg.data_share * len(tokens) / (1.0 - self.cfg.data_share)))
            rows = torch.randint(len(self.data), (count,), device=tokens.device, generator=self.data_generator)
            tokens = pad_cat([tokens, self.data[rows]])
        mask = tokens != PAD
        log_r, terminal = self.rewards(tokens)
        states = self.pi.token_states(tokens)
        # Q(s, a) = logit(s, a) + u(s): V(s) = logsumexp_a Q(s, a), log pi(a | s) = Q(s, a) - V(s) = log_softmax;
        # u (critic=head, zero at the start) moves every Q of a state at once: V, never pi
        logits = self.pi.head(states)
        log_pi = torch.log_softmax(logits, -1).gather(2, tokens.clamp(max=EOS).unsqueeze(2)).squeeze(2) * mask
        values = torch.logsumexp(logits, -1)
        if self.critic is not None:
            values = values + self.critic(tokens, states)
        consistency = pcl_consistency(values, log_pi, log_r, terminal, mask, self.cfg.horizon)
        loss = 0.5 * consistency[mask].pow(2).mean()
        self.log("dpg/pcl_loss", loss.detach(), on_step=True, on_epoch=False, batch_size=len(tokens))
        return loss

    def ac_loss(self, draw: WeightedDraw) -> torch.Tensor:
        tokens, log_q = draw.tokens, draw.log_q_tok
        mask = tokens != PAD
        log_r, terminal = self.rewards(tokens)
        warming_up = self.warming_up  # the critic alone learns (a head critic's loss must not move pi's shared LSTM)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not warming_up):
            states = self.pi.token_states(tokens)
        values = self.critic(tokens, states)
        critic_fit = critic_loss(values, self.critic_targets(values, log_r, log_q, terminal, mask), mask,
                                 self.cfg.critic_fit)
        if warming_up:
            return critic_fit
        self.log("dpg/critic_loss", critic_fit.detach(), on_step=True, on_epoch=False, batch_size=len(tokens))
        log_pi = self.pi.token_log_probs(tokens, states)
        # the advantage's values without dropout: a dropout mask's noise in V(s a) - V(s) would bias exp(.) up
        advantage_values = values.detach() if self.dropout_free() else self.value_function()(tokens)
        coef = self.token_advantage(advantage_values, log_pi.detach(), log_q, log_r, terminal, mask)
        coef = coef * draw.log_h.exp().unsqueeze(1).to(coef.dtype)  # h_i: the row's share of its draw's estimate
        return critic_fit - (coef * log_pi).sum()

    def critic_targets(self, values, log_r, log_q, terminal, mask) -> torch.Tensor:
        if self.cfg.critic_target == "td":
            return td_targets(values, log_r, log_q, terminal, mask)
        return critic_targets(log_r, log_q, terminal, mask)

    def token_advantage(self, values, log_pi_old, log_q, log_r, terminal, mask) -> torch.Tensor:
        """[pi*(a_t | s_t) - b pi_old(a_t | s_t)] / q(a_t | s_t), pi* the critic's twisted r: its expectation
        under q is sum_a (pi* - b pi_old)(a | s) grad log pi(a | s) at every visited state."""
        adv = torch.exp(twisted_log_prob(values, log_r, terminal, mask) - log_q)
        if self.cfg.baseline:  # E_q[(pi/q) grad log pi | s] = 0: variance only
            adv = adv - torch.exp(log_pi_old - log_q)
        return adv.masked_fill(~mask, 0.0)

    def ppo_update(self, draw: WeightedDraw) -> None:
        cfg, tokens, log_q = self.cfg, draw.tokens, draw.log_q_tok
        mask, rows = tokens != PAD, len(draw)
        was_training = self.pi.training
        self.pi.eval()  # the ratio pi / pi_old without dropout noise (autograd stays on)
        try:
            with torch.no_grad():
                states = self.pi.token_states(tokens)  # pi_old's, without dropout
                log_old = self.pi.token_log_probs(tokens, states)
                if self.critic is None:  # per sequence: N h_i [P/(Z-hat q) - b pi_old/q], at every step
                    log_norm = (self.draws.running_z.log_z if cfg.normalise == "running_z"  # draw_z: this draw's own
                                else float(torch.logsumexp(draw.log_w + draw.log_h, 0)))  # sum_i h_i w_i
                    log_n = draw.log_h + math.log(rows)
                    adv = torch.exp(draw.log_w - log_norm + log_n)
                    if cfg.baseline:
                        adv = adv - torch.exp(log_old.sum(1).double() - draw.log_q + log_n)
                    adv = adv.float().unsqueeze(1).expand_as(log_old) * mask
                else:
                    log_r, terminal = self.rewards(tokens)
                    with eval_mode(self.critic):  # dropout off, as for pi_old
                        values = self.values(tokens, states)
                    targets = self.critic_targets(values, log_r, log_q, terminal, mask)
                    adv = self.token_advantage(values, log_old, log_q, log_r, terminal, mask)
            steps, kl, clipped = 0, 0.0, 0.0
            # ppo_epochs passes, each in a fresh random order, as one sequence of minibatches
            minibatches = (idx for _ in range(cfg.ppo_epochs) for idx in torch.randperm(
                rows, device=tokens.device, generator=self.data_generator).split(cfg.minibatch))
            for idx in minibatches:
                sub = tokens[idx]
                states = self.pi.token_states(sub)
                ppo = ppo_surrogate(self.pi.token_log_probs(sub, states), log_old[idx], adv[idx], mask[idx],
                                    cfg.ppo_clip)
                kl, clipped = ppo.approx_kl, ppo.clip_fraction
                if cfg.target_kl is not None and kl > 1.5 * cfg.target_kl:
                    break  # pi has left the trust region around pi_old: next draw
                loss = ppo.loss * (len(idx) / cfg.minibatch)
                if self.critic is not None:
                    loss = loss + critic_loss(self.critic(sub, states), targets[idx], mask[idx], cfg.critic_fit)
                self.step(loss)
                steps += 1
        finally:
            self.pi.train(was_training)
        self.log("dpg/ppo_steps", float(steps), on_step=True, on_epoch=False, batch_size=rows)
        self.log("dpg/ppo_kl", kl, on_step=True, on_epoch=False, batch_size=rows)
        self.log("dpg/ppo_clip_fraction", clipped, on_step=True, on_epoch=False, batch_size=rows)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if self.learns_values():
            self.log("dpg/learned_log_z", self.learned_log_z())


def train_twist(pi: LSTMPolicy, r: LSTMPolicy, target: Potential, valid: torch.Tensor, cfg: TwistConfig, *,
                max_len: int, symbols_per_seq: int, ce_valid_proposal: float, data: torch.Tensor | None = None,
                seed: int = 0, target_ce_valid: float | None = None, logger=None, accelerator: str = "cpu",
                callbacks: list | None = None) -> DPGResult:
    """Train `pi` in place towards p = P / Z by pcl, ac_dpg or ppo_dpg (r: the base of the rewards and
    the first proposal; data: D, for pcl's data_share). On return pi holds the best-CE(V) weights and
    the result's `values` the learned V(s_t), of the same check (the plateau rule keeps pi and its critic
    together)."""
    drawn = max(cfg.proposal_batch or cfg.minibatch, cfg.minibatch)  # what ProposalDraws draws
    draws = proposal_draws(pi, r, target, cfg, max_len=max_len, seed=seed,
                           keep_per_draw=drawn if cfg.algorithm == "ppo_dpg" else None)  # ppo: the whole draw
    module = TwistModule(pi, draws, cfg, r=r, target=target, data=data, seed=seed, symbols_per_seq=symbols_per_seq,
                         ce_valid_proposal=ce_valid_proposal, target_ce_valid=target_ce_valid)
    if module.critic is not None and cfg.critic_warmup:
        module.warm_up(cfg.critic_warmup)
    # optimiser steps per check, at most (ppo_dpg: every pass of every draw, unless the KL stop cuts it)
    per_check = cfg.updates_per_epoch * (cfg.ppo_epochs * -(-drawn // cfg.minibatch) if cfg.algorithm == "ppo_dpg"
                                         else 1)
    # clipping is in TwistModule.step (manual optimisation)
    result = fit_checked(module, valid, callbacks=callbacks, logger=logger, accelerator=accelerator,
                         extra_keys=("dpg/learned_log_z",), steps_per_check=per_check, keep="trained")
    result.extra = {"twist_learned_log_z": module.learned_log_z(), "twist_critic": cfg.critic,
                    "twist_draws_trained": module.draws_trained}
    result.values = module.value_function() if module.learns_values() else None
    return result
