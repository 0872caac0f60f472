"""Autoregressive LSTM policy over {0, 1, EOS}: used for r, the proposal q and pi_theta.

log pi(x) = sum_t log softmax(head(h_t))[x_t], h_t the top LSTM state after reading
BOS, x_1..x_{t-1}; the sum runs over the bits and the EOS (PAD positions are ignored).
The input is one-hot over {0, 1, EOS} with BOS as the zero vector; dropout on the
input, between layers and on the output (training only).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gam_rl.config_fields import setting
from gam_rl.kernel import native as lstm_native
from gam_rl.kernel.lstm import StepLSTM, head_log_prob, lstm_over_tokens, pack_tokens, score_rows
from gam_rl.potentials import Potential
from gam_rl.tokens import BOS, EOS, PAD, VOCAB

SAMPLE_BLOCK = 128  # samples per block of the compiled sampler: its z, cells and gates stay in L2


@dataclass
class ModelConfig:
    """`model` section: the LSTM of r, q and pi (the paper: 2 x 200, dropout 0.2)."""

    hidden: int = setting(200, ge=1)
    layers: int = setting(2, ge=1)
    dropout: float = setting(0.2, ge=0, lt=1)


@contextlib.contextmanager
def eval_mode(module: nn.Module):
    """Run a block with dropout off and no autograd, restoring the module's mode after."""
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            yield module
    finally:
        module.train(was_training)


@dataclass
class Samples:
    """Sequences drawn from a policy, with the log-probability the sampler assigned."""

    tokens: torch.Tensor  # (B, T) long, PAD after EOS
    log_prob: torch.Tensor  # (B,) float, log pi(x) of the whole sequence
    finished: torch.Tensor  # (B,) bool, False where max_len was hit before EOS
    token_log_prob: torch.Tensor | None = None  # (B, T) float, log pi(x_t | x_<t) per symbol, 0 at PAD

    def __len__(self) -> int:
        return self.tokens.shape[0]


class LSTMPolicy(nn.Module, Potential):
    """pi(x) as a module (log_prob, sample) and as a potential (P = pi, scored with dropout off)."""

    def __init__(self, hidden: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        self.hidden, self.layers, self.dropout_p = hidden, layers, dropout
        self.lstm = nn.LSTM(VOCAB, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, VOCAB)
        self.drop = nn.Dropout(dropout)
        # log_prob's LSTM: None = automatic (the fused kernel on the CPU, nn.LSTM elsewhere,
        # where e.g. cuDNN is faster); True / False force the fused kernel / plain nn.LSTM
        self.fused_kernel: bool | None = None

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def config(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "dropout": self.dropout_p}

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> LSTMPolicy:
        return cls(cfg.hidden, cfg.layers, cfg.dropout)

    def save(self, path) -> None:
        """{"config", "state_dict"}: what load() reads back (a run's r.pt, pi.pt)."""
        torch.save({"config": self.config(), "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, device: torch.device | str = "cpu") -> LSTMPolicy:
        """A policy saved as {"config", "state_dict"} (a run's r.pt, pi.pt), in eval mode."""
        saved = torch.load(path, map_location=device, weights_only=True)
        policy = cls(**saved["config"]).to(device).eval()
        policy.load_state_dict(saved["state_dict"])
        return policy

    # ---- as a potential ---------------------------------------------------------------
    def log_potential(self, tokens: torch.Tensor) -> torch.Tensor:
        with eval_mode(self):
            return self.log_prob(tokens)

    def log_upper_bound(self, max_len: int) -> float:
        return 0.0  # a probability is at most 1

    # ---- teacher forcing ------------------------------------------------------------
    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(x) per row, summed over the bits and EOS (PAD ignored). Differentiable.

        Rows are packed by length, so the LSTM, the head and the softmax only run on real
        symbols: a batch with a few long rows costs what its symbols cost, not B * width.
        """
        fused = getattr(self, "fused_kernel", None)  # getattr: modules pickled before the attribute existed
        if fused is None:
            fused = self.device.type == "cpu"
        return self._log_prob_fused(tokens) if fused else self._log_prob_nn_lstm(tokens)

    def _log_prob_fused(self, tokens: torch.Tensor) -> torch.Tensor:
        """log_prob through gam_rl.kernel.lstm (same parameters, hand-written backward)."""
        scoring = not (self.training and self.dropout_p > 0) and not (
            torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        if scoring and len(tokens):  # no dropout, no gradient: the compiled scorer where it applies
            scored = score_rows(tokens, self.lstm, self.head)
            if scored is not None:
                return scored
        packed = pack_tokens(tokens)
        if packed.num == 0:
            return torch.zeros(len(tokens), dtype=self.head.weight.dtype, device=tokens.device)
        # the kernel applies dropout to the input and to every layer's output (the head's input)
        out = lstm_over_tokens(packed, self.lstm, self.dropout_p if self.training else 0.0)
        picked = head_log_prob(out, self.head, packed.target)  # log pi(x_t | x_<t) at every symbol
        return torch.zeros(len(tokens), dtype=picked.dtype, device=tokens.device).index_add_(0, packed.row, picked)

    def _inputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, VOCAB) one-hot LSTM inputs: input t = x_{t-1}, BOS (and PAD) the zero vector."""
        prev = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)
        return F.one_hot(prev, VOCAB + 1)[..., :VOCAB].to(self.head.weight.dtype)

    def _log_prob_nn_lstm(self, tokens: torch.Tensor) -> torch.Tensor:
        """log_prob through nn.LSTM on a PackedSequence (the reference path)."""
        lengths = (tokens != PAD).sum(dim=1).cpu()  # symbols per row, EOS included (>= 1)
        inputs = self._inputs(tokens)

        def pack(t: torch.Tensor) -> torch.Tensor:
            return pack_padded_sequence(t, lengths, batch_first=True, enforce_sorted=False).data

        out, _ = self.lstm(pack_padded_sequence(self.drop(inputs), lengths, batch_first=True, enforce_sorted=False))
        logp = torch.log_softmax(self.head(self.drop(out.data)), dim=-1)  # (symbols in batch, VOCAB)
        picked = logp.gather(1, pack(tokens).unsqueeze(1)).squeeze(1)
        row_of = pack(torch.arange(len(tokens), device=tokens.device).unsqueeze(1).expand_as(tokens))
        return torch.zeros(len(tokens), dtype=picked.dtype, device=tokens.device).index_add_(0, row_of, picked)

    # ---- per symbol: the token MDP's view (stages/twist.py) ----------------------------
    def token_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, hidden): the top LSTM output h_t at every position of a padded batch, i.e. the state
        s_t = (BOS, x_1 .. x_{t-1}) from which x_t is predicted (dropout as in log_prob; zeros at PAD).
        Differentiable; head(h_t) are the logits of x_t."""
        B, T = tokens.shape
        fused = getattr(self, "fused_kernel", None)
        if fused is None:
            fused = self.device.type == "cpu"
        if not fused:  # a padded run: positions after a row's end never reach its earlier outputs
            out, _ = self.lstm(self.drop(self._inputs(tokens)))
            return self.drop(out) * (tokens != PAD).unsqueeze(2)
        packed = pack_tokens(tokens)
        if packed.num == 0:  # every row empty
            return torch.zeros(B, T, self.hidden, dtype=self.head.weight.dtype, device=tokens.device)
        out = lstm_over_tokens(packed, self.lstm, self.dropout_p if self.training else 0.0)
        step = torch.repeat_interleave(torch.arange(len(packed.sizes), device=tokens.device),
                                       torch.tensor(packed.sizes, dtype=torch.long, device=tokens.device))
        return out.new_zeros(B, T, self.hidden).index_put((packed.row, step), out)

    def token_log_probs(self, tokens: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T): log pi(x_t | s_t) at every position, 0 at PAD (rows sum to log_prob). Differentiable."""
        states = self.token_states(tokens) if states is None else states
        logp = torch.log_softmax(self.head(states), dim=-1)
        return logp.gather(2, tokens.clamp(max=VOCAB - 1).unsqueeze(2)).squeeze(2) * (tokens != PAD)

    # ---- sampling ---------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, num: int, max_len: int, generator: torch.Generator | None = None) -> Samples:
        """Draw `num` sequences (no dropout), each with its exact log-probability.

        Stops a row at EOS or after max_len symbols (EOS included). Symbol t of sample i is drawn
        by inverse CDF from u[i, t], a (num, max_len) table of uniforms drawn up front, so a
        generator's samples do not depend on how the work is split. Where torch exports its
        sgemm (float32 CPU), every block of SAMPLE_BLOCK samples runs through all its steps in
        one compiled call on one thread (kernel/native.py's gam_sample_rows: its state stays in the
        core's cache); otherwise the LSTM steps through kernel/lstm.py's StepLSTM over all running
        rows, and finished rows are dropped from the working batch once they are 1/16 of it.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        dev = self.device
        w_head, b_head = self.head.weight.t(), self.head.bias
        tokens = torch.full((num, max_len), PAD, dtype=torch.long, device=dev)
        log_prob = torch.zeros(num, dtype=w_head.dtype, device=dev)
        token_log_prob = torch.zeros(num, max_len, dtype=w_head.dtype, device=dev)
        uniforms = torch.rand(num, max_len, device=dev, dtype=w_head.dtype, generator=generator)
        native = lstm_native.kernels() if dev.type == "cpu" and w_head.dtype == torch.float32 else None
        sgemm = lstm_native.sgemm_address() if native is not None else None
        if sgemm is not None and w_head.shape[1] == VOCAB == 3 and num:
            self._sample_blocks(native, sgemm, max_len, uniforms, tokens, log_prob, token_log_prob)
            return self._samples(tokens, log_prob, token_log_prob)
        steps = StepLSTM(self.lstm, num)
        rows = torch.arange(num, device=dev)  # original index of each working row
        running = torch.ones(num, dtype=torch.bool, device=dev)  # working rows not yet at EOS
        prev = torch.full((num,), BOS, dtype=torch.long, device=dev)
        if native is not None:  # the per-step bookkeeping below as one compiled call
            tok = torch.empty(num, dtype=torch.long, device=dev)
            running_bytes = running.view(torch.uint8)
        for t in range(max_len):
            logits = torch.addmm(b_head, steps.step(prev), w_head)
            u = uniforms[rows, t]
            if native is not None:
                n = len(rows)
                alive = native.gam_sample_step(n, logits.data_ptr(), u.data_ptr(), rows.data_ptr(),
                                               running_bytes.data_ptr(), tok.data_ptr(), tokens.data_ptr(),
                                               token_log_prob.data_ptr(), log_prob.data_ptr(), max_len, t, EOS, PAD)
                if alive == 0:
                    break
                if n - alive >= max(1, n // 16):  # keep only the rows still running
                    keep = running[:n].nonzero().squeeze(1)
                    steps.keep(keep)
                    m = len(keep)
                    rows, tok[:m], running[:m] = rows[keep], tok[keep], True
                    prev = tok[:m]
                else:
                    prev = tok[:n]
                continue
            logp = torch.log_softmax(logits, dim=1)
            # inverse-CDF draw among 3 symbols: token = #{k : u > cdf_k}
            cdf = logp.exp().cumsum(dim=1)[:, : VOCAB - 1]
            tok = (u.unsqueeze(1) > cdf).sum(dim=1)
            # rows already at EOS (kept until the next compaction) write PAD and add 0
            tokens[rows, t] = tok.masked_fill(~running, PAD)
            picked = logp.gather(1, tok.unsqueeze(1)).squeeze(1).masked_fill(~running, 0.0)
            token_log_prob[rows, t] = picked
            log_prob[rows] += picked
            running &= tok != EOS
            alive = int(running.sum())
            if alive == 0:
                break
            if len(rows) - alive >= max(1, len(rows) // 16):  # keep only the rows still running
                keep = running.nonzero().squeeze(1)
                steps.keep(keep)
                rows, tok, running = rows[keep], tok[keep], running[keep]
            prev = tok
        return self._samples(tokens, log_prob, token_log_prob)

    @staticmethod
    def _samples(tokens: torch.Tensor, log_prob: torch.Tensor, token_log_prob: torch.Tensor) -> Samples:
        finished = (tokens == EOS).any(dim=1)
        width = int((tokens != PAD).sum(dim=1).max().item()) if len(tokens) else 0
        width = max(width, 1)
        return Samples(tokens[:, :width], log_prob, finished, token_log_prob[:, :width])

    def _sample_blocks(self, native, sgemm: int, max_len: int, uniforms, tokens, log_prob, token_log_prob) -> None:
        """sample() with each block of SAMPLE_BLOCK samples through all its steps in one compiled call
        (gam_sample_rows: every layer, the head, the draw from uniforms[i, t] and its book-keeping);
        the same draws as the step loop from the same uniforms, to float rounding."""
        layout_of = StepLSTM(self.lstm, 1)  # its weight layout; the compiled sampler keeps its own rows
        layout, (H, L, P) = layout_of.compiled_layout(), (layout_of.hidden, layout_of.layers, layout_of.P)
        threads, like = torch.get_num_threads(), self.head.weight
        w_head, b_head = self.head.weight.detach().contiguous(), self.head.bias.detach().contiguous()
        scratch = like.new_empty(threads * native.gam_sample_scratch(SAMPLE_BLOCK, L, H, P))
        idx = torch.empty(threads * SAMPLE_BLOCK, dtype=torch.long)
        with lstm_native.sequential_sgemm():  # one block (a small draw) runs on the calling thread
            native.gam_sample_rows(sgemm, len(tokens), max_len, L, H, P, *(a.ctypes.data for a in layout),
                                   w_head.data_ptr(), b_head.data_ptr(), uniforms.data_ptr(), SAMPLE_BLOCK,
                                   tokens.data_ptr(), token_log_prob.data_ptr(), log_prob.data_ptr(), EOS, PAD, BOS,
                                   scratch.data_ptr(), idx.data_ptr(), threads)
