"""A twist learner's learned values as a run file (twist.pt), and back: what SMC needs from a run.

Every twist learner learns, beside pi, a value V(s) of every prefix s: an estimate of the soft value
V*(s) = log sum_{x extends s} r(x | s) P(x) / r(x) (methods/twist.py), or, for ctl, a twist psi(s) known
up to a constant per length. Either way exp(V(s)) is a twist for SMC: the intermediate targets are
r(s) exp(V(s)) (gam_rl/smc.py). One convention for all of them, as in methods/twist.py:

    LearnedTwist(tokens)[:, t] = V(the prefix of the first t symbols of the row),   t = 0 .. T - 1,

so column 0 is V(empty prefix) (log Z for a value learner) and a row's last symbol's prefix is its
column L - 1; past a row's end the values are not used.

What is saved (methods/twist_loop.py's twist_payload, at the end of a twist learner's fit): pi's
weights (its states feed a head critic, and pcl's V is the logsumexp of pi's Q-logits), the
critic's kind and weights, and how V is read off them (`values`):
  critic      V = critic(s)                                  ac_dpg, ppo_dpg, subtb
  q_logits    V = logsumexp of pi's logits at s (+ critic)   pcl
  ctl         log psi(s a) = l(s, a) - log r(a | s)           ctl (pi's raw logits l, r's log-probabilities)
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from gam_rl.methods.ctl import twist_log_psi
from gam_rl.methods.twist_loop import FORMAT, VALUE_KINDS, Critic
from gam_rl.policy import LSTMPolicy, eval_mode


class LearnedTwist(nn.Module):
    """tokens (B, T) -> V (B, T) in the module docstring's convention, without dropout or gradient."""

    def __init__(self, values: str, pi: LSTMPolicy, r: LSTMPolicy, critic: nn.Module | None = None):
        super().__init__()
        self.values, self.pi, self.critic = values, pi.eval(), critic
        self.base = (r.eval(),)  # r: scored only (ctl), never a submodule to save

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        separate = self.values == "critic" and self.critic is not None and self.critic.body is not None
        with eval_mode(self.pi):  # pi's states only where V reads them (not for a separate critic: SMC's hot path)
            states = None if separate else self.pi.token_states(tokens)  # column t: after the first t symbols
        if self.values == "ctl":
            r = self.base[0]
            with eval_mode(r), eval_mode(self.pi):
                log_r = torch.log_softmax(r.head(r.token_states(tokens)), -1)
                ends = twist_log_psi(self.pi.head(states), log_r, tokens)  # column t: the prefix of t + 1 symbols
            return torch.cat([ends.new_zeros(len(tokens), 1), ends[:, :-1]], 1)  # psi(empty prefix) = 1
        with eval_mode(self.pi):
            out = torch.logsumexp(self.pi.head(states), -1) if self.values == "q_logits" else 0.0
        if self.critic is None:  # pcl without an offset: V is the logsumexp of pi's Q-logits alone
            return out
        with eval_mode(self.critic):
            return out + self.critic(tokens, states)


def load_twist(run_dir: Path, r: LSTMPolicy) -> LearnedTwist:
    """The learned twist of a twist learner's run folder (twist.pt), on r's device; ValueError naming what is
    wrong."""
    path = Path(run_dir) / "twist.pt"
    if not path.is_file():
        raise ValueError(f"twist={str(run_dir)!r}: no twist.pt (only runs of a twist learner, pcl, ac_dpg, ppo_dpg, "
                         "subtb or ctl, of version 0.2 or later, save their learned values)")
    saved = torch.load(path, map_location=r.device)
    if saved.get("format") != FORMAT or saved.get("values") not in VALUE_KINDS:
        raise ValueError(f"twist={str(run_dir)!r}: twist.pt is of another format ({saved.get('format')!r})")
    pi = LSTMPolicy(**saved["pi"]["config"]).to(r.device)
    pi.load_state_dict(saved["pi"]["state_dict"])
    critic = None
    if saved["critic"] is not None:
        critic = Critic(saved["critic"]["kind"], pi, r).to(r.device)
        critic.load_state_dict(saved["critic"]["state_dict"])
    return LearnedTwist(saved["values"], pi, r, critic)
