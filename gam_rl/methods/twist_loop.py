"""What the twist learners share (pcl, ac_dpg, ppo_dpg, subtb): the shared loop (methods/loop.py)
with a learned value V(s) of every prefix beside pi, updates stepped by hand, and the keys of a
value model. methods/twist.py has the token MDP's equations.

A twist learner subclasses TwistModule and writes `update(draw)` (its loss and steps) and, if its
values are not a critic's, `values(tokens, states)`. The plateau rule keeps pi with its value
model (`trained`), so the kept policy and the learned values come from the same check; the learned
log Z is V(empty prefix), logged at every check and returned in the result.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
from torch import nn

from gam_rl.config_fields import setting
from gam_rl.exact import learned_value_errors
from gam_rl.methods.contract import Training2Inputs, Training2Result
from gam_rl.methods.draws import ProposalDraws, WeightedDraw
from gam_rl.methods.loop import LoopConfig, LoopModule, fit_loop
from gam_rl.methods.twist import CRITIC_FITS, critic_loss, critic_targets
from gam_rl.policy import LSTMPolicy, Samples, eval_mode
from gam_rl.potentials import Potential
from gam_rl.progress import Progress
from gam_rl.tokens import EOS, PAD, pad_cat

CRITICS = ("none", "head", "separate")  # head: a value head on pi's LSTM | separate: an LSTM initialised from r


@dataclass
class TwistLoopConfig(LoopConfig):
    """The loop's keys (target P_lambda only: the token MDP's terminal reward log P - log r must be finite
    everywhere) and those of a value model V(s) beside pi (docs/methods.md)."""

    target: str = setting("gam", choices=("gam",))
    critic: str = setting("none", choices=CRITICS)
    critic_fit: str = setting("exp", choices=CRITIC_FITS)  # the value model's loss on its targets (critic_loss)
    critic_lr: float = setting(1.0e-3, gt=0)  # Adam, the value model's own parameters
    critic_warmup: int = setting(0, ge=0)  # updates that train only the value model before pi moves

    def reads_symbol_log_q(self) -> bool:
        return True  # the value fit and the per-symbol ratios read log q(x_t | x_<t)

    def problems(self) -> list[str]:
        out = super().problems()
        if self.thins():
            out.append(f"method.keep_per_draw={self.keep_per_draw} with method.algorithm={self.algorithm!r}: "
                       "thinning by P/q skews the suffixes a state sees, and the value fit needs q's own; set "
                       "keep_per_draw=null")
        if self.critic_warmup and self.critic == "none":
            out.append(f"method.critic_warmup={self.critic_warmup} with method.critic='none': there is no value "
                       "model to warm up; use critic=head or critic=separate, or critic_warmup=0")
        return out


@dataclass
class TrajectoryLoopConfig(TwistLoopConfig):
    """TwistLoopConfig for the learners whose equation holds on any trajectory (pcl's consistency,
    subtb's balance): where the trajectories come from."""

    on_policy: bool = False  # true: x ~ pi at every update (no swaps); false: x ~ q with dpg_off's swap gate
    data_share: float = setting(0.0, ge=0, lt=1)  # this fraction of each minibatch is rows of D

    def samples_pi(self) -> bool:
        return self.on_policy


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


# twist.pt (methods/saved_twist.py reads it back): how V is read off pi and the critic
VALUE_KINDS = ("critic", "q_logits", "ctl")
FORMAT = 1


def twist_payload(algorithm: str, values: str, pi: LSTMPolicy, critic: nn.Module | None = None) -> dict:
    """What twist.pt holds (copies: the run goes on changing pi afterwards, e.g. back to its start)."""
    if values not in VALUE_KINDS:
        raise ValueError(f"values={values!r}: one of {VALUE_KINDS}")
    return {"format": FORMAT, "algorithm": algorithm, "values": values,
            "pi": {"config": pi.config(), "state_dict": copy.deepcopy(pi.state_dict())},
            "critic": None if critic is None else {"kind": critic.kind,
                                                   "state_dict": copy.deepcopy(critic.state_dict())}}


def terminal_reward(target: Potential, r: LSTMPolicy, tokens: torch.Tensor, log_r_seq: torch.Tensor) -> torch.Tensor:
    """log P(x) - log r(x), the final reward of the token MDP, as the importance weight of x under r
    (Potential.log_weight: for P = r * Tilt, lambda . phi(x) without scoring r again). (B,) float."""
    return target.log_weight(r, Samples(tokens, log_r_seq, tokens.eq(EOS).any(1))).float()


class TwistModule(LoopModule):
    """LoopModule (draws, checks, swap gate, target line, stops) with a value model, stepped by hand:
    r, frozen, gives the per-step rewards; the critic (or pcl's offset) has its own lr."""

    def __init__(self, pi: LSTMPolicy, draws: ProposalDraws, cfg: TwistLoopConfig, inputs: Training2Inputs, **parts):
        super().__init__(pi, draws, cfg, inputs, **parts)
        self.automatic_optimization = False  # ppo_dpg takes several steps per draw; every twist learner steps by hand
        self.base = (inputs.r,)  # r, scored under eval_mode (no dropout, no autograd): in a tuple, not a submodule
        self.critic = Critic(cfg.critic, pi, inputs.r).to(pi.device) if cfg.critic != "none" else None
        # what the plateau rule snapshots and restores: pi with its critic, so the kept policy and the
        # learned values come from the same check
        self.trained = nn.ModuleDict({"pi": pi, **({"critic": self.critic} if self.critic is not None else {})})
        self.generator = torch.Generator(device=pi.device).manual_seed(inputs.seed + 17)
        self.data = inputs.train if getattr(cfg, "data_share", 0.0) > 0 else None  # rows of D to train on too
        self.draws_trained = 0  # training steps (draws or minibatches of the proposal) so far
        self.warming_up = False  # warm_up(): only the value model learns

    def optimised_groups(self) -> list[dict]:
        groups = super().optimised_groups()
        if self.critic is not None:  # head: the value head only (it shares pi's LSTM) | separate: its LSTM too
            groups.append({"params": list(self.critic.parameters()), "lr": self.cfg.critic_lr})
        return groups

    # ---- what every update needs -----------------------------------------------------------
    def rewards(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log r(a_t | s_t) per step (B, T) and the terminal reward log P(x) - log r(x) (B,)."""
        r = self.base[0]
        with eval_mode(r):
            log_r = r.token_log_probs(tokens)
        return log_r, terminal_reward(self.target, r, tokens, log_r.sum(1))

    value_kind = "critic"  # how V is read off pi and the critic (methods/saved_twist.py's VALUE_KINDS)

    def values(self, tokens: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        """V(s_t) (B, T): the critic's (a method whose values are not a critic's overrides this)."""
        return self.critic(tokens, states)

    def learns_values(self) -> bool:
        """Whether the method has a learned V(s) (a critic, or values of its own)."""
        return self.critic is not None

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

    def fixed_values(self, states: torch.Tensor) -> torch.Tensor | float:
        """The part of V(s) that is not the value model's (pcl: the logsumexp of pi's Q-logits); 0 here."""
        return 0.0

    def warm_up_targets(self, values, log_r, log_q, terminal, mask) -> torch.Tensor:
        """The value model's targets during the warm-up: the draw's Monte-Carlo targets (critic_targets)."""
        return critic_targets(log_r, log_q, terminal, mask)

    def warm_up_loss(self, draw: WeightedDraw) -> torch.Tensor:
        """The value model alone on the draw (pi does not move: its states and fixed values without gradient),
        by critic_fit on warm_up_targets: with the exp fit, V -> V* for any proposal."""
        tokens = draw.tokens
        mask = tokens != PAD
        log_r, terminal = self.rewards(tokens)
        with torch.no_grad():
            states = self.pi.token_states(tokens)
            fixed = self.fixed_values(states)
        values = fixed + self.critic(tokens, states)
        return self.critic_fit(values, self.warm_up_targets(values, log_r, draw.log_q_tok, terminal, mask), mask)

    def warm_up(self, updates: int) -> None:
        """`updates` fresh draws on which only the critic learns, with its own Adam, before the first
        check: pi does not move, so the plateau rule does not count them."""
        opt = torch.optim.Adam(self.critic.parameters(), lr=self.cfg.critic_lr)
        self.warming_up = True
        progress = Progress(f"{self.cfg.algorithm} critic warm-up", updates, "updates")
        try:
            for k in range(updates):
                loss = self.warm_up_loss(self.draws.next_batch())
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
        """One optimiser step on `loss` (clip, then the warm-up schedule's lr if any)."""
        opt = self.optimizers()
        opt.zero_grad()
        self.manual_backward(loss)
        if self.cfg.clip is not None:
            self.clip_gradients(opt, gradient_clip_val=self.cfg.clip, gradient_clip_algorithm="norm")
        opt.step()
        schedule = self.lr_schedulers()
        if schedule is not None:
            schedule.step()

    def trajectories(self, draw: WeightedDraw) -> torch.Tensor:
        """The draw's rows and, with data_share, that share of each minibatch in rows of D (trajectories of
        p_true: they satisfy the same equations), drawn with the module's own generator."""
        tokens = draw.tokens
        if self.data is None:
            return tokens
        count = max(1, round(self.cfg.data_share * len(tokens) / (1.0 - self.cfg.data_share)))
        rows = torch.randint(len(self.data), (count,), device=tokens.device, generator=self.generator)
        return pad_cat([tokens, self.data[rows]])

    # ---- the update --------------------------------------------------------------------------
    def update(self, draw: WeightedDraw) -> None:
        """The method's update on one draw: its loss and optimiser steps (self.step)."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx):
        if self.capped():  # method.max_draws drawn: the check comes next
            return
        draw = self.draws.next_batch()  # of q, or of pi as it is now (on-policy)
        self.update(draw)
        self.draws_trained += 1
        self.log("dpg/ess", self.draws.last_ess, on_step=True, on_epoch=False, batch_size=len(draw))

    def critic_fit(self, values: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return critic_loss(values, targets, mask, self.cfg.critic_fit)

    def on_validation_epoch_end(self):
        super().on_validation_epoch_end()
        if self.learns_values():
            self.log("dpg/learned_log_z", self.learned_log_z())

    def results(self) -> dict:
        return {"twist_critic": self.cfg.critic, "twist_draws_trained": self.draws_trained}


def fit_twist(module: TwistModule, inputs: Training2Inputs, steps_per_check: int | None = None) -> Training2Result:
    """Warm the value model up (cfg.critic_warmup), then fit_loop keeping pi with its value model; the
    result carries the learned log Z and, under eval.exact, the learned values against the exact ones."""
    cfg = module.cfg
    if module.critic is not None and cfg.critic_warmup:
        module.warm_up(cfg.critic_warmup)
    values = module.value_function() if module.learns_values() else None
    # clipping is in TwistModule.step (manual optimisation)
    result = fit_loop(module, inputs, extra_keys=("dpg/learned_log_z",), steps_per_check=steps_per_check,
                      keep="trained", learned_log_z=module.learned_log_z,
                      exact_extras=None if values is None else (
                          lambda target: learned_value_errors(target, inputs.r, values)))
    if module.learns_values():  # the kept check's values, for SMC (run folder: twist.pt)
        result.twist = twist_payload(cfg.algorithm, module.value_kind, module.pi, module.critic)
    return result
