"""ac_dpg: actor-critic DPG on the token MDP of P_lambda (methods/twist.py has the equations).

    critic  minimise critic_loss(V(s_t), y_t) (exp or square), y_t the Monte-Carlo (or TD) target
    actor   (after `critic_warmup` updates) theta += alpha sum_t c_t grad log pi(a_t | s_t),
            c_t = h [pi*(a_t | s_t) - b pi(a_t | s_t)] / q(a_t | s_t), pi* the critic's twisted r: at
            every state q visits, descent on CE(pi*(.|s), pi(.|s)), minimised at pi = pi* = p's conditional
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import loop_module
from gam_rl.methods.registry import Method, register
from gam_rl.methods.twist import CRITIC_TARGETS, critic_targets, td_targets, twisted_log_prob
from gam_rl.methods.twist_loop import TwistLoopConfig, TwistModule, fit_twist
from gam_rl.tokens import PAD


@dataclass
class ACDPGConfig(TwistLoopConfig):
    """`method` section of ac_dpg (conf/method/ac_dpg.yaml)."""

    algorithm: str = setting("ac_dpg", choices=("ac_dpg",))
    on_policy: bool = False  # true: x ~ pi at every update (no swaps); false: x ~ q with dpg_off's swap gate
    critic: str = setting("head", choices=("head", "separate"))  # the actor's advantage comes from the critic
    critic_target: str = setting("mc", choices=CRITIC_TARGETS)  # mc: critic_targets | td: td_targets
    baseline: bool = True  # subtract pi_old/q from the advantage (zero-mean control variate)

    def samples_pi(self) -> bool:
        return self.on_policy


class CriticTargets:
    """The critic's targets of a twist learner with a critic (ac_dpg, ppo_dpg) and its per-token advantage."""

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


class ACDPGModule(CriticTargets, TwistModule):
    def ac_loss(self, draw: WeightedDraw) -> torch.Tensor:
        tokens, log_q = draw.tokens, draw.log_q_tok
        mask = tokens != PAD
        log_r, terminal = self.rewards(tokens)
        warming_up = self.warming_up  # the critic alone learns (a head critic's loss must not move pi's shared LSTM)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not warming_up):
            states = self.pi.token_states(tokens)
        values = self.critic(tokens, states)
        critic_fit = self.critic_fit(values, self.critic_targets(values, log_r, log_q, terminal, mask), mask)
        if warming_up:
            return critic_fit
        self.log("dpg/critic_loss", critic_fit.detach(), on_step=True, on_epoch=False, batch_size=len(tokens))
        log_pi = self.pi.token_log_probs(tokens, states)
        # the advantage's values without dropout: a dropout mask's noise in V(s a) - V(s) would bias exp(.) up
        advantage_values = values.detach() if self.dropout_free() else self.value_function()(tokens)
        coef = self.token_advantage(advantage_values, log_pi.detach(), log_q, log_r, terminal, mask)
        coef = coef * draw.log_h.exp().unsqueeze(1).to(coef.dtype)  # h_i: the row's share of its draw's estimate
        return critic_fit - (coef * log_pi).sum()

    warm_up_loss = ac_loss

    def update(self, draw: WeightedDraw) -> None:
        self.step(self.ac_loss(draw))


def train_ac_dpg(cfg: ACDPGConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(ACDPGModule, cfg, inputs)
    return fit_twist(module, inputs)


register(Method("ac_dpg", ACDPGConfig, train_ac_dpg, "actor-critic DPG: a learned V(s), per-token DPG to its twist"))
