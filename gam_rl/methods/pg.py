"""pg: REINFORCE with reward P (RL as optimisation), the paper's baseline that DPG improves on.

    x ~ pi:  theta += alpha P(x) grad log pi(x)

It maximises E_pi[P] and collapses onto P's mode, the paper's finding. The draws, checks and stops
are the shared loop's (methods/loop.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gam_rl.config_fields import setting
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import WeightedDraw
from gam_rl.methods.loop import NORMALISE, AveragedLoopConfig, LoopModule, fit_loop, loop_module
from gam_rl.methods.registry import Method, register


def pg_loss(log_pi: torch.Tensor, draw: WeightedDraw, *, log_norm: float = 0.0,
            weight_log_pi: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE with reward P/Z from a draw of q: c_i = h_i P(x_i) pi(x_i) / (Z q(x_i)), an estimate of
    E_pi[(P/Z) grad log pi] (pi/q = 1 when q is the current pi). The loss is -sum_i c_i log pi(x_i).
    weight_log_pi: pi's log-probabilities for the coefficient, without dropout (None: log_pi itself)."""
    weights = (log_pi if weight_log_pi is None else weight_log_pi).detach().double()
    coef = torch.exp(draw.log_w + draw.log_h - log_norm + weights)  # P pi / (Z q), shared by h
    return -(coef.float() * log_pi).sum()


@dataclass
class PGConfig(AveragedLoopConfig):
    """`method` section of pg (conf/method/pg.yaml): the loop's keys, on-policy draws."""

    algorithm: str = setting("pg", choices=("pg",))
    normalise: str = setting("none", choices=NORMALISE)

    def samples_pi(self) -> bool:
        return True


class PGModule(LoopModule):
    def loss(self, draw: WeightedDraw) -> torch.Tensor:
        log_pi = self.pi.log_prob(draw.tokens)
        return pg_loss(log_pi, draw, log_norm=self.log_norm(), weight_log_pi=self.weight_log_prob(draw.tokens, log_pi))


def train_pg(cfg: PGConfig, inputs: Training2Inputs) -> Training2Result:
    module = loop_module(PGModule, cfg, inputs)
    return fit_loop(module, inputs, clip=cfg.clip)


register(Method("pg", PGConfig, train_pg, "REINFORCE with reward P: maximises E_pi[P] (collapses, the paper)"))
