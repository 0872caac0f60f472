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

from gam_rl.kernel.lstm import StepLSTM
from gam_rl.methods.ctl import twist_log_psi
from gam_rl.methods.twist_loop import FORMAT, VALUE_KINDS, Critic
from gam_rl.policy import LSTMPolicy, eval_mode
from gam_rl.tokens import BOS, EOS


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


    def steps(self, num: int) -> TwistSteps:
        """The same values one symbol at a time, for SMC (smc.smc_runs)."""
        return TwistSteps(self, num)


class TwistSteps:
    """A LearnedTwist one symbol at a time over `num` rows (the working rows of SMC): value_after(x_t) gives
    V(s_{1:t}) of every row from the models' LSTM states after s_{1:t-1}, in O(1) per symbol, where calling
    the twist on each prefix costs O(t) (O(max_len^2) per sequence in all). Rows are kept, reordered or
    repeated with keep(index), as the proposal's steps are. No dropout, no gradient (StepLSTM).

      critic, q_logits: feed x_t, then V from the new states (the critic's head on pi's or its own LSTM;
                        q_logits adds logsumexp of pi's logits)
      ctl:              V(s_{1:t}) = l(s_{1:t-1}, x_t) - log r(x_t | s_{1:t-1}) from the states before x_t,
                        then feed x_t
    """

    def __init__(self, twist: LearnedTwist, num: int):
        self.values, critic = twist.values, twist.critic
        self.value_head = None if critic is None else critic.value
        separate = critic is not None and critic.body is not None
        self.models = {}  # name -> the LSTMPolicy whose states V reads (pi, the critic's body, r)
        if not (self.values == "critic" and separate):  # pi's states (head critic, q_logits, ctl)
            self.models["pi"] = twist.pi
        if separate:
            self.models["body"] = critic.body
        if self.values == "ctl":
            self.models["r"] = twist.base[0]
        self.lstm = {name: StepLSTM(model.lstm, num) for name, model in self.models.items()}
        bos = torch.full((num,), BOS, dtype=torch.long, device=twist.pi.device)
        with torch.no_grad():
            self.top = {name: lstm.step(bos).clone() for name, lstm in self.lstm.items()}  # after the empty prefix
            self.v0 = 0.0 if self.values == "ctl" else float(self._value(1)[0])

    def _value(self, n: int) -> torch.Tensor:
        """V of the first n rows from their current states (critic, q_logits)."""
        h = self.top["body" if "body" in self.top else "pi"][:n]
        out = self.value_head(h).squeeze(1) if self.value_head is not None else 0.0
        if self.values == "q_logits":
            out = out + torch.logsumexp(self.models["pi"].head(self.top["pi"][:n]), -1)
        return out

    @torch.no_grad()
    def value_after(self, tok: torch.Tensor) -> torch.Tensor:
        """V(s_{1:t}) for the first len(tok) rows, tok their symbols x_t; the rows advance past x_t. (n,)"""
        n = len(tok)
        if self.values == "ctl":
            picked = tok.clamp(max=EOS).unsqueeze(1)
            logits = self.models["pi"].head(self.top["pi"][:n])
            log_r = torch.log_softmax(self.models["r"].head(self.top["r"][:n]), -1)
            out = (logits.gather(1, picked) - log_r.gather(1, picked)).squeeze(1)
        for name, lstm in self.lstm.items():
            self.top[name][:n] = lstm.step(tok)
        return out if self.values == "ctl" else self._value(n)

    def keep(self, index: torch.Tensor) -> None:
        for name, lstm in self.lstm.items():
            lstm.keep(index)
            self.top[name][: len(index)] = self.top[name][index]


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
    if saved["values"] == "critic" and saved.get("critic") is None:
        raise ValueError(f"twist={str(run_dir)!r}: twist.pt reads V off a critic but holds none")
    pi = LSTMPolicy(**saved["pi"]["config"]).to(r.device)
    pi.load_state_dict(saved["pi"]["state_dict"])
    critic = None
    if saved["critic"] is not None:
        critic = Critic(saved["critic"]["kind"], pi, r).to(r.device)
        critic.load_state_dict(saved["critic"]["state_dict"])
    return LearnedTwist(saved["values"], pi, r, critic)
