"""Autoregressive LSTM policy over {0, 1, EOS}: used for r, the proposal q and pi_theta.

log pi(x) = sum_t log softmax(head(h_t))[x_t], h_t the top LSTM state after reading
BOS, x_1..x_{t-1}; the sum runs over the bits and the EOS (PAD positions are ignored).
The input is one-hot over {0, 1, EOS} with BOS as the zero vector; dropout on the
input, between layers and on the output (training only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from gam_rl.tokens import BOS, EOS, PAD, VOCAB


@dataclass
class Samples:
    """Sequences drawn from a policy, with the log-probability the sampler assigned."""

    tokens: torch.Tensor  # (B, T) long, PAD after EOS
    log_prob: torch.Tensor  # (B,) float, log pi(x) of the whole sequence
    finished: torch.Tensor  # (B,) bool, False where max_len was hit before EOS

    def __len__(self) -> int:
        return self.tokens.shape[0]


class LSTMPolicy(nn.Module):
    def __init__(self, hidden: int = 200, layers: int = 2, dropout: float = 0.2):
        super().__init__()
        if hidden < 1 or layers < 1 or not 0.0 <= dropout < 1.0:
            raise ValueError(f"bad LSTM sizes: hidden={hidden}, layers={layers}, dropout={dropout}")
        self.hidden, self.layers, self.dropout_p = hidden, layers, dropout
        self.lstm = nn.LSTM(VOCAB, hidden, num_layers=layers, batch_first=True,
                            dropout=dropout if layers > 1 else 0.0)
        self.head = nn.Linear(hidden, VOCAB)
        self.drop = nn.Dropout(dropout)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    def config(self) -> dict:
        return {"hidden": self.hidden, "layers": self.layers, "dropout": self.dropout_p}

    # ---- teacher forcing ------------------------------------------------------------
    def log_prob(self, tokens: torch.Tensor) -> torch.Tensor:
        """log pi(x) per row, summed over the bits and EOS (PAD ignored). Differentiable.

        Rows are packed by length, so the LSTM, the head and the softmax only run on real
        symbols: a batch with a few long rows costs what its symbols cost, not B * width.
        """
        lengths = (tokens != PAD).sum(dim=1).cpu()  # symbols per row, EOS included (>= 1)
        prev = torch.cat([torch.full_like(tokens[:, :1], BOS), tokens[:, :-1]], dim=1)  # input t = x_{t-1}
        inputs = F.one_hot(prev, VOCAB + 1)[..., :VOCAB].to(self.head.weight.dtype)  # BOS -> zero vector

        def pack(t: torch.Tensor) -> torch.Tensor:
            return pack_padded_sequence(t, lengths, batch_first=True, enforce_sorted=False).data

        out, _ = self.lstm(pack_padded_sequence(self.drop(inputs), lengths, batch_first=True, enforce_sorted=False))
        logp = torch.log_softmax(self.head(self.drop(out.data)), dim=-1)  # (symbols in batch, VOCAB)
        picked = logp.gather(1, pack(tokens).unsqueeze(1)).squeeze(1)
        row_of = pack(torch.arange(len(tokens), device=tokens.device).unsqueeze(1).expand_as(tokens))
        return torch.zeros(len(tokens), dtype=picked.dtype, device=tokens.device).index_add_(0, row_of, picked)

    # ---- sampling ---------------------------------------------------------------------
    def _step_weights(self):
        """Fused per-step weights: layer 0 input as a gathered gate bias; for layer l > 0
        one matrix over [h_{l-1}, h_l], so every layer costs one matmul per step."""
        lstm = self.lstm
        w_ih0, w_hh0 = lstm.weight_ih_l0, lstm.weight_hh_l0
        bias0 = lstm.bias_ih_l0 + lstm.bias_hh_l0
        # row k = gate pre-activation contributed by input symbol k (BOS/PAD row: zero input)
        input_gates = torch.cat([w_ih0.t(), torch.zeros_like(w_ih0[:, :1]).t()]) + bias0
        layers = [(w_hh0.t().contiguous(), None)]
        for l in range(1, self.layers):
            w = torch.cat([getattr(lstm, f"weight_ih_l{l}"), getattr(lstm, f"weight_hh_l{l}")], 1)
            b = getattr(lstm, f"bias_ih_l{l}") + getattr(lstm, f"bias_hh_l{l}")
            layers.append((w.t().contiguous(), b))
        return input_gates, layers, self.head.weight.t().contiguous(), self.head.bias

    @staticmethod
    def _cell(gates: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # LSTM cell: c' = sigma(f) c + sigma(i) tanh(g); h' = sigma(o) tanh(c')
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c), c

    @torch.no_grad()
    def sample(self, num: int, max_len: int, generator: torch.Generator | None = None) -> Samples:
        """Draw `num` sequences (no dropout), each with its exact log-probability.

        Stops a row at EOS or after max_len symbols (EOS included). Finished rows are
        dropped from the working batch as they accumulate, so a few long samples do not
        keep the whole batch running.
        """
        if max_len < 1:
            raise ValueError(f"max_len must be >= 1, got {max_len}")
        dev, H = self.device, self.hidden
        input_gates, layers, w_head, b_head = self._step_weights()
        tokens = torch.full((num, max_len), PAD, dtype=torch.long, device=dev)
        log_prob = torch.zeros(num, dtype=input_gates.dtype, device=dev)
        finished = torch.zeros(num, dtype=torch.bool, device=dev)
        rows = torch.arange(num, device=dev)  # original index of each working row
        h = torch.zeros(self.layers, num, H, dtype=input_gates.dtype, device=dev)
        c = torch.zeros_like(h)
        prev = torch.full((num,), BOS, dtype=torch.long, device=dev)
        for t in range(max_len):
            # layer 0: gathered input gates + h0 W_hh0; layer l: [h_{l-1}, h_l] W_l + b_l
            below = None
            for l, (w, b) in enumerate(layers):
                if l == 0:
                    gates = torch.addmm(input_gates[prev], h[0], w)
                else:
                    gates = torch.addmm(b, torch.cat([below, h[l]], dim=1), w)
                h_new, c[l] = self._cell(gates, c[l])
                h[l] = h_new
                below = h_new
            logp = torch.log_softmax(torch.addmm(b_head, below, w_head), dim=1)
            # inverse-CDF draw among 3 symbols: token = #{k : u > cdf_k}
            u = torch.rand(len(rows), 1, device=dev, dtype=logp.dtype, generator=generator)
            cdf = logp.exp().cumsum(dim=1)[:, : VOCAB - 1]
            tok = (u > cdf).sum(dim=1)
            tokens[rows, t] = tok
            log_prob[rows] += logp.gather(1, tok.unsqueeze(1)).squeeze(1)
            done = tok == EOS
            finished[rows[done]] = True
            if bool(done.all()):
                break
            if done.any():  # keep only the rows still running
                keep = ~done
                rows, prev, h, c = rows[keep], tok[keep], h[:, keep], c[:, keep]
            else:
                prev = tok
        width = int((tokens != PAD).sum(dim=1).max().item()) if num else 0
        return Samples(tokens[:, : max(width, 1)], log_prob, finished)
