"""The fused LSTM kernel (gam_rl.kernel.lstm) against nn.LSTM and a step-by-step reference.

Comparisons run in float64, where both paths agree to ~1e-15, so the 1e-10 tolerances
below are far from either rounding and from any real discrepancy (a wrong gate, mask or
time shift moves results by > 1e-3)."""

import sys

import pytest
import torch
import torch.nn.functional as F

from gam_rl.kernel import lstm as lstm_kernel
from gam_rl.kernel import native as lstm_native
from gam_rl.kernel.lstm import PackedTokens, StepLSTM, dropout_masks, lstm_over_tokens, lstm_weights, pack_tokens
from gam_rl.policy import LSTMPolicy
from gam_rl.tokens import EOS, PAD


def random_batch(rows=41, width=9, seed=0):
    """Variable lengths: a length-1 row (EOS only), full-width rows without EOS, and a trailing
    all-PAD column (the batch is wider than its longest row)."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 2, (rows, width + 1), generator=g)
    lengths = torch.randint(0, width, (rows,), generator=g)  # bits before EOS
    lengths[0] = 0
    tokens[torch.arange(rows), lengths] = EOS
    tokens[torch.arange(width + 1)[None] > lengths[:, None]] = PAD
    tokens[1, :width] = torch.randint(0, 2, (width,), generator=g)  # truncated: width bits, no EOS
    tokens[2, :width] = 1
    return tokens


def policy64(layers, hidden=6, seed=0):
    torch.manual_seed(seed)
    return LSTMPolicy(hidden, layers, dropout=0.3).double()


def log_prob_and_grads(policy, tokens, fused, weights):
    policy.fused_kernel = fused
    policy.zero_grad()
    logp = policy.log_prob(tokens)
    (logp * weights).sum().backward()
    return logp.detach(), {name: p.grad.clone() for name, p in policy.named_parameters()}


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("block", [1, 400, 2**17])  # coefficient blocks of the backward: 1 step, a few, all
def test_fused_log_prob_and_gradients_equal_nn_lstm(layers, block, monkeypatch):
    monkeypatch.setattr(lstm_kernel, "COEFFICIENT_BLOCK", block)
    policy = policy64(layers).eval()  # dropout off
    uniform = torch.randint(0, 2, (23, 9), generator=torch.Generator().manual_seed(1))
    uniform[:, -1] = EOS  # every row 8 bits + EOS (the packed layout's equal-length case)
    for tokens in (random_batch(), uniform):
        weights = torch.randn(len(tokens), dtype=torch.float64)
        ref, ref_grads = log_prob_and_grads(policy, tokens, False, weights)
        got, grads = log_prob_and_grads(policy, tokens, True, weights)
        assert torch.allclose(got, ref, rtol=0, atol=1e-10)
        assert set(grads) == set(ref_grads)
        for name, g in grads.items():
            scale = ref_grads[name].abs().max()
            assert scale > 0
            assert (g - ref_grads[name]).abs().max() <= 1e-10 * scale, name
        with torch.no_grad():  # the no-autograd path (StepLSTM)
            assert torch.allclose(policy.log_prob(tokens), ref, rtol=0, atol=1e-10)


def test_fused_float32_matches_nn_lstm():
    torch.manual_seed(1)
    policy = LSTMPolicy(16, 2, dropout=0.2).eval()
    tokens = random_batch(rows=64, width=20, seed=1)
    weights = torch.randn(len(tokens))
    ref, ref_grads = log_prob_and_grads(policy, tokens, False, weights)
    got, grads = log_prob_and_grads(policy, tokens, True, weights)
    # float32: ~1e-7 relative per operation over ~20 steps; log pi ~ -15 here
    assert torch.allclose(got, ref, rtol=0, atol=1e-4)
    for name, g in grads.items():
        assert (g - ref_grads[name]).abs().max() <= 1e-4 * ref_grads[name].abs().max(), name


def reference_lstm(lstm, pk: PackedTokens, kept, masks, keep):
    """Step by step with autograd, nn.LSTM's equations and the kernel's dropout semantics:
    one-hot input times kept / keep, every layer's output times its mask."""
    H, L = lstm.hidden_size, lstm.num_layers
    x0 = F.one_hot(pk.prev, 4)[:, :3].to(masks[0].dtype) * (kept.to(masks[0].dtype) / keep).unsqueeze(1)
    h = [x0.new_zeros(pk.sizes[0], H) for _ in range(L)]
    c = [x0.new_zeros(pk.sizes[0], H) for _ in range(L)]
    outs = []
    for n, a in zip(pk.sizes, pk.offsets, strict=True):
        inp = x0[a : a + n]
        for l in range(L):
            w_ih, w_hh, b_ih, b_hh = lstm_weights(lstm)[4 * l : 4 * l + 4]
            i, f, g, o = (inp @ w_ih.t() + b_ih + h[l][:n] @ w_hh.t() + b_hh).chunk(4, dim=1)
            c[l] = torch.sigmoid(f) * c[l][:n] + torch.sigmoid(i) * torch.tanh(g)
            h[l] = torch.sigmoid(o) * torch.tanh(c[l])
            inp = h[l] * masks[l][a : a + n]
        outs.append(inp)
    return torch.cat(outs)


@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("block", [1, 400])
def test_fused_dropout_with_fixed_masks_equals_reference(layers, block, monkeypatch):
    monkeypatch.setattr(lstm_kernel, "COEFFICIENT_BLOCK", block)
    policy = policy64(layers, seed=3)
    pk = pack_tokens(random_batch(seed=3))
    p = 0.3
    torch.manual_seed(5)
    kept, masks = dropout_masks(pk.num, policy.hidden, layers, p, policy.lstm.weight_hh_l0)
    assert (~kept).any() and kept.any()
    params = list(policy.lstm.parameters())
    out = lstm_over_tokens(pk, policy.lstm, p, masks=(kept, masks))
    up = torch.randn_like(out)
    grads = torch.autograd.grad((out * up).sum(), params)
    ref = reference_lstm(policy.lstm, pk, kept, masks, 1 - p)
    ref_grads = torch.autograd.grad((ref * up).sum(), params)
    assert torch.allclose(out, ref, rtol=0, atol=1e-10)
    for g, r in zip(grads, ref_grads, strict=True):
        assert (g - r).abs().max() <= 1e-10 * r.abs().max()
    with torch.no_grad():  # dropout without autograd takes the training forward
        assert torch.allclose(lstm_over_tokens(pk, policy.lstm, p, masks=(kept, masks)), ref, rtol=0, atol=1e-10)


def test_gradient_matches_finite_differences_with_dropout():
    """Directional derivatives <grad, v> against central differences: checks the hand-written
    backward independently of any reference implementation. (torch.autograd.gradcheck needs
    several backward passes through one graph, which the kernel refuses: see below.)"""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(3, 4, num_layers=2).double()
    pk = pack_tokens(random_batch(rows=9, width=5, seed=2))
    kept, masks = dropout_masks(pk.num, 4, 2, 0.4, lstm.weight_hh_l0)
    params = lstm_weights(lstm)
    up = torch.randn(pk.num, 4, dtype=torch.float64)

    def loss() -> torch.Tensor:
        return (lstm_over_tokens(pk, lstm, 0.4, masks=(kept, masks)) * up).sum()

    grads = torch.autograd.grad(loss(), params)
    eps = 1e-6
    for _ in range(4):
        direction = [torch.randn_like(p) for p in params]
        with torch.no_grad():
            for p, v in zip(params, direction, strict=True):
                p += eps * v
            plus = loss()
            for p, v in zip(params, direction, strict=True):
                p -= 2 * eps * v
            minus = loss()
            for p, v in zip(params, direction, strict=True):
                p += eps * v
        numeric = (plus - minus) / (2 * eps)
        analytic = sum((g * v).sum() for g, v in zip(grads, direction, strict=True))
        assert analytic.item() == pytest.approx(numeric.item(), rel=1e-6, abs=1e-8)


def test_two_graphs_alive_at_once_keep_their_buffers():
    policy = policy64(2, seed=4).train()
    a, b = random_batch(seed=4), random_batch(rows=30, seed=5)
    policy.fused_kernel = True
    torch.manual_seed(0)
    la, lb = policy.log_prob(a), policy.log_prob(b)  # two graphs before any backward
    (la.sum() + 2 * lb.sum()).backward()
    both = {n: p.grad.clone() for n, p in policy.named_parameters()}
    separate = {n: torch.zeros_like(p) for n, p in policy.named_parameters()}
    torch.manual_seed(0)
    for tokens, w in ((a, 1.0), (b, 2.0)):  # same masks: the same RNG draws in the same order
        policy.zero_grad()
        (w * policy.log_prob(tokens).sum()).backward()
        for n, p in policy.named_parameters():
            separate[n] += p.grad
    for n in both:
        assert torch.allclose(both[n], separate[n], rtol=1e-10, atol=1e-12), n


def test_backward_twice_is_refused():
    policy = LSTMPolicy(4, 2).double().train()
    policy.fused_kernel = True
    loss = policy.log_prob(random_batch()).sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


@pytest.mark.parametrize("bits", ["compiled", "numpy"])
def test_dropout_masks_are_seeded_and_scaled(bits, monkeypatch):
    if bits == "numpy":
        monkeypatch.setattr(lstm_native, "kernels", lambda: None)
    elif lstm_native.kernels() is None:
        pytest.skip("no C compiler for gam_rl.kernel.native")
    like = torch.zeros(1)
    torch.manual_seed(11)
    kept, masks = dropout_masks(4000, 50, 2, 0.2, like)
    torch.manual_seed(11)
    kept2, masks2 = dropout_masks(4000, 50, 2, 0.2, like)
    assert torch.equal(kept, kept2) and all(torch.equal(m, m2) for m, m2 in zip(masks, masks2, strict=True))
    assert not torch.equal(masks[0], masks[1])
    for m in masks:
        assert set(m.unique().tolist()) == {0.0, 1.25}
        assert (m > 0).double().mean().item() == pytest.approx(0.8, abs=0.005)  # 200000 draws: sd 0.0009
    assert kept.double().mean().item() == pytest.approx(0.8, abs=0.03)


def test_pack_tokens_layout():
    tokens = random_batch()
    pk = pack_tokens(tokens)
    lengths = (tokens != PAD).sum(1)
    assert pk.sizes == [int((lengths > t).sum()) for t in range(int(lengths.max()))]
    assert pk.num == int(lengths.sum())
    # every position's target is the token at (row, t); prev is the token before it (BOS at t = 0)
    for t, (n, a) in enumerate(zip(pk.sizes, pk.offsets, strict=True)):
        rows = pk.row[a : a + n]
        assert torch.equal(pk.target[a : a + n], tokens[rows, t])
        assert (lengths[rows] > t).all()
        if t:
            assert torch.equal(pk.prev[a : a + n], tokens[rows, t - 1])
    # shift: the same row one step earlier
    B0 = pk.sizes[0]
    assert torch.equal(pk.row[pk.shift], pk.row[B0:])
    assert torch.equal(pk.target[pk.shift], pk.prev[B0:])
    uniform = torch.randint(0, 2, (5, 4))
    uniform[:, -1] = EOS
    pu = pack_tokens(uniform)
    assert isinstance(pu.shift, slice)
    assert torch.equal(pu.row[pu.shift], pu.row[5:]) and torch.equal(pu.target[pu.shift], pu.prev[5:])


def test_empty_batch_and_no_grad_step_path():
    policy = LSTMPolicy(5, 2).eval()
    assert policy.log_prob(torch.empty(0, 1, dtype=torch.long)).shape == (0,)
    steps = StepLSTM(policy.lstm, 3)
    h = steps.step(torch.tensor([3, 3, 3]))  # BOS for every row
    assert h.shape == (3, 5) and torch.allclose(h[0], h[2])


# ---- the compiled cell (gam_rl.kernel.native) against the torch ops ------------------------------

native_only = pytest.mark.skipif(lstm_native.kernels() is None, reason="no C compiler for gam_rl.kernel.native")


@native_only
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("layer_loops", ["compiled", "python"])
def test_native_cell_forward_and_backward_equal_torch_ops(dropout, threads, layer_loops, monkeypatch):
    """float32, variable lengths, 2 layers, fixed dropout masks, 1 and 2 OpenMP threads: the compiled
    cell and its backward give the torch ops' output and gradients to float32 rounding (a wrong gate
    or a missing carry of dc moves them by > 1e-2), with the steps' loop (matmul and cell) compiled
    around torch's sgemm or run from Python."""
    if layer_loops == "compiled" and lstm_native.sgemm_address() is None:
        pytest.skip("torch exports no MKL sgemm here: the layer loops run in Python")
    if layer_loops == "python":
        monkeypatch.setattr(lstm_native, "sgemm_address", lambda: None)
    torch.manual_seed(3)
    policy = LSTMPolicy(24, 2, dropout=dropout).train()
    tokens = random_batch(rows=800, width=25, seed=3)  # early steps: n x H >= 16384, the kernels' threading threshold
    pk = pack_tokens(tokens)
    masks = dropout_masks(pk.num, 24, 2, dropout, policy.head.weight) if dropout else None
    grad_out = torch.randn(pk.num, 24)

    def run(native: bool):
        monkeypatch.setattr(lstm_native, "kernels", original if native else (lambda: None))
        policy.zero_grad()
        out = lstm_over_tokens(pk, policy.lstm, dropout, masks)
        (out * grad_out).sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.lstm.parameters()]

    original = lstm_native.kernels
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ref_out, ref_grads = run(False)
        out, grads = run(True)
    finally:
        torch.set_num_threads(previous)
    assert (out - ref_out).abs().max() <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert (g - ref).abs().max() <= 1e-4 * ref.abs().max()


@native_only
@pytest.mark.parametrize("layers, shape", [(1, "ragged"), (2, "equal"), (2, "one_step"), (3, "ragged")])
def test_compiled_layer_loops_equal_the_python_loops(layers, shape, monkeypatch):
    """The layer loops compiled around torch's sgemm against the Python loops (same compiled cell), on
    1-3 layers, ragged rows, equal rows (the slice shift) and a batch of one step (all rows EOS)."""
    if lstm_native.sgemm_address() is None:
        pytest.skip("torch exports no MKL sgemm here: the layer loops run in Python")
    torch.manual_seed(5)
    policy = LSTMPolicy(16, layers, dropout=0.2).train()
    if shape == "ragged":
        tokens = random_batch(rows=300, width=12, seed=5)
    elif shape == "equal":
        tokens = torch.randint(0, 2, (300, 12))
        tokens[:, -1] = EOS
    else:
        tokens = torch.full((300, 1), EOS)
    pk = pack_tokens(tokens)
    masks = dropout_masks(pk.num, 16, layers, 0.2, policy.head.weight)
    grad_out = torch.randn(pk.num, 16)
    compiled = lstm_native.sgemm_address

    def run(loops):
        monkeypatch.setattr(lstm_native, "sgemm_address", loops)
        policy.zero_grad()
        out = lstm_over_tokens(pk, policy.lstm, 0.2, masks)
        (out * grad_out).sum().backward()
        return out.detach(), [p.grad.clone() for p in policy.lstm.parameters()]

    ref_out, ref_grads = run(lambda: None)
    out, grads = run(compiled)
    assert (out - ref_out).abs().max() <= 1e-5
    for g, ref in zip(grads, ref_grads, strict=True):
        assert (g - ref).abs().max() <= 1e-4 * max(ref.abs().max(), 1e-6)


def test_sgemm_switch_and_lookup(monkeypatch):
    """GAM_RL_NATIVE_SGEMM=0 keeps the layer loops in Python; otherwise the lookup finds torch's sgemm_
    where torch has MKL (and caches it)."""
    monkeypatch.setattr(lstm_native, "_state", {})
    monkeypatch.setenv("GAM_RL_NATIVE_SGEMM", "0")
    assert lstm_native.sgemm_address() is None
    monkeypatch.setattr(lstm_native, "_state", {})
    monkeypatch.delenv("GAM_RL_NATIVE_SGEMM")
    found = lstm_native.sgemm_address()
    assert (found is not None) == (torch.backends.mkl.is_available() and sys.platform.startswith("linux"))
    assert lstm_native._state["sgemm"] == found


@native_only
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_native_sampler_equals_torch_ops_sampler(layers, monkeypatch):
    """Same generator, same draws: the compiled steps (every layer, the head and the book-keeping in
    one call where torch exports its sgemm; 3 layers: a middle layer with its own bias) write the
    torch path's tokens, per-symbol and total log-probabilities, and both equal teacher forcing."""
    torch.manual_seed(4)
    policy = LSTMPolicy(16, layers, dropout=0.2).eval()
    with torch.no_grad():
        policy.head.bias.copy_(torch.tensor([0.8, 0.8, -1.5]))  # lengths spread over 1..max_len
    native = policy.sample(3000, 20, torch.Generator().manual_seed(5))
    if lstm_native.sgemm_address() is not None:  # the per-step book-keeping alone, the layers through torch
        monkeypatch.setattr(lstm_native, "sgemm_address", lambda: None)
        per_step = policy.sample(3000, 20, torch.Generator().manual_seed(5))
        assert torch.equal(native.tokens, per_step.tokens)
        assert torch.allclose(native.log_prob, per_step.log_prob, atol=1e-5)
    monkeypatch.setattr(lstm_native, "kernels", lambda: None)
    torch_ops = policy.sample(3000, 20, torch.Generator().manual_seed(5))
    assert (~native.finished).any() and native.finished.any()
    assert torch.equal(native.tokens, torch_ops.tokens)
    assert torch.equal(native.finished, torch_ops.finished)
    assert torch.allclose(native.log_prob, torch_ops.log_prob, atol=1e-5)
    assert torch.allclose(native.token_log_prob, torch_ops.token_log_prob, atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(policy.log_prob(native.tokens), native.log_prob, atol=1e-4)


def test_native_falls_back_to_torch_ops_with_a_warning(monkeypatch):
    monkeypatch.delenv("GAM_RL_NATIVE", raising=False)  # the suite may run with it switched off
    monkeypatch.setattr(lstm_native, "_state", {})
    monkeypatch.setattr(lstm_native, "_compiler", lambda: None)
    with pytest.warns(UserWarning, match="no C compiler"):
        assert lstm_native.kernels() is None
    monkeypatch.setattr(lstm_native, "_state", {})
    monkeypatch.setenv("GAM_RL_NATIVE", "0")
    assert lstm_native.kernels() is None  # switched off: no warning, no build
    assert "lib" not in lstm_native._state


@native_only
def test_native_build_is_cached_per_source_and_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("GAM_RL_NATIVE_CACHE", str(tmp_path))
    first = lstm_native._build(lstm_native._compiler())
    stamp = first.stat().st_mtime_ns
    assert first.parent == tmp_path and lstm_native._build(lstm_native._compiler()) == first
    assert first.stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temporary files left


def test_native_source_ships_next_to_its_builder():
    assert lstm_native.SOURCE.parent.name == "kernel" and lstm_native.SOURCE.is_file()


@pytest.mark.skipif(lstm_native._compiler() is None, reason="no C compiler")
def test_native_cache_key_follows_the_source_content_not_its_path(tmp_path, monkeypatch):
    """A moved copy of the same source reuses the build; an edited source (a comment) never does."""
    monkeypatch.setenv("GAM_RL_NATIVE_CACHE", str(tmp_path / "cache"))
    cc = lstm_native._compiler()
    here = lstm_native._target(cc)
    moved = tmp_path / "elsewhere" / "lstm_cell.c"
    moved.parent.mkdir()
    moved.write_text(lstm_native.SOURCE.read_text())
    monkeypatch.setattr(lstm_native, "SOURCE", moved)
    assert lstm_native._target(cc) == here
    moved.write_text(moved.read_text() + "/* edited */\n")
    assert lstm_native._target(cc) != here


@native_only
def test_compiled_exp_gives_the_cell_to_float_rounding():
    """The cell's inline exp (Cody-Waite reduction, degree-5 polynomial) against float64 sigmoid and
    tanh over pre-activations in [-100, 100], clamp included: c' and h' within 1e-6 (a wrong
    reduction or polynomial coefficient is off by > 1e-4 somewhere in the range)."""
    H, n = 64, 4001
    shuffle = torch.randperm(n, generator=torch.Generator().manual_seed(1))  # each row a spread of values
    pre = torch.linspace(-100, 100, n * 4 * H).view(n, 4 * H)[shuffle].contiguous()
    c_prev = torch.linspace(-3, 3, n * H).view(n, H).contiguous()
    cell, h = torch.empty(n, H), torch.empty(n, H)
    lstm_native.kernels().gam_cell_forward(n, H, pre.data_ptr(), 4 * H, c_prev.data_ptr(), cell.data_ptr(),
                                          h.data_ptr(), H, None, None, 1)
    a = pre.double()
    i, f, o = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H : 2 * H]), torch.sigmoid(a[:, 3 * H :])
    g = 2 * torch.sigmoid(a[:, 2 * H : 3 * H]) - 1  # the g rows arrive doubled: tanh(a_g) = 2 sigma(2 a_g) - 1
    c = f * c_prev.double() + i * g
    assert (cell.double() - c).abs().max() <= 1e-6
    assert (h.double() - o * torch.tanh(c)).abs().max() <= 1e-6


@native_only
def test_compiled_dropout_bits_are_independent_within_and_across_masks():
    """SplitMix64's two halves, neighbouring counters and the masks that share a seed: the kept
    fraction, the pairwise kept-together rate of neighbours (keep^2 if independent) and the overlap
    of two layers' masks, on 2M draws (sd about 3e-4); an odd count fills its last element."""
    torch.manual_seed(7)
    kept, masks = dropout_masks(1001, 999, 2, 0.5, torch.zeros(1))  # odd sizes: the tail element
    a, b = (masks[0] > 0).double(), (masks[1] > 0).double()
    for m in (a, b):
        flat = m.flatten()
        assert flat.mean().item() == pytest.approx(0.5, abs=0.002)
        assert (flat[1:] * flat[:-1]).mean().item() == pytest.approx(0.25, abs=0.002)  # halves and neighbours
        assert (flat[2:] * flat[:-2]).mean().item() == pytest.approx(0.25, abs=0.002)
    assert (a * b).mean().item() == pytest.approx(0.25, abs=0.002)  # the layers' masks do not repeat
    assert kept.double().mean().item() == pytest.approx(0.5, abs=0.06)
    assert masks[0][-1, -1].item() in (0.0, 2.0) and masks[1].flatten()[-3:].abs().sum() > 0


@native_only
def test_compiled_head_log_prob_and_gradients_equal_torch_ops(monkeypatch):
    """log softmax(head(out))[target] and its gradients on out, W and b: the compiled head against
    torch's ops, to float32 rounding (a wrong sign or a missing softmax term is off by > 1e-2)."""
    torch.manual_seed(9)
    out = (3 * torch.randn(5000, 24)).requires_grad_()
    head = torch.nn.Linear(24, 3)
    target = torch.randint(0, 3, (5000,))
    weight = torch.randn(5000)

    def run(native: bool):
        if not native:
            monkeypatch.setattr(lstm_native, "kernels", lambda: None)
        out.grad = None
        head.zero_grad()
        picked = lstm_kernel.head_log_prob(out, head, target)
        (picked * weight).sum().backward()
        return [picked.detach(), out.grad.clone(), head.weight.grad.clone(), head.bias.grad.clone()]

    compiled, reference = run(True), run(False)
    for got, ref in zip(compiled, reference, strict=True):
        assert (got - ref).abs().max() <= 1e-5 * max(1.0, ref.abs().max())


@native_only
@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("threads", [1, 2])
def test_compiled_scorer_equals_teacher_forcing(layers, threads, monkeypatch):
    """log_prob without gradient or dropout goes through the compiled scorer (blocks of rows through
    all their steps, one thread each): equal to the differentiable path and to the step loop, on
    ragged rows over several blocks (lengths 1 to width, rows without EOS, an all-PAD row, a batch
    wider than its longest row), to float32 rounding."""
    if lstm_native.sgemm_address() is None:
        pytest.skip("torch exports no MKL sgemm here: no compiled scorer")
    torch.manual_seed(6)
    policy = LSTMPolicy(16, layers, dropout=0.2).eval()
    tokens = random_batch(rows=3 * lstm_kernel.SCORE_BLOCK + 17, width=14, seed=6)
    tokens[5] = PAD
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            compiled = policy.log_prob(tokens)
        differentiable = policy.log_prob(tokens).detach()  # grad enabled: the fused autograd path
        monkeypatch.setattr("gam_rl.policy.score_rows", lambda *args: None)
        with torch.no_grad():
            step_loop = policy.log_prob(tokens)
    finally:
        torch.set_num_threads(previous)
    assert compiled[5] == 0.0
    assert (compiled - differentiable).abs().max() <= 2e-5
    assert (compiled - step_loop).abs().max() <= 2e-5
    assert lstm_kernel.score_rows(tokens, policy.lstm, policy.head) is not None  # the path did run


def test_row_chunks_depend_on_the_size_alone():
    """The compiled loops' chunk grid: a power of two of >= CHUNK_ROWS rows each, at most MAX_CHUNKS and
    CHUNK_FLOATS floats of partial sums; no thread count enters it."""
    assert [lstm_kernel.row_chunks(rows) for rows in (1, 127, 128, 255, 256, 500, 10**6)] == [1, 1, 2, 2, 4, 4, 16]
    assert lstm_kernel.row_chunks(5000, 400 * 800) == 2  # 2 x 200's dW: 2 x 1.28 MB of partial sums
    assert lstm_kernel.row_chunks(4746, rows_per_chunk=65536 // 64) == 4  # the head at 64 hidden
    assert lstm_kernel.row_chunks(5000, lstm_kernel.CHUNK_FLOATS) == 1


@native_only
@pytest.mark.parametrize("layer_loops", ["compiled", "python"])
def test_gradients_are_bit_identical_at_any_thread_count(layer_loops, monkeypatch):
    """The kernels' sums over rows (dW, the biases, layer 0's table, the head's dW and db) are taken
    over a fixed grid of row chunks, added in chunk order: log pi and every gradient are the same bits
    at 1, 2 and 3 threads (issue 31 item 9: the per-thread sums had made r's training stop elsewhere).
    The sizes open every parallel region: 300 rows x 64 hidden (4 chunks, shared unevenly by 3 threads)
    and 4,700 head rows (4 chunks).
    The Python layer loops (no sgemm of torch's to call) take W_ih and W_hh's gradients from torch's
    matmuls over all positions, which MKL splits by thread count: there only the rest is checked."""
    if layer_loops == "compiled" and lstm_native.sgemm_address() is None:
        pytest.skip("torch exports no MKL sgemm here: no compiled layer loops")
    if layer_loops == "python":
        monkeypatch.setattr(lstm_native, "sgemm_address", lambda: None)
    torch.manual_seed(7)
    policy = LSTMPolicy(64, 2, dropout=0.2).train()
    tokens = random_batch(rows=300, width=30, seed=7)
    weights = torch.randn(len(tokens))

    def run(threads):
        torch.set_num_threads(threads)
        torch.manual_seed(8)  # the same dropout masks
        policy.zero_grad()
        logp = policy.log_prob(tokens)
        (logp * weights).sum().backward()
        return logp.detach(), {name: p.grad.clone() for name, p in policy.named_parameters()}

    previous = torch.get_num_threads()
    try:
        ref, ref_grads = run(1)
        for threads in (2, 3):
            got, grads = run(threads)
            assert torch.equal(got, ref), threads
            for name, g in grads.items():
                if layer_loops == "python" and name.startswith(("lstm.weight_ih", "lstm.weight_hh")):
                    continue
                assert torch.equal(g, ref_grads[name]), (threads, name)
    finally:
        torch.set_num_threads(previous)
