"""pcl: soft Q-learning by path consistency (Nachum et al. 2017) on the token MDP of P_lambda.

One LSTM whose logits are soft Q-values: V(s) = logsumexp_a Q(s, a), pi = softmax Q; at the optimum
pi = p_lambda and V(empty prefix) = log Z. The update minimises 1/2 mean_t C(t)^2, C the path
consistency (methods/twist.py, pcl_consistency) of every path of `horizon` steps, on the draw plus
`data_share` of rows of D (any trajectory satisfies the same equation). With critic=head or
separate, Q = pi's logits + u(s), a per-state offset that moves V, never pi, warmed up on the
draws' Monte-Carlo targets before pi moves.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import loop_module
from gam_rl.methods.registry import Method, register
from gam_rl.methods.twist import pcl_consistency
from gam_rl.methods.twist_loop import TrajectoryLoopConfig, TwistModule, fit_twist
from gam_rl.tokens import EOS, PAD


@dataclass
class PCLConfig(TrajectoryLoopConfig):
    """`method` section of pcl (conf/method/pcl.yaml)."""

    algorithm: str = setting("pcl", choices=("pcl",))
    horizon: int = setting(0, ge=0)  # sub-paths of d steps from every state; 0: every path runs to the end


class PCLModule(TwistModule):
    value_kind = "q_logits"

    def values(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """V(s) = logsumexp of the Q-logits (Q = pi's logits + the offset head's u(s), if any)."""
        values = torch.logsumexp(self.pi.head(states), -1)
        return values if self.critic is None else values + self.critic(tokens, states)

    def learns_values(self) -> bool:
        return True

    def fixed_values(self, states: torch.Tensor) -> torch.Tensor:
        """logsumexp of pi's Q-logits: the warm-up fits the offset u alone on top of it."""
        return torch.logsumexp(self.pi.head(states), -1)

    def update(self, draw: WeightedDraw) -> None:
        tokens = self.trajectories(draw)  # the draw, and rows of D: they satisfy the same consistency
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
        self.step(loss)


def train_pcl(cfg: PCLConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(PCLModule, cfg, inputs)
    return fit_twist(module, inputs)


register(Method("pcl", PCLConfig, train_pcl, "path consistency: pi's logits as soft Q-values of the token MDP"))
