"""Fused multi-layer LSTM over a token batch: the teacher-forcing hot path on the CPU.

`lstm_over_tokens` computes what `nn.LSTM` computes on the one-hot inputs of
`LSTMPolicy.log_prob` (same parameters, read from the `nn.LSTM` module, so state_dict() is
unchanged), with a hand-written backward instead of autograd through ~20 small ops per step:

* rows are sorted by length (longest first) and packed time-major, so the rows still running
  at step t are a prefix of length sizes[t] and every per-step op works on a contiguous block;
* layer 0's input is one-hot, so its input projection is a gathered row of a gate table
  (bias + W_ih[:, symbol]); input dropout on a one-hot vector only ever zeroes (or scales by
  1/keep) that one symbol, so it picks between two tables;
* layers run one after the other over all steps (as cuDNN does). In the compiled layer loops
  layer l > 0 keeps its input and its previous output side by side, z = [x_t | h_{t-1}], so each
  step is ONE matmul with [W_ih | W_hh], the backward's per-step matmul da [W_ih | W_hh] also gives
  dx (the layer below's gradient), and each chunk of a step's rows adds its z_t^T da_t into its own
  [dW_ih | dW_hh] while they are in its thread's cache (at 2 x 64 on an AMD EPYC that beat one matmul
  over all N positions by ~9% of the training step); in the Python loops the input projection is one
  matmul over every packed position and the recurrence one matmul per step;
* tanh is computed as 2 sigmoid(2a) - 1 (torch's CPU sigmoid is ~8x cheaper than its tanh)
  with the g-gate rows of the weights doubled, so one sigmoid call activates all four gates;
  activations, c and tanh(c) go into (N, .) buffers;
* the torch ops' backward first turns the saved activations, a cache-sized block of steps at a
  time, into per-position coefficients (below), so its reverse loop costs one matmul and four
  elementwise ops per layer per step; dL/d(pre-activation) overwrites the coefficients, and
  each weight gradient is ONE matmul over all N positions;
* dropout masks come from a counter-based SplitMix64 compiled in kernel/native.py (numpy's PCG64
  without it), seeded by torch's generator (torch's CPU bernoulli_ costs ~10 ns per element:
  ~15% of a training step at 2 x 200); the compiled layer loops apply them as they go;
* large buffers are reused between calls (_BufferPool);
* in float32 on the CPU the cell's elementwise math (the forward below, the backward's per-step
  part and the sampler's bookkeeping) runs as one compiled C pass per step (kernel/native.py), with the
  torch ops as the fallback: at the cpu profile's 2 x 64 those ops cost as much as the matmuls;
  where torch exports its MKL sgemm, each layer's whole loop over steps (the step's matmul, then
  the cell, the dropout on its output, and in the backward the sums of da that give layer 0's
  table and the biases' gradients) is one compiled call, so no Python runs between steps (at
  batch 100, r's batch, that per-step Python cost about as much as the step's matmul);
* the output head (logits, log-softmax at the target) and its backward (dh, dW, db) are one
  compiled pass each (head_log_prob);
* the compiled sums over rows (dW and the biases in the layer loops, layer 0's table, the head's dW
  and db) are taken over a fixed grid of row chunks that depends on the sizes alone (row_chunks),
  each chunk with its own sgemm calls and partial sums, added in chunk order: outputs and gradients
  are the same bits at any thread count (tests/test_lstm_kernel.py). Not so in the Python layer loops
  (no sgemm of torch's to call): there W_ih's and W_hh's gradients are torch matmuls over all positions,
  which MKL splits by thread count.

`StepLSTM` is the same cell one step of every layer at a time (no autograd, one matmul per
layer per step, preallocated buffers): LSTMPolicy.sample and log_prob under no_grad use it where
the compiled block sampler and scorer (gam_sample_rows, gam_score_rows) do not apply.

Cell (per layer, per step; x input, h/c the state of the previous step, sigma = sigmoid):
    [i, f, g, o] = [sigma, sigma, tanh, sigma](a),   a = x W_ih^T + h W_hh^T + b_ih + b_hh
    c' = f * c + i * g
    h' = o * tanh(c')
Backward at step t, given dh_t (from above, plus da_{t+1} W_hh from step t + 1):
    dc_t  = dc_{t+1} f_{t+1} + dh_t K_c,     K_c = o (1 - tanh(c_t)^2)
    da_o  = dh_t K_o,                         K_o = tanh(c_t) o (1 - o)
    da_i  = dc_t K_i,  da_f = dc_t K_f,  da_g = dc_t K_g,
                       K_i = g i (1 - i),  K_f = c_{t-1} f (1 - f),  K_g = i (1 - g^2)
    dW_ih = sum_t da_t^T x_t,  dW_hh = sum_t da_t^T h_{t-1},  db_ih = db_hh = sum_t da_t,  dx_t = da_t W_ih
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from gam_rl.kernel import native as lstm_native
from gam_rl.tokens import BOS, PAD


@dataclass
class PackedTokens:
    """A (B, T) token batch packed time-major with rows sorted by length (longest first).

    Packed position k = offsets[t] + j is step t of the j-th longest row; the rows alive at
    step t are the first sizes[t] of the sorted order (sizes is non-increasing).
    """

    sizes: list[int]
    offsets: list[int]
    prev: torch.Tensor  # (N,) long: input symbol at each position (BOS at t = 0)
    target: torch.Tensor  # (N,) long: symbol predicted at each position
    row: torch.Tensor  # (N,) long: original row index of each position

    @property
    def num(self) -> int:
        return len(self.prev)

    @cached_property
    def shift(self) -> torch.Tensor | slice:
        """Position of (t - 1, j) for every position (t >= 1, j), in packed order; a slice if all rows
        are equally long. Position k = offsets[t] + j sits sizes[t - 1] after offsets[t - 1] + j."""
        if self.sizes[-1] == self.sizes[0]:
            return slice(0, self.num - self.sizes[0])
        sizes = torch.tensor(self.sizes, device=self.prev.device)
        back = torch.repeat_interleave(sizes[:-1], sizes[1:])  # sizes[t - 1] at every position of step t >= 1
        return torch.arange(self.sizes[0], self.num, device=self.prev.device) - back

    @cached_property
    def step_arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """sizes and offsets as int64 arrays, for the compiled layer loops (kept alive with pk)."""
        return np.asarray(self.sizes, dtype=np.int64), np.asarray(self.offsets, dtype=np.int64)


def pack_tokens(tokens: torch.Tensor) -> PackedTokens:
    """Sort rows by length (PAD excluded; EOS counts) and pack them time-major."""
    B, dev = tokens.shape[0], tokens.device
    lengths, order = torch.sort((tokens != PAD).sum(dim=1), descending=True, stable=True)
    T = int(lengths[0]) if B else 0
    toks = tokens[order, :T]
    prev = torch.cat([torch.full_like(toks[:, :1], BOS), toks[:, :-1]], dim=1)
    sizes = (torch.arange(T, device=dev).unsqueeze(1) < lengths.unsqueeze(0)).sum(dim=1).tolist()
    offsets = np.concatenate([[0], np.cumsum(sizes[:-1], dtype=np.int64)]).tolist() if T else []
    rows = order.unsqueeze(0).expand(T, B)
    if T and sizes[-1] == sizes[0]:  # all rows equally long: every (t, j) is packed
        return PackedTokens(sizes=sizes, offsets=offsets, prev=prev.t().reshape(-1), target=toks.t().reshape(-1),
                            row=rows.reshape(-1))
    alive = torch.arange(T, device=dev).unsqueeze(1) < lengths.unsqueeze(0)  # (T, B), each row a prefix
    return PackedTokens(sizes=sizes, offsets=offsets, prev=prev.t()[alive], target=toks.t()[alive], row=rows[alive])


class _BufferPool:
    """Scratch buffers kept between calls.

    A fresh tensor above glibc's mmap threshold (32 MiB at most) is mapped anew on every
    allocation and costs a page fault per 4 KiB on first write: ~30 ms for one (N, 4H) gate
    buffer at 2 x 200, batch 500, i.e. ~10% of a training step. A forward borrows its
    buffers and its backward hands them back; a graph dropped without a backward simply frees
    them, so a buffer is never lent twice.
    """

    def __init__(self, keep: int = 24):
        self.keep = keep
        self.free: list[torch.Tensor] = []  # flat tensors over whole storages

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        numel = int(np.prod(shape))
        fits = [k for k, b in enumerate(self.free)
                if b.dtype == like.dtype and b.device == like.device and b.numel() >= numel]
        if not fits:
            return like.new_empty(shape)
        k = min(fits, key=lambda k: self.free[k].numel())  # the smallest that fits
        return self.free.pop(k)[:numel].view(shape)

    def give(self, *tensors: torch.Tensor | None) -> None:
        held = {b.data_ptr() for b in self.free}
        for t in tensors:
            if t is not None and t.untyped_storage().data_ptr() not in held:  # never lend one buffer twice
                storage = t.untyped_storage()
                self.free.append(t.new_empty(0).set_(storage, 0, (storage.nbytes() // t.element_size(),)))
                held.add(storage.data_ptr())
        if len(self.free) > self.keep:  # drop the smallest
            self.free.sort(key=lambda b: b.numel())
            del self.free[: len(self.free) - self.keep]


_POOL = _BufferPool()


def native_kernels(like: torch.Tensor):
    """The compiled cell (gam_rl.kernel.native) for float32 CPU tensors, else None (torch ops)."""
    if like.device.type != "cpu" or like.dtype != torch.float32:
        return None
    return lstm_native.kernels()


def lstm_weights(lstm: torch.nn.LSTM) -> list[torch.Tensor]:
    """[weight_ih_l0, weight_hh_l0, bias_ih_l0, bias_hh_l0, weight_ih_l1, ...] of an nn.LSTM (with biases)."""
    names = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
    return [getattr(lstm, f"{k}_l{l}") for l in range(lstm.num_layers) for k in names]


def _gates(g: torch.Tensor, H: int) -> tuple[torch.Tensor, ...]:
    """Views of the four gate blocks of a (n, 4H) gate tensor, in PyTorch's order i, f, g, o."""
    return g[:, :H], g[:, H : 2 * H], g[:, 2 * H : 3 * H], g[:, 3 * H :]


def _forward_weights(weights: list[torch.Tensor], layer: int):
    """W_ih, W_hh and b_ih + b_hh of one layer with the g-gate rows doubled (new tensors):
    then sigma(a) of the g block is sigma(2 a_g), and g = tanh(a_g) = 2 sigma(2 a_g) - 1."""
    w_ih, w_hh, b_ih, b_hh = weights[4 * layer : 4 * layer + 4]
    H = w_hh.shape[1]
    scale = torch.ones(4 * H, 1, dtype=w_hh.dtype, device=w_hh.device)
    scale[2 * H : 3 * H] = 2.0
    return w_ih * scale, w_hh * scale, (b_ih + b_hh) * scale.squeeze(1)


def _input_table(w_ih: torch.Tensor, bias: torch.Tensor, keep: float | None) -> torch.Tensor:
    """Pre-activations of layer 0 from its one-hot input, one row per table index.

    Rows 0..2: bias + W_ih[:, k] / keep (symbol k kept), row 3: bias (BOS = zero vector);
    with input dropout, rows 4..7 = bias (symbol dropped). Index = prev + 4 * dropped.
    """
    rows = torch.cat([w_ih.t() / (keep or 1.0), torch.zeros_like(w_ih[:, :1]).t()]) + bias
    return torch.cat([rows, bias.expand_as(rows)]) if keep is not None else rows


def _ptr(tensor: torch.Tensor | None) -> int | None:
    """A tensor's data address for ctypes (None: NULL)."""
    return None if tensor is None else tensor.data_ptr()


# The compiled loops' fixed grid of row chunks (row_chunks). Each chunk makes its own sgemm calls (torch's
# MKL packs the weights anew for each) and keeps its own dW: on one thread, a training step (2 x 64, batch
# 500, CPU time) cost 40.0 / 40.4 / 40.9 / 42.2 / 47 ms at 1 / 2 / 4 / 8 / 16 chunks, and at 2 x 200 262 /
# 264 / 280 / 322 ms at 1 / 2 / 4 / 8; so chunks of >= 64 rows, and <= 4 MiB of partial sums (2 x 200: 2).
CHUNK_ROWS = 64  # rows per chunk, at least (at the first step)
MAX_CHUNKS = 16
CHUNK_FLOATS = 2**20  # the chunks' partial sums together (the layer backward's dW: chunks x K x 4H), at most


HEAD_CHUNK_WORK = 65536  # the head's backward: rows x H per chunk, at least (its old threading threshold)


def row_chunks(rows: int, floats_per_chunk: int = 0, rows_per_chunk: int = CHUNK_ROWS) -> int:
    """The number of chunks the compiled loops cut `rows` rows into (kernel/lstm_cell.c, chunk_lo): a
    power of two (1, 2, 4, ... so that 2, 4 or 8 threads share them evenly) of at least `rows_per_chunk`
    rows each, at most MAX_CHUNKS, and with at most CHUNK_FLOATS floats of partial sums. It depends on
    the problem's size alone, never on the thread count: every chunk makes its own sgemm calls and sums,
    added in chunk order, so the gradients are bit-identical at any number of threads. A thread takes
    whole chunks, so threads beyond the chunks wait. One chunk is what one thread did before the grid
    (a batch of <= 127 rows, r's at the cpu and toy profiles, gives the same bits as then)."""
    cap = min(MAX_CHUNKS, max(1, rows // rows_per_chunk), max(1, CHUNK_FLOATS // max(floats_per_chunk, 1)))
    return 1 << (cap.bit_length() - 1)


def _chunk_sum(acc: torch.Tensor) -> torch.Tensor:
    """acc[0] + acc[1] + ... in chunk order (elementwise adds: the same bits at any thread count, where
    torch's sum over dim 0 may split the work by threads)."""
    total = acc[0].clone()
    for part in acc[1:]:
        total += part
    return total


def _forward_steps(pk: PackedTokens, gates, cell, tanh_c, h_out, w_hh, H: int, native, threads: int) -> None:
    """One layer's steps from Python: a matmul per step, then the cell (compiled, or torch ops)."""
    sizes, offs = pk.sizes, pk.offsets
    for t, (n, a) in enumerate(zip(sizes, offs, strict=True)):
        g = gates[a : a + n]
        if t > 0:  # a += h_{t-1} W_hh^T (the rows alive at t are a prefix of those alive at t - 1)
            g.addmm_(h_out[offs[t - 1] : offs[t - 1] + n], w_hh.t())
        if native is not None:  # the cell below in one compiled pass: gates activated in place
            c_prev = cell[offs[t - 1]].data_ptr() if t > 0 else None
            native.gam_cell_forward(n, H, g.data_ptr(), 4 * H, c_prev, cell[a].data_ptr(), h_out[a].data_ptr(),
                                    H, g.data_ptr(), tanh_c[a].data_ptr(), threads)
            continue
        torch.sigmoid_(g)  # i, f, o = sigma(a); the g block holds sigma(2 a_g)
        i, f, gg, o = _gates(g, H)
        gg.mul_(2).sub_(1)  # g = tanh(a_g) = 2 sigma(2 a_g) - 1
        c = cell[a : a + n]
        if t == 0:  # c_{-1} = 0
            torch.mul(i, gg, out=c)
        else:  # c_t = f * c_{t-1} + i * g
            torch.mul(f, cell[offs[t - 1] : offs[t - 1] + n], out=c)
            c.addcmul_(i, gg)
        tc = tanh_c[a : a + n]
        torch.add(c, c, out=tc)
        torch.sigmoid_(tc).mul_(2).sub_(1)  # tanh(c_t) = 2 sigma(2 c_t) - 1
        torch.mul(o, tc, out=h_out[a : a + n])  # h_t = o * tanh(c_t)


def _forward(pk: PackedTokens, in_index: torch.Tensor, keep: float | None, masks: list[torch.Tensor] | None,
             weights: list[torch.Tensor], hidden: int, layers: int):
    """Layer by layer over all positions: the output (dropout(top-layer h), (N, H)) and what the
    backward needs, per layer: with the compiled layer loops (gates, c, tanh(c), z), see
    _forward_compiled; else (activated gates, c, tanh(c), h, the layer's input x)."""
    like = weights[0]
    native = native_kernels(like)
    sgemm = lstm_native.sgemm_address() if native is not None else None
    if sgemm is not None:
        return _forward_compiled(pk, in_index, keep, masks, weights, hidden, layers, native, sgemm)
    H, N, threads = hidden, pk.num, torch.get_num_threads()
    saved = []
    x = None  # input of layer l > 0 at every position: dropout(h_{l-1}), (N, H)
    for l in range(layers):
        # g rows doubled: g = tanh(a_g) = 2 sigma(2 a_g) - 1, so one sigmoid covers the four gates
        w_ih, w_hh, bias = _forward_weights(weights, l)
        gates, cell, tanh_c, h_out = (_POOL.take((N, 4 * H), like), _POOL.take((N, H), like),
                                      _POOL.take((N, H), like), _POOL.take((N, H), like))
        if l == 0:  # a = gathered table row (input + bias)
            torch.index_select(_input_table(w_ih, bias, keep), 0, in_index, out=gates)
        else:  # one matmul over all positions: a = x W_ih^T + b
            torch.addmm(bias, x, w_ih.t(), out=gates)
        _forward_steps(pk, gates, cell, tanh_c, h_out, w_hh, H, native, threads)
        saved.append((gates, cell, tanh_c, h_out, x))
        # dropout on every layer's output: the next layer's input, or the LSTM's output
        if masks is not None:
            x = torch.mul(h_out, masks[l], out=_POOL.take((N, H), like) if l < layers - 1 else like.new_empty(N, H))
        else:
            x = h_out
    return x, saved


def _forward_compiled(pk: PackedTokens, in_index: torch.Tensor, keep: float | None, masks: list[torch.Tensor] | None,
                      weights: list[torch.Tensor], hidden: int, layers: int, native, sgemm: int):
    """Every layer's steps in one compiled call (gam_layer_forward: no Python per step). Layer l's step
    matmul reads z_l: (N, H) h_{t-1} for layer 0 (its input is the table), (N, 2H) [x_t | h_{t-1}] for
    l > 0, where the layer below writes x = dropout(h) and the layer itself its h at the position of
    the same row one step later; so a = z W^T with W = [W_ih | W_hh] is one sgemm per step, and the
    backward's dW^T = sum_t z_t^T da_t is read from z. Saved per layer: (activated gates, c, tanh(c), z)."""
    H, N = hidden, pk.num
    like = weights[0]
    zs = [_POOL.take((N, H if l == 0 else 2 * H), like) for l in range(layers)]
    out = like.new_empty(N, H)  # dropout(top-layer h): returned, so never a pooled buffer
    saved = []
    for l in range(layers):
        w_ih, w_hh, bias = _forward_weights(weights, l)  # g rows doubled: one sigmoid for all four gates
        if l == 0:  # a = z W_hh^T + table row (input + bias)
            w, table, index, b = w_hh, _input_table(w_ih, bias, keep).contiguous(), in_index.contiguous(), None
        else:  # a = [x | h_{t-1}] [W_ih | W_hh]^T + bias
            w, table, index, b = torch.cat([w_ih, w_hh], dim=1), None, None, bias.contiguous()
        gates, cell, tanh_c = _POOL.take((N, 4 * H), like), _POOL.take((N, H), like), _POOL.take((N, H), like)
        x_out = zs[l + 1] if l < layers - 1 else out  # dropout(h): the next layer's input columns, or the output
        with lstm_native.sequential_sgemm():
            native.gam_layer_forward(sgemm, len(pk.sizes), *(arr.ctypes.data for arr in pk.step_arrays), H,
                                     zs[l].shape[1], gates.data_ptr(), _ptr(table), _ptr(index), _ptr(b),
                                     w.data_ptr(), zs[l].data_ptr(), cell.data_ptr(), tanh_c.data_ptr(),
                                     _ptr(masks[l] if masks is not None else None), x_out.data_ptr(),
                                     x_out.shape[1], torch.get_num_threads(), _layer_chunks(pk, zs[l].shape[1], H))
        saved.append((gates, cell, tanh_c, zs[l]))
    return out, saved


def _layer_chunks(pk: PackedTokens, K: int, H: int) -> int:
    """The compiled layer loops' chunks (row_chunks): the forward and its backward cut every step alike."""
    return row_chunks(pk.sizes[0], K * 4 * H)


COEFFICIENT_BLOCK = 2**17  # elements (512 KiB in fp32) per block of the backward's coefficients: cache-sized


def _chunks(sizes: list[int], offsets: list[int], rows: int) -> list[tuple[int, int]]:
    """Consecutive steps [t0, t1) grouped so that each group covers >= `rows` packed rows (or one step)."""
    groups, t0 = [], 0
    for t in range(len(sizes)):
        if offsets[t] + sizes[t] - offsets[t0] >= rows or t == len(sizes) - 1:
            groups.append((t0, t + 1))
            t0 = t + 1
    return groups


def _coefficients(pk: PackedTokens, r0: int, r1: int, gates, cell, tanh_c, c_prev, tmp, sig_d, H: int) -> None:
    """For positions [r0, r1) turn what the forward saved into the backward's coefficients, in place:
    gates [i, f, g, o] -> [K_i, K_f, K_g, K_o] = [g i (1-i), c_{t-1} f (1-f), i (1-g^2), tanh(c) o (1-o)],
    cell c -> K_c = o (1 - tanh(c)^2), tanh_c -> f; so that at every step
        dc_t = dc_{t+1} f_{t+1} + dh_t K_c,   da_{i,f,g} = dc_t K_{i,f,g},   da_o = dh_t K_o.
    One op per quantity over a block of steps instead of one per step: the backward's loop
    then costs 4 elementwise ops per step."""
    B0, n = pk.sizes[0], r1 - r0
    g = gates[r0:r1]
    i, f, gg, o = _gates(g, H)
    c, tc, cp, q, s = cell[r0:r1], tanh_c[r0:r1], c_prev[:n], tmp[:n], sig_d[:n]
    # c_{t-1} of every position (0 at t = 0), read before c is overwritten
    if r0 < B0:
        cp[: B0 - r0].zero_()
    if r1 > B0:
        lo, hi = max(r0, B0) - B0, r1 - B0
        shift = pk.shift
        src = cell[shift.start + lo : shift.start + hi] if isinstance(shift, slice) else cell[shift[lo:hi]]
        cp[max(r0, B0) - r0 :].copy_(src)
    torch.addcmul(g[:, : 2 * H], g[:, : 2 * H], g[:, : 2 * H], value=-1, out=s)  # i (1 - i), f (1 - f)
    torch.mul(tc, tc, out=c)
    torch.addcmul(o, o, c, value=-1, out=c)  # K_c = o (1 - tanh(c)^2)
    torch.addcmul(o, o, o, value=-1, out=q)
    torch.mul(q, tc, out=o)  # K_o = tanh(c) o (1 - o)
    tc.copy_(f)  # f, for dc_{t-1} = dc_t f_t
    torch.mul(gg, gg, out=q)
    torch.addcmul(i, i, q, value=-1, out=q)  # K_g = i (1 - g^2)
    torch.mul(gg, s[:, :H], out=i)  # K_i = g i (1 - i)
    gg.copy_(q)
    torch.mul(cp, s[:, H:], out=f)  # K_f = c_{t-1} f (1 - f)


class _NativeSteps:
    """The backward's reverse loop over the steps of one layer with the compiled cell (kernel/native.py), from
    Python: per step one matmul (dh += da_{t+1} W_hh) and one C pass (gates -> da, dc carried in d_cs[0]).
    (With torch's sgemm the whole backward is _backward_compiled instead.)"""

    def __init__(self, native):
        self.native, self.threads = native, torch.get_num_threads()

    def reverse(self, pk, gates, cell, tanh_c, d_h, d_cs, w_hh, H, acc, index) -> None:
        """acc (chunks, rows, 4H) gathers every position's da by index (index None: all in row 0), each
        step's rows cut into acc.shape[0] chunks (row_chunks: the same at any thread count)."""
        sizes, offs, T = pk.sizes, pk.offsets, len(pk.sizes)
        chunks, acc_rows = acc.shape[0], acc.shape[1]
        for t in reversed(range(T)):
            n, a = sizes[t], offs[t]
            dh = d_h[a : a + n]
            m = sizes[t + 1] if t + 1 < T else 0
            if m:  # dh_t += da_{t+1} W_hh (rows alive at t + 1)
                dh[:m].addmm_(gates[offs[t + 1] : offs[t + 1] + m], w_hh)
            # gates [i, f, g, o] -> [da_i, da_f, da_g, da_o]; d_cs[0] carries dc_{t+1} f_{t+1} to step t
            c_prev = cell[offs[t - 1]].data_ptr() if t > 0 else None
            self.native.gam_cell_backward(n, m, H, gates[a].data_ptr(), c_prev, tanh_c[a].data_ptr(),
                                          dh.data_ptr(), d_cs[0].data_ptr(), self.threads, acc.data_ptr(),
                                          None if index is None else index[a].data_ptr(), acc_rows, chunks)


class _TorchSteps:
    """The same reverse loop as torch ops: the saved activations become coefficients a cache-sized
    block of steps at a time (_coefficients), then four elementwise ops per step."""

    def __init__(self, pk: PackedTokens, like: torch.Tensor, H: int):
        # coefficients are made a block of steps at a time, COEFFICIENT_BLOCK elements per (rows, H) block
        self.chunks = _chunks(pk.sizes, pk.offsets, max(1, COEFFICIENT_BLOCK // H))
        rows = max(pk.offsets[t1 - 1] + pk.sizes[t1 - 1] - pk.offsets[t0] for t0, t1 in self.chunks)
        self.scratch = like.new_empty(rows, H), like.new_empty(rows, H), like.new_empty(rows, 2 * H)

    def reverse(self, pk, gates, cell, tanh_c, d_h, d_cs, w_hh, H, acc, index) -> None:
        sizes, offs, T = pk.sizes, pk.offsets, len(pk.sizes)
        for t0, t1 in reversed(self.chunks):
            _coefficients(pk, offs[t0], offs[t1 - 1] + sizes[t1 - 1], gates, cell, tanh_c, *self.scratch, H)
            for t in reversed(range(t0, t1)):
                n, a = sizes[t], offs[t]
                dh = d_h[a : a + n]
                if t + 1 < T:  # dh_t += da_{t+1} W_hh (rows alive at t + 1)
                    m = sizes[t + 1]
                    dh[:m].addmm_(gates[offs[t + 1] : offs[t + 1] + m], w_hh)
                g = gates[a : a + n]  # [K_i, K_f, K_g, K_o], replaced by [da_i, da_f, da_g, da_o]
                dc, dc_prev = d_cs[t % 2][:n], d_cs[(t + 1) % 2][:n]
                dc.addcmul_(dh, cell[a : a + n])  # dc_t = dc_{t+1} f_{t+1} + dh_t o (1 - tanh(c_t)^2)
                torch.mul(dc, tanh_c[a : a + n], out=dc_prev)  # dc_t f_t, carried to step t - 1
                g[:, 3 * H :].mul_(dh)  # da_o = dh tanh(c_t) o (1 - o)
                g[:, : 3 * H].view(n, 3, H).mul_(dc.unsqueeze(1))  # da_i, da_f, da_g = dc * K_i, K_f, K_g


def _backward(pk: PackedTokens, in_index: torch.Tensor, keep: float | None, masks: list[torch.Tensor] | None,
              weights: list[torch.Tensor], hidden: int, layers: int, saved, grad_out: torch.Tensor):
    H, N, B0 = hidden, pk.num, pk.sizes[0]
    like = weights[0]
    native = native_kernels(like)
    sgemm = lstm_native.sgemm_address() if native is not None else None
    if sgemm is not None:  # saved by _forward_compiled
        return _backward_compiled(pk, in_index, keep, masks, weights, hidden, layers, saved, grad_out, native, sgemm)
    grads: list[torch.Tensor | None] = [None] * len(weights)
    # dL/dh of the current layer at every position: from above (the head, or the next layer's
    # input) plus, added step by step below, from the same layer's next step
    d_h = _POOL.take((N, H), like)
    if masks is not None:  # through the dropout on the top layer's output
        torch.mul(grad_out, masks[-1], out=d_h)
    else:
        d_h.copy_(grad_out)
    # dc double-buffered: rows beyond those alive at t + 1 are still zero when step t reads them
    d_cs = [like.new_zeros(B0, H), like.new_zeros(B0, H)]
    steps = _NativeSteps(native) if native is not None else _TorchSteps(pk, like, H)
    table_rows = 8 if keep is not None else 4
    for l in reversed(range(layers)):
        gates, cell, tanh_c, h_out, x = saved[l]
        w_ih, w_hh = weights[4 * l], weights[4 * l + 1]
        d_gates = gates  # coefficients, then da, overwrite the activations
        for d_c in d_cs:
            d_c.zero_()
        # the compiled cell also sums da per chunk of rows as it goes: by table row (layer 0) or all (the bias)
        acc = like.new_zeros(row_chunks(B0), table_rows if l == 0 else 1, 4 * H) if native is not None else None
        if masks is not None and l < layers - 1:  # d_h holds dL/d dropout(h)
            d_h.mul_(masks[l])
        steps.reverse(pk, gates, cell, tanh_c, d_h, d_cs, w_hh, H, acc, in_index if l == 0 else None)
        # weight gradients, one matmul each over all positions (computed transposed, (in, 4H):
        # MKL is faster with the long dimension N inside than as x^T's rows)
        if N > B0:  # dW_hh^T = sum_t h_{t-1}^T da_t  (h_{-1} = 0)
            d_w_hh = h_out[pk.shift].t() @ d_gates[B0:]
        else:
            d_w_hh = like.new_zeros(H, 4 * H)
        if l == 0:  # table rows: d_table[k] = sum of da over positions with index k
            d_table = (_chunk_sum(acc) if acc is not None
                       else like.new_zeros(table_rows, 4 * H).index_add_(0, in_index, d_gates))
            d_bias, d_w_ih = _table_grads(d_table, keep)
        else:
            d_bias = _chunk_sum(acc)[0] if acc is not None else d_gates.sum(dim=0)
            d_w_ih = x.t() @ d_gates  # dW_ih^T = sum_t x_t^T da_t
            torch.mm(d_gates, w_ih, out=d_h)  # dx = da W_ih (the layer below applies its dropout mask)
        grads[4 * l : 4 * l + 4] = [d_w_ih.t().contiguous(), d_w_hh.t().contiguous(), d_bias, d_bias.clone()]
        _POOL.give(gates, cell, tanh_c, h_out if masks is not None or l < layers - 1 else None,
                   x if masks is not None else None)
    _POOL.give(d_h)
    return grads


def _table_grads(d_table: torch.Tensor, keep: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer 0's bias and W_ih^T gradients from its table's: every row carries the bias, and rows 0..2
    carry W_ih[:, k] / keep (_input_table)."""
    return d_table.sum(dim=0), d_table[:3] / (keep or 1.0)


def _backward_compiled(pk: PackedTokens, in_index: torch.Tensor, keep: float | None,
                       masks: list[torch.Tensor] | None, weights: list[torch.Tensor], hidden: int, layers: int, saved,
                       grad_out: torch.Tensor, native, sgemm: int):
    """The backward of _forward_compiled, one compiled call per layer (gam_layer_backward): its
    per-step sgemm dz = da [W_ih | W_hh] gives both the gradient sent back to h_{t-1} and dx, the
    layer below's gradient from above (so dx needs no matmul over all positions), and a second one
    adds z_t^T da_t into its chunk of rows' own [dW_ih | dW_hh]^T; the loop adds the chunks' sums in
    chunk order into block 0 (row_chunks: bit-identical at any thread count)."""
    H, N, B0 = hidden, pk.num, pk.sizes[0]
    like, threads = weights[0], torch.get_num_threads()
    grads: list[torch.Tensor | None] = [None] * len(weights)
    above = grad_out.contiguous()  # the gradient on the layer's output: (N, H), then dz's first H columns
    dcf = like.new_empty(B0, H)  # dc_{t+1} f_{t+1}, carried to step t
    table_rows = 8 if keep is not None else 4
    for l in reversed(range(layers)):
        gates, cell, tanh_c, z = saved[l]
        w_ih, w_hh = weights[4 * l], weights[4 * l + 1]
        K = z.shape[1]
        w = w_hh.contiguous() if l == 0 else torch.cat([w_ih, w_hh], dim=1)
        dz = _POOL.take((N, K), like)
        dcf.zero_()
        # the loop sums da per chunk as it goes: by table row (layer 0) or all (the bias)
        chunks = _layer_chunks(pk, K, H)
        acc = like.new_zeros(chunks, table_rows if l == 0 else 1, 4 * H)
        w_acc = like.new_zeros(chunks, K, 4 * H)
        with lstm_native.sequential_sgemm():
            native.gam_layer_backward(sgemm, len(pk.sizes), *(arr.ctypes.data for arr in pk.step_arrays), H, K,
                                      gates.data_ptr(), w.data_ptr(), cell.data_ptr(), tanh_c.data_ptr(),
                                      above.data_ptr(), above.stride(0), _ptr(masks[l] if masks is not None else None),
                                      dz.data_ptr(), dcf.data_ptr(), threads, acc.data_ptr(),
                                      _ptr(in_index if l == 0 else None), acc.shape[1], z.data_ptr(), w_acc.data_ptr(),
                                      chunks)
        d_w = w_acc[0]  # the chunks' sum
        if l == 0:  # table rows: d_table[k] = sum of da over positions with index k
            d_bias, d_w_ih = _table_grads(acc[0], keep)
            d_w_hh = d_w
        else:
            d_bias = acc[0, 0].clone()
            d_w_ih, d_w_hh = d_w[:H], d_w[H:]
        grads[4 * l : 4 * l + 4] = [d_w_ih.t().contiguous(), d_w_hh.t().contiguous(), d_bias, d_bias.clone()]
        _POOL.give(gates, cell, tanh_c, z, above if l < layers - 1 else None)
        above = dz[:, :H]  # dx: the gradient on the layer below's output (its dropout mask applied in its loop)
    _POOL.give(dz)
    return grads


class StepLSTM:
    """Every layer one step at a time, without autograd: the sampler, and scoring under no_grad.

    Each working row keeps z = [onehot(prev) (P columns) | h_0 | ... | h_{L-1} | 1 0 ... 0]:
    layer 0 reads [onehot(prev), h_0] (its input projection and bias are weight rows picked by
    the one-hot), layer l >= 1 reads [h_{l-1}, h_l] (the top layer also the constant 1, its
    bias row), so every layer costs ONE matmul per step with no gather and no concatenation,
    and writes its new h in place, where the layer above and the next step read it. Buffers
    are allocated once; rows are used as a prefix: rows[:n] are the n rows still running.
    The cell's elementwise math is one compiled pass (gam_rl.kernel.native) where available; the
    torch ops instead keep the cell state doubled (c2 = 2c), which saves them two passes per step.
    """

    P = 8  # one-hot columns (4 used: 0, 1, EOS, BOS), padded

    def __init__(self, lstm: torch.nn.LSTM, num: int):
        H, L = self.hidden, self.layers = lstm.hidden_size, lstm.num_layers
        like = lstm.weight_hh_l0
        weights = lstm_weights(lstm)
        self.mats: list[tuple[torch.Tensor, torch.Tensor | None, slice]] = []  # (W (K, 4H), bias, input columns)
        with torch.no_grad():
            for l in range(L):
                # g rows doubled: g = tanh(a_g) = 2 sigma(2 a_g) - 1, one sigmoid for all gates
                w_ih, w_hh, bias = _forward_weights(weights, l)
                if l == 0:  # rows: table (bias + W_ih[:, k]; BOS row = bias), zero padding, W_hh^T
                    pad = like.new_zeros(self.P - 4, 4 * H)
                    self.mats.append((torch.cat([_input_table(w_ih, bias, None), pad, w_hh.t()]), None,
                                      slice(0, self.P + H)))
                elif l == L - 1:  # rows: W_ih^T, W_hh^T, bias (times the constant-1 column), zero padding
                    pad = like.new_zeros(self.P - 1, 4 * H)
                    self.mats.append((torch.cat([w_ih.t(), w_hh.t(), bias.unsqueeze(0), pad]), None,
                                      slice(self.P + (l - 1) * H, self.P * 2 + (l + 1) * H)))
                else:
                    self.mats.append((torch.cat([w_ih.t(), w_hh.t()]), bias, slice(self.P + (l - 1) * H,
                                                                                  self.P + (l + 1) * H)))
        self.z = like.new_zeros(num, 2 * self.P + L * H)
        self.z[:, self.P + L * H] = 1.0
        self.cell = like.new_zeros(L, num, H)
        self.gates, self.tanh_c = like.new_empty(num, 4 * H), like.new_empty(num, H)
        self.symbols = torch.arange(4, device=like.device)
        # the compiled cell (float32 CPU) keeps c itself; the torch ops below keep c2 = 2c
        self.native, self.threads = native_kernels(like), torch.get_num_threads()

    def compiled_layout(self) -> tuple[np.ndarray, ...]:
        """(weight addresses, bias addresses (0: none), K, first column) per layer, int64, for the
        compiled sampler and scorer (kernel/native.py's gam_sample_rows, gam_score_rows); self.mats keeps
        the tensors."""
        w_addr = [w.data_ptr() for w, _, _ in self.mats]
        b_addr = [0 if b is None else b.data_ptr() for _, b, _ in self.mats]
        k = [cols.stop - cols.start for _, _, cols in self.mats]
        col = [cols.start for _, _, cols in self.mats]
        return tuple(np.asarray(v, dtype=np.int64) for v in (w_addr, b_addr, k, col))

    def h(self, layer: int, n: int) -> torch.Tensor:
        """h of `layer` for the first n rows (a view into z)."""
        a = self.P + layer * self.hidden
        return self.z[:n, a : a + self.hidden]

    def step(self, prev: torch.Tensor) -> torch.Tensor:
        """Advance the first len(prev) rows by one symbol (prev: their input); returns top h (view)."""
        n, H = len(prev), self.hidden
        torch.eq(prev.unsqueeze(1), self.symbols, out=self.z[:n, :4])  # one-hot of the input symbol
        for l, (w, bias, cols) in enumerate(self.mats):
            g = self.gates[:n]
            if bias is None:  # a = [input, h_{t-1}(, 1)] W
                torch.mm(self.z[:n, cols], w, out=g)
            else:
                torch.addmm(bias, self.z[:n, cols], w, out=g)
            if self.native is not None:  # c' = f c + i g, h' = o tanh(c') in one compiled pass
                cell = self.cell[l].data_ptr()
                self.native.gam_cell_forward(n, H, g.data_ptr(), 4 * H, cell, cell, self.h(l, n).data_ptr(),
                                             self.z.stride(0), None, None, self.threads)
                continue
            torch.sigmoid_(g)  # i, f, o = sigma(a); s_g = sigma(2 a_g), so g = tanh(a_g) = 2 s_g - 1
            i, f, s_g, o = _gates(g, H)
            # the cell holds c2 = 2c: c2_t = f c2_{t-1} + 2 i g = f c2_{t-1} + 4 i s_g - 2 i
            self.cell[l, :n].mul_(f).addcmul_(i, s_g, value=4.0).sub_(i, alpha=2.0)
            tc = torch.sigmoid(self.cell[l, :n], out=self.tanh_c[:n])
            tc.mul_(2).sub_(1)  # tanh(c_t) = 2 sigma(2 c_t) - 1
            torch.mul(o, tc, out=self.h(l, n))  # h_t = o * tanh(c_t)
        return self.h(self.layers - 1, n)

    def keep(self, index: torch.Tensor) -> None:
        """Move rows `index` (increasing) to the front: the new working rows."""
        m = len(index)
        self.z[:m] = self.z[index]
        self.cell[:, :m] = self.cell[:, index]


class _FusedLSTM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pk, in_index, keep, masks, hidden, layers, *weights):
        out, saved = _forward(pk, in_index, keep, masks, list(weights), hidden, layers)
        ctx.args = (pk, in_index, keep, masks, hidden, layers)
        ctx.saved = saved
        ctx.save_for_backward(*weights)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.saved is None:
            raise RuntimeError("the fused LSTM's backward runs once per forward (it reuses the saved buffers): "
                               "for retain_graph or double backward set LSTMPolicy.fused_kernel = False")
        saved, ctx.saved = ctx.saved, None
        pk, in_index, keep, masks, hidden, layers = ctx.args
        grads = _backward(pk, in_index, keep, masks, list(ctx.saved_tensors), hidden, layers, saved, grad_out)
        return (None,) * 6 + tuple(grads)


class _HeadLogProb(torch.autograd.Function):
    """log softmax(out W^T + b)[target] per position through the compiled head (gam_head_logp /
    gam_head_backward): the logits, the softmax and the pick in one pass; the backward's dh = dz W,
    dW = dz^T h and db = sum dz in another, where torch needs two matmuls slow at V = 3 and four ops."""

    @staticmethod
    def forward(ctx, out, weight, bias, target, native):
        n, (V, H), threads = out.shape[0], weight.shape, torch.get_num_threads()
        out, target, w, b = out.contiguous(), target.contiguous(), weight.contiguous(), bias.contiguous()
        probs, picked = out.new_empty(n, V), out.new_empty(n)  # probs: softmax(z), for the backward
        native.gam_head_logp(n, V, H, out.data_ptr(), w.data_ptr(), b.data_ptr(), target.data_ptr(),
                             probs.data_ptr(), picked.data_ptr(), threads)
        ctx.save_for_backward(out, weight)
        ctx.probs, ctx.target, ctx.native = probs, target, native
        return picked

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_picked):
        out, weight = ctx.saved_tensors
        (n, H), V, threads = out.shape, weight.shape[0], torch.get_num_threads()
        w, g, d_out = weight.contiguous(), grad_picked.contiguous(), out.new_empty(out.shape)  # held for the call
        chunks = row_chunks(n, rows_per_chunk=max(1, HEAD_CHUNK_WORK // H))
        acc = out.new_zeros(chunks, V, H + 1)  # per chunk of rows: [dW_k | db_k]; summed into acc[0]
        ctx.native.gam_head_backward(n, V, H, g.data_ptr(), ctx.probs.data_ptr(),
                                     ctx.target.data_ptr(), w.data_ptr(), out.data_ptr(), d_out.data_ptr(),
                                     acc.data_ptr(), threads, chunks)
        d_wb = acc[0]
        return d_out, d_wb[:, :H].contiguous(), d_wb[:, H].contiguous(), None, None


def head_log_prob(out: torch.Tensor, head: torch.nn.Linear, target: torch.Tensor) -> torch.Tensor:
    """log softmax(head(out))[target] at every row of out (n, H); differentiable. Compiled on float32
    CPU tensors (kernel/native.py), else torch ops: the same values to float rounding."""
    native = native_kernels(out)
    if native is None or out.dtype != head.weight.dtype:
        return torch.log_softmax(head(out), dim=-1).gather(1, target.unsqueeze(1)).squeeze(1)
    return _HeadLogProb.apply(out, head.weight, head.bias, target, native)


SCORE_BLOCK = 128  # rows per block of the compiled scorer: z, cells and gates in L2 (0.3 MiB at 2 x 64, 0.8 at 2 x 200)


def score_rows(tokens: torch.Tensor, lstm: torch.nn.LSTM, head: torch.nn.Linear) -> torch.Tensor | None:
    """log pi(x) per row of a (B, W) token batch (PAD after the end; EOS counts), no dropout and no
    gradient, through the compiled scorer (gam_score_rows: each block of rows through all its steps
    in one thread's cache). None where it does not apply: not float32 on the CPU, no compiled
    kernels, or no sgemm of torch's to call; the caller then runs the step loop."""
    like = head.weight
    native = native_kernels(like)
    sgemm = lstm_native.sgemm_address() if native is not None else None
    if sgemm is None or tokens.device.type != "cpu":
        return None
    B, W = tokens.shape
    lengths, order = torch.sort((tokens != PAD).sum(dim=1), descending=True, stable=True)
    target = tokens[order].contiguous()
    steps = StepLSTM(lstm, 1)  # its weight layout; the scorer keeps its own per-thread rows
    layout = steps.compiled_layout()
    threads, (V, H), L = torch.get_num_threads(), head.weight.shape, lstm.num_layers
    scratch = like.new_empty(threads * native.gam_score_scratch(SCORE_BLOCK, L, H, StepLSTM.P, V))
    w_head, b_head = head.weight.detach().contiguous(), head.bias.detach().contiguous()
    sorted_log_prob = like.new_zeros(B)
    with lstm_native.sequential_sgemm():  # one block (a small batch) runs on the calling thread
        native.gam_score_rows(sgemm, B, W, target.data_ptr(), lengths.contiguous().data_ptr(), L, H, StepLSTM.P,
                              *(a.ctypes.data for a in layout), w_head.data_ptr(), b_head.data_ptr(), V, BOS,
                              SCORE_BLOCK, sorted_log_prob.data_ptr(), None, scratch.data_ptr(), threads)
    return like.new_empty(B).index_copy_(0, order, sorted_log_prob)


def dropout_masks(num: int, hidden: int, layers: int, p: float, like: torch.Tensor):
    """(input keep (num,) bool, [(num, hidden) masks with entries 0 or 1/(1-p), one per layer]).

    On the CPU each element is kept iff a uniform 32-bit integer falls below (1 - p) 2^32, from a
    seed drawn from torch's default generator, so torch.manual_seed still fixes them. With the
    compiled kernels (float32) the integers come from a counter-based SplitMix64 written straight
    into the float masks in one pass (gam_dropout_mask: about 10x less than numpy's bits, then a
    compare and a scale, which cost ~10% of a 2 x 64 training step); otherwise from numpy's
    PCG64 (~10x faster than torch's bernoulli_).
    """
    keep = 1.0 - p
    if like.device.type != "cpu":
        kept = torch.rand(num, device=like.device) < keep
        return kept, [torch.empty(num, hidden, dtype=like.dtype, device=like.device).bernoulli_(keep).div_(keep)
                      for _ in range(layers)]
    seed = int(torch.randint(0, 2**62, (1,)))
    native = native_kernels(like)
    if native is not None:  # disjoint counter ranges of one seed: the input's mask, then one per layer
        threshold, threads = min(round(keep * 2**32), 2**32 - 1), torch.get_num_threads()
        masks, start = [], (num + 1) // 2
        kept_scaled = like.new_empty(num)
        native.gam_dropout_mask(num, seed, 0, threshold, 1.0, kept_scaled.data_ptr(), threads)
        for _ in range(layers):
            m = like.new_empty(num, hidden)
            native.gam_dropout_mask(num * hidden, seed, start, threshold, 1.0 / keep, m.data_ptr(), threads)
            masks.append(m)
            start += (num * hidden + 1) // 2
        return kept_scaled != 0, masks
    rng = np.random.Generator(np.random.PCG64(seed))
    threshold = min(round(keep * 2**32) - 2**31, 2**31 - 1)  # int32 r < threshold  <=>  r + 2^31 < keep 2^32

    def uniform_int32(count: int) -> torch.Tensor:
        return torch.from_numpy(rng.bit_generator.random_raw((count + 1) // 2).view(np.int32)[:count])

    kept = uniform_int32(num) < threshold
    masks = []
    for _ in range(layers):
        m = like.new_empty(num, hidden)
        torch.lt(uniform_int32(num * hidden).view(num, hidden), threshold, out=m)
        masks.append(m.mul_(1.0 / keep))
    return kept, masks


def lstm_over_tokens(pk: PackedTokens, lstm: torch.nn.LSTM, dropout: float = 0.0,
                     masks: tuple[torch.Tensor, list[torch.Tensor]] | None = None) -> torch.Tensor:
    """dropout(top-layer LSTM output) at every packed position of `pk`, (N, hidden); differentiable.

    The input at each position is the one-hot of pk.prev (BOS = zero vector). With dropout > 0
    an input mask (per position: keep the symbol or zero it) and a mask on every layer's output
    are drawn, unless `masks` = (input keep (N,) bool, [(N, H) masks, 0 or 1/(1-dropout)] * layers)
    fixes them (then dropout is only used for the input's 1/(1-dropout) scale).
    """
    H, L = lstm.hidden_size, lstm.num_layers
    weights = lstm_weights(lstm)
    keep, layer_masks, in_index = None, None, pk.prev
    if masks is None and dropout > 0:
        masks = dropout_masks(pk.num, H, L, dropout, weights[0])
    if masks is not None:
        kept, layer_masks = masks[0], [m.contiguous() for m in masks[1]]  # the compiled loops read them flat
        keep = 1.0 - dropout
        in_index = pk.prev + 4 * (~kept).long()  # dropped symbols use the bias-only rows 4..7
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return _FusedLSTM.apply(pk, in_index, keep, layer_masks, H, L, *weights)
    with torch.no_grad():
        if layer_masks is not None:  # dropout without autograd (rare): the training forward
            out, saved = _forward(pk, in_index, keep, layer_masks, weights, H, L)
            for buffers in saved:
                _POOL.give(*buffers)
            return out
        steps, out = StepLSTM(lstm, pk.sizes[0]), weights[0].new_empty(pk.num, H)
        for n, a in zip(pk.sizes, pk.offsets, strict=True):  # the rows alive at a step are a prefix
            out[a : a + n] = steps.step(pk.prev[a : a + n])
        return out
