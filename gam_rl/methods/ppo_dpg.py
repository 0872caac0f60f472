"""ppo_dpg: on-policy DPG through PPO's clipped per-token ratio (methods/twist.py, ppo_surrogate).

x ~ pi (as it is at this update), then `ppo_epochs` passes of the clipped surrogate over the draw in
minibatches, stopped once the approximate KL(pi_old || pi) per symbol passes 1.5 target_kl; the
advantage is P/(Z-hat q) - pi_old/q per sequence (DPG with its baseline), or ac_dpg's per-token one
with a critic. Several optimiser steps per draw: manual optimisation, and `updates` in the results
counts optimiser steps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.ac_dpg import CriticTargets
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import NORMALISE, loop_module
from gam_rl.methods.registry import Method, register
from gam_rl.methods.twist import CRITIC_TARGETS, ppo_surrogate
from gam_rl.methods.twist_loop import TwistLoopConfig, TwistModule, fit_twist
from gam_rl.policy import eval_mode
from gam_rl.tokens import PAD


@dataclass
class PPODPGConfig(TwistLoopConfig):
    """`method` section of ppo_dpg (conf/method/ppo_dpg.yaml): always on-policy, each draw trained on
    whole (keep_per_draw: the whole draw unless set)."""

    algorithm: str = setting("ppo_dpg", choices=("ppo_dpg",))
    critic_target: str = setting("mc", choices=CRITIC_TARGETS)  # with a critic: mc | td
    ppo_epochs: int = setting(4, ge=1)  # passes over each draw, in minibatches of `minibatch`
    ppo_clip: float = setting(0.2, gt=0, lt=1)  # ratio pi/pi_old clipped to [1 - clip, 1 + clip]
    target_kl: float | None = setting(0.01, gt=0)  # stop a draw's passes once the KL estimate > 1.5 x this
    baseline: bool = True  # subtract pi_old/q from the advantage (zero-mean control variate)
    # no critic: weights P/(Z-hat q), Z-hat the running one or (draw_z) the draw's own estimate
    normalise: str = setting("running_z", choices=NORMALISE + ("draw_z",))

    def samples_pi(self) -> bool:
        return True

    def kept(self) -> int:
        return self.keep_per_draw or self.drawn()

    def problems(self) -> list[str]:
        out = super().problems()
        if self.replay:
            out.append(f"method.replay={self.replay} with method.algorithm='ppo_dpg': each draw is trained on whole, "
                       "for ppo_epochs passes; set replay=0")
        if self.critic == "none" and self.normalise == "none":
            out.append("method.normalise='none' with method.algorithm='ppo_dpg' and no critic: the advantage "
                       "P/(Z q) - pi/q needs Z-hat; use normalise=running_z or draw_z")
        if self.normalise == "draw_z" and self.critic != "none":
            out.append(f"method.normalise='draw_z' with critic={self.critic!r}: only the sequence advantage (no "
                       "critic) divides by the draw's own Z-hat; use running_z")
        return out


class PPODPGModule(CriticTargets, TwistModule):
    def warm_up_targets(self, values, log_r, log_q, terminal, mask) -> torch.Tensor:
        return self.critic_targets(values, log_r, log_q, terminal, mask)  # mc or td, as in the updates

    def update(self, draw: WeightedDraw) -> None:
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
                rows, device=tokens.device, generator=self.generator).split(cfg.minibatch))
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
                    loss = loss + self.critic_fit(self.critic(sub, states), targets[idx], mask[idx])
                self.step(loss)
                steps += 1
        finally:
            self.pi.train(was_training)
        self.log("dpg/ppo_steps", float(steps), on_step=True, on_epoch=False, batch_size=rows)
        self.log("dpg/ppo_kl", kl, on_step=True, on_epoch=False, batch_size=rows)
        self.log("dpg/ppo_clip_fraction", clipped, on_step=True, on_epoch=False, batch_size=rows)


def train_ppo_dpg(cfg: PPODPGConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(PPODPGModule, cfg, inputs)
    # optimiser steps per check, at most: every pass of every draw, unless the KL stop cuts it
    return fit_twist(module, inputs, steps_per_check=cfg.updates_per_epoch * cfg.ppo_epochs
                     * -(-cfg.drawn() // cfg.minibatch))


register(Method("ppo_dpg", PPODPGConfig, train_ppo_dpg, "DPG through PPO's clipped ratio, several passes per draw"))
