"""SMC (gam_rl/smc.py) against exact answers on an enumerable problem (max_len 6: 127 outputs).

Every test runs many independent runs of a few particles as one batch (smc_runs) with fixed
generators. The exact side: Z and p by enumeration, the prefix sums Z(s) = sum of P over the
outputs that extend s (and r(s) the same way), the optimal twist V*(s) = log Z(s) - log r(s)
and the optimal proposal q*(a | s) = Z(s a) / Z(s) (Z(s EOS) = P(s EOS)), as tables."""

import copy
import math

import pytest
import torch

from gam_rl.exact import ExactTarget, OutputSpace
from gam_rl.features import Features
from gam_rl.policy import LSTMPolicy
from gam_rl.potentials import gam, tilt_of
from gam_rl.smc import (
    LogZBounds,
    log_z_bounds,
    multinomial_resample,
    smc,
    smc_runs,
    systematic_resample,
)
from gam_rl.tokens import EOS, ONE, PAD, VOCAB, bit_lengths
from tests.exact import all_outputs

MAX_LEN = 6
RUNS, K = 2000, 8


def prefix_sums(log_unnorm: torch.Tensor, max_len: int) -> list[torch.Tensor]:
    """sums[k][v] = log of the sum over the outputs that extend the k-bit prefix with value v (output_batches'
    order: the m-bit outputs from index 2^m - 1, the truncated max_len-bit ones last), bottom-up."""
    sums = [None] * (max_len + 1)
    sums[max_len] = log_unnorm[2**max_len - 1 :]
    for k in range(max_len - 1, -1, -1):
        children = torch.logaddexp(sums[k + 1][0::2], sums[k + 1][1::2])
        sums[k] = torch.logaddexp(log_unnorm[2**k - 1 : 2 ** (k + 1) - 1], children)
    return sums


class Exact:
    """The enumerated problem: log P of every output, log Z, and the prefix tables."""

    def __init__(self, target, r: LSTMPolicy, max_len: int = MAX_LEN):
        space = OutputSpace(max_len)
        self.exact = ExactTarget.of(target, space, "cpu")
        self.log_unnorm = self.exact.log_p + self.exact.log_z
        self.log_z, self.max_len = self.exact.log_z, max_len
        self.outputs = all_outputs(max_len)
        self.z_sums = prefix_sums(self.log_unnorm, max_len)
        self.r_sums = prefix_sums(space.log_prob(r), max_len)  # log r(s): r sums to 1 over the extensions of s
        self.values = [z - lr for z, lr in zip(self.z_sums, self.r_sums, strict=True)]  # V*(s) per depth

    def twist(self, values: list[torch.Tensor] | None = None):
        """tokens (B, T) -> V(s_t) (B, T), s_t = tokens[:, :t] (0 where s_t is not a prefix of bits)."""
        values = self.values if values is None else values

        def v(tokens: torch.Tensor) -> torch.Tensor:
            B, T = tokens.shape
            out = torch.zeros(B, T, dtype=torch.float64)
            code = torch.zeros(B, dtype=torch.long)
            bits_so_far = torch.ones(B, dtype=torch.bool)
            for t in range(min(T, self.max_len + 1)):
                here = bits_so_far & (tokens[:, t] != PAD)
                out[here, t] = values[t][code[here]]
                bits_so_far &= tokens[:, t] <= ONE
                code = 2 * code + tokens[:, t].clamp(max=1)
            return out

        return v

    def sample(self, num: int, seed: int) -> torch.Tensor:
        """num exact samples of p = P / Z by enumeration."""
        g = torch.Generator().manual_seed(seed)
        return self.outputs[torch.multinomial(self.exact.log_p.exp(), num, replacement=True, generator=g)]


class TableSteps:
    """The optimal proposal q*(a | s) = Z(s a) / Z(s) from the prefix tables, as smc's Steps."""

    def __init__(self, exact: Exact, num: int):
        self.e, self.code, self.depth = exact, torch.zeros(num, dtype=torch.long), torch.zeros(num, dtype=torch.long)

    def log_probs(self, prev: torch.Tensor) -> torch.Tensor:
        n = len(prev)
        code, depth = self.code[:n], self.depth[:n]
        bit = prev <= ONE
        code[bit] = 2 * code[bit] + prev[bit]
        depth[bit] += 1
        out = torch.empty(n, VOCAB, dtype=torch.float64)
        for k in depth.unique().tolist():
            at = depth == k
            c = code[at]
            z_s = self.e.z_sums[k][c]
            out[at, EOS] = self.e.log_unnorm[2**k - 1 + c] - z_s  # P(s EOS) / Z(s)
            for b in (0, 1):
                out[at, b] = self.e.z_sums[k + 1][2 * c + b] - z_s
        return out

    def keep(self, index: torch.Tensor) -> None:
        m = len(index)
        self.code[:m], self.depth[:m] = self.code[index].clone(), self.depth[index].clone()


class OptimalProposal:
    def __init__(self, exact: Exact):
        self.exact = exact

    def steps(self, num: int) -> TableSteps:
        return TableSteps(self.exact, num)


def make_problem(lam, seed: int = 3):
    torch.manual_seed(seed)
    r = LSTMPolicy(12, 1, dropout=0.0).eval()
    features = Features(["motif", "first_bit", "M"], "101", max_len=MAX_LEN)
    target = gam(r, features, torch.tensor(lam))
    return r, target, Exact(target, r)


@pytest.fixture(scope="module")
def problem():
    return make_problem([-2.0, 0.7, 1.5])


def perturbed(r: LSTMPolicy, scale: float = 0.4, seed: int = 11) -> LSTMPolicy:
    pi = copy.deepcopy(r)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pi.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return pi


def mean_se(x: torch.Tensor) -> tuple[float, float]:
    return float(x.mean()), float(x.std()) / math.sqrt(len(x))


@pytest.mark.parametrize("threshold", [0.5, 1.0])
@pytest.mark.parametrize("case", ["r", "pi", "pi_rescored", "exact_twist", "random_twist"])
def test_z_hat_is_unbiased(problem, case, threshold):
    """E[Z-hat] = Z for any proposal and twist: the mean of 2000 runs' Z-hat within 3 s.e. of the exact Z,
    with resampling at ESS < K/2 and at every uneven step; mean W is Z-hat in every run. pi_rescored: P
    scored from scratch (a copy of r times the tilt, so log P - log r is not lambda . phi but the difference
    with r's per-step log-probabilities that the particles carried through their resamplings), and
    multinomial resampling (ancestors in any order: the LSTM states must follow them)."""
    r, target, exact = problem
    proposal = perturbed(r) if case.startswith("pi") else r
    resampling = "multinomial" if case == "pi_rescored" else "systematic"
    if case == "pi_rescored":
        target = copy.deepcopy(r) * tilt_of(target)
    g = torch.Generator().manual_seed(0)
    random_values = [torch.randn(2**k, generator=g, dtype=torch.float64) for k in range(MAX_LEN + 1)]
    twist = {"exact_twist": exact.twist(), "random_twist": exact.twist(random_values)}.get(case)
    out = smc_runs(target, proposal, r, K, MAX_LEN, RUNS, twist=twist, ess_threshold=threshold,
                   generator=torch.Generator().manual_seed(1), resampling=resampling)
    z, se = mean_se(out.log_z.exp())
    assert abs(z - math.exp(exact.log_z)) < 3 * se, (case, threshold, z, se, math.exp(exact.log_z))
    assert float(out.resamples.float().mean()) > (1.0 if threshold == 1.0 else 0.01), case
    assert torch.allclose(out.log_z, torch.logsumexp(out.log_weights, 1) - math.log(K))
    assert out.tokens.shape[:2] == (RUNS, K) and out.tokens.shape[2] <= MAX_LEN
    # each particle carries its own log q(x) and log r(x) through the resamplings (its LSTM states moved
    # with it): Z-hat would stay unbiased with mixed-up states (a different proposal), only worse
    tokens = out.tokens.reshape(RUNS * K, -1)
    with torch.no_grad():
        assert torch.allclose(out.log_r.reshape(-1), r.log_prob(tokens).double(), atol=1e-4)
        assert torch.allclose(out.log_q.reshape(-1), proposal.log_prob(tokens).double(), atol=1e-4)


def test_the_optimal_twist_and_proposal_give_z_exactly(problem):
    """V = V* and q = q* = p's conditionals: every incremental weight is 1, so each particle's weight is
    gamma_0 = exp V*(empty) = Z throughout, ESS = K, no resampling and log Z-hat = log Z in every run.
    An off-by-one in the twist's positions breaks it."""
    r, target, exact = problem
    out = smc_runs(target, OptimalProposal(exact), r, K, MAX_LEN, 200, twist=exact.twist(), ess_threshold=0.99,
                   generator=torch.Generator().manual_seed(2))
    assert float((out.log_weights - exact.log_z).abs().max()) < 1e-4
    assert float(out.log_z.std()) < 1e-5 and int(out.resamples.sum()) == 0
    assert float(out.min_ess.min()) > 0.999


@pytest.fixture(scope="module")
def hard_problem():
    """A stronger tilt: r's draws rarely carry the weight, log Z-hat of 4 particles is far from log Z."""
    return make_problem([-4.0, 2.0, 4.0])


def test_the_exact_twist_tightens_the_lower_bound(hard_problem):
    """With proposal r, the exact twist steers resampling by the value of each prefix: log Z-hat's spread,
    and its Jensen gap log Z - E[log Z-hat] (what the lower bound loses), well below untwisted SMC's at the
    same K (both unbiased: test_z_hat_is_unbiased). Not zero: the one-step weights exp(V*(s x) - V*(s)),
    x ~ r, still vary (only q* removes that: test_the_optimal_twist_and_proposal_give_z_exactly)."""
    r, target, exact = hard_problem
    spread, gap = {}, {}
    for name, twist in (("none", None), ("exact", exact.twist())):
        out = smc_runs(target, r, r, K, MAX_LEN, 1000, twist=twist, ess_threshold=1.0,
                       generator=torch.Generator().manual_seed(4))
        spread[name], gap[name] = float(out.log_z.std()), exact.log_z - float(out.log_z.mean())
    assert spread["exact"] < 0.75 * spread["none"] and 0 < gap["exact"] < 0.5 * gap["none"], (spread, gap)


def test_bounds_sandwich_log_z(hard_problem):
    """E[log Z-hat] <= log Z <= E[log Z-hat of conditional SMC held on exact samples of p], each side clearly
    apart from log Z where the variance is large; E[1 / Z-hat] = 1 / Z under conditional SMC (its exact
    identity); with the optimal twist and proposal both bounds are log Z."""
    r, target, exact = hard_problem
    runs = 2000
    refs = exact.sample(runs, seed=5)
    g = torch.Generator().manual_seed(6)
    bounds = log_z_bounds(target, r, r, 4, MAX_LEN, runs, exact_samples=refs, generator=g)
    assert isinstance(bounds, LogZBounds) and bounds.runs == runs and bounds.particles == 4
    assert bounds.lower + 3 * bounds.lower_se < exact.log_z < bounds.upper - 3 * bounds.upper_se, (bounds, exact.log_z)
    assert abs(bounds.log_z - exact.log_z) < 0.1  # the pooled unbiased estimate
    # conditional SMC: Z / Z-hat is the extended target's density ratio, so E[1 / Z-hat] = 1 / Z
    csmc = smc_runs(target, r, r, 4, MAX_LEN, runs, reference=refs, generator=g)
    inv, se = mean_se((-csmc.log_z).exp())
    assert abs(inv - math.exp(-exact.log_z)) < 3 * se, (inv, se, math.exp(-exact.log_z))
    assert torch.equal(csmc.tokens[:, 0, : refs.shape[1]], refs[:, : csmc.tokens.shape[2]])  # particle 0 is kept
    best = log_z_bounds(target, OptimalProposal(exact), r, 4, MAX_LEN, 50, twist=exact.twist(),
                        exact_samples=refs[:50], generator=g)
    assert abs(best.lower - exact.log_z) < 1e-4 and abs(best.upper - exact.log_z) < 1e-4


def test_a_lower_bound_without_exact_samples(problem):
    r, target, exact = problem
    bounds = log_z_bounds(target, r, r, K, MAX_LEN, 100, generator=torch.Generator().manual_seed(7),
                          max_batch_particles=3 * K)  # 34 batches of at most 3 runs
    assert bounds.upper is None and bounds.upper_se is None
    assert bounds.lower - 3 * bounds.lower_se < exact.log_z


def test_systematic_resampling_offspring_counts():
    """Particle i gets floor or ceil of K Wbar_i copies (|count - K Wbar_i| < 1), K Wbar_i on average."""
    g = torch.Generator().manual_seed(8)
    R, k = 4000, 7
    log_w = torch.randn(1, k, generator=g, dtype=torch.float64).mul(1.5).expand(R, k)
    a = systematic_resample(log_w, g)
    counts = torch.zeros(R, k, dtype=torch.float64).scatter_add_(1, a, torch.ones(R, k, dtype=torch.float64))
    expected = k * torch.softmax(log_w[0], 0)
    assert float((counts - expected).abs().max()) < 1.0
    assert torch.allclose(counts.mean(0), expected, atol=0.03)
    assert not torch.equal(counts.min(0).values, counts.max(0).values)  # random, not a fixed rounding
    # multinomial: the same expectation, counts anywhere; conditional: ancestor 0 is 0
    m = multinomial_resample(log_w, g)
    m_counts = torch.zeros(R, k, dtype=torch.float64).scatter_add_(1, m, torch.ones(R, k, dtype=torch.float64))
    assert torch.allclose(m_counts.mean(0), expected, atol=0.06) and float((m_counts - expected).abs().max()) > 1
    c = multinomial_resample(log_w, g, conditional=True)
    assert bool((c[:, 0] == 0).all()) and c.shape == (R, k)


def test_ess_triggers_resampling_and_threshold_zero_never_does(problem):
    r, target, exact = problem
    pi = perturbed(r, scale=1.0)  # a poor proposal: uneven weights from the first symbols
    counts = {}
    for threshold in (0.0, 0.3, 1.0):
        out = smc_runs(target, pi, r, K, MAX_LEN, 300, ess_threshold=threshold,
                       generator=torch.Generator().manual_seed(9))
        counts[threshold] = int(out.resamples.sum())
        resampled = out.resamples > 0
        assert bool((out.min_ess[resampled] < threshold).all())  # a run resamples only below the threshold
        assert bool((out.min_ess > 0).all() & (out.min_ess <= 1 + 1e-9).all())
    assert counts[0.0] == 0 and 0 < counts[0.3] < counts[1.0], counts
    one = smc(target, pi, r, K, MAX_LEN, ess_threshold=1.0, generator=torch.Generator().manual_seed(10))
    assert one.resamples > 0 and one.min_ess < 1.0 and one.proposals >= K


def test_weighted_particles_give_the_moments_of_p(problem):
    """(1/K) sum_i W_i f(x_i) is unbiased for sum_x P(x) f(x) (f = the bit count, and f = 1); one run of
    4000 particles, self-normalised, gives E_p[length] within 4 of its delta-method s.e."""
    r, target, exact = problem
    lengths_all = bit_lengths(exact.outputs).double()
    truth = float((exact.exact.log_p.exp() * lengths_all).sum())
    out = smc_runs(target, r, r, K, MAX_LEN, RUNS, generator=torch.Generator().manual_seed(11))
    lengths = bit_lengths(out.tokens.reshape(RUNS * K, -1)).double().view(RUNS, K)
    per_run = (out.log_weights.exp() * lengths).mean(1)
    m, se = mean_se(per_run)
    assert abs(m - truth * math.exp(exact.log_z)) < 3 * se, (m, se, truth * math.exp(exact.log_z))
    big = smc(target, r, r, 4000, MAX_LEN, generator=torch.Generator().manual_seed(12))
    w = torch.softmax(big.log_weights, 0)
    f = bit_lengths(big.tokens).double()
    est = float((w * f).sum())
    se = float(torch.sqrt((w**2 * (f - est) ** 2).sum()))
    assert abs(est - truth) < 4 * se, (est, se, truth)
    assert big.tokens.shape[0] == 4000 and (big.tokens[:, 0] != PAD).all()


def test_a_bad_reference_is_refused(problem):
    r, target, _ = problem
    with pytest.raises(ValueError, match="not an output"):
        smc(target, r, r, K, MAX_LEN, reference=torch.tensor([[0, 1, PAD, EOS]]))
    with pytest.raises(ValueError, match="more than max_len"):
        smc(target, r, r, K, MAX_LEN, reference=torch.ones(1, MAX_LEN + 1, dtype=torch.long))
    truncated = smc(target, r, r, K, MAX_LEN, reference=torch.ones(1, MAX_LEN, dtype=torch.long),
                    generator=torch.Generator().manual_seed(13))
    assert truncated.tokens[0].tolist() == [ONE] * MAX_LEN



def test_the_z_stage_by_smc_estimates_log_z_its_moments_and_bounds(hard_problem):
    """z.estimator=smc through the Z stage: log Z-hat within 4 of its s.e. of the exact log Z, the moments of p
    from the weighted particles, and z.bounds around the exact log Z (each within 3 of its s.e.)."""
    from gam_rl.exact import exact_results
    from gam_rl.stages.partition import ZConfig, estimate_partition

    r, target, exact = hard_problem
    features = target.factors[1].features
    phi = OutputSpace(MAX_LEN).score(features).double()  # (outputs, features)
    moments = (exact.exact.log_p.exp().unsqueeze(1) * phi).sum(0)
    test = exact.sample(200, seed=8)
    cfg = ZConfig(samples=40000, batch_size=8000, estimator="smc", particles=8, bounds=True, bound_runs=400)
    part = estimate_partition(r, target, features, moments.tolist(), test, test, cfg, max_len=MAX_LEN,
                              symbols_per_seq=4, seed=9)
    assert part.z_estimator == "smc" and part.z_samples == 40000
    assert abs(part.log_z_hat - exact.log_z) < 4 * part.z_rel_se, (part.log_z_hat, part.z_rel_se, exact.log_z)
    assert part.moment_mismatch_l1 < 0.05  # SNIS of the particles by their weights
    out = exact_results(exact.exact, r, None, target.log_potential(test), 4, part.results())
    assert out["log_z_hat_error"] == pytest.approx(part.log_z_hat - exact.log_z)
    assert out["log_z_lower_gap_se"] > -3 and out["log_z_upper_gap_se"] > -3, out
    assert part.log_z_lower < part.log_z_upper


@pytest.mark.parametrize("values", ["critic", "ctl"])
def test_a_saved_twist_one_symbol_at_a_time_gives_the_same_runs_as_on_each_prefix(problem, tmp_path, values):
    """smc_runs reads a run's LearnedTwist through its steps (O(1) per symbol); the same generator through the
    twist called on each prefix (its steps hidden) gives the same particles and Z-hats, resamplings included;
    and Z-hat stays unbiased (2000 runs, within 3 s.e. of the exact Z)."""
    from gam_rl.methods.saved_twist import load_twist
    from gam_rl.methods.twist_loop import Critic, twist_payload

    r, target, exact = problem
    pi = perturbed(r, 0.3, seed=5)
    critic = None
    if values == "critic":
        critic = Critic("separate", pi, r)
        with torch.no_grad():
            critic.value.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(2))
            critic.value.bias.fill_(-0.5)
    torch.save(twist_payload("x", values, pi, critic), tmp_path / "twist.pt")
    twist = load_twist(tmp_path, r)
    stepped = smc_runs(target, pi, r, K, MAX_LEN, RUNS, twist=twist, ess_threshold=1.0,
                       generator=torch.Generator().manual_seed(4))
    whole = smc_runs(target, pi, r, K, MAX_LEN, RUNS, twist=lambda tokens: twist(tokens), ess_threshold=1.0,
                     generator=torch.Generator().manual_seed(4))
    assert float(stepped.resamples.float().mean()) > 1.0  # resampled at most uneven steps
    assert torch.equal(stepped.tokens, whole.tokens) and torch.equal(stepped.resamples, whole.resamples)
    assert torch.allclose(stepped.log_z, whole.log_z, atol=1e-5)
    z, se = mean_se(stepped.log_z.exp())
    assert abs(z - math.exp(exact.log_z)) < 3 * se, (z, se, math.exp(exact.log_z))
