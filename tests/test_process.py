import math

import numpy as np
import pytest
import torch
from scipy import stats

from gam_rl.process import MotifProcess, kmp_automaton
from gam_rl.tokens import encode
from tests.conftest import all_bit_strings

MOTIFS = ["1", "11", "1111", "1010", "10001", "0110", "1000101", "10001011111000"]


@pytest.mark.parametrize("motif, n", [(m, n) for m in MOTIFS for n in (1, 4, 9, 14) if len(m) <= n])
def test_count_and_entropy_match_enumeration(motif, n):
    brute = sum(motif in s for s in all_bit_strings(n))
    process = MotifProcess(motif, n)
    assert process.num_strings == brute
    assert process.entropy_per_symbol == pytest.approx(math.log(brute) / (n + 1), rel=1e-12)


@pytest.mark.parametrize("motif", ["1111", "1010", "10001", "110110"])
def test_automaton_tracks_longest_matched_prefix(motif):
    delta = kmp_automaton(motif)
    rng = np.random.default_rng(0)
    for _ in range(200):
        s = "".join(rng.choice(["0", "1"], size=20))
        state = 0
        for i, b in enumerate(s):
            state = delta[state, int(b)]
            prefix = s[: i + 1]
            if motif in prefix:
                assert state == len(motif)
            else:  # longest suffix of the prefix that is a prefix of the motif
                expected = max(k for k in range(len(motif)) if prefix.endswith(motif[:k]) or k == 0)
                assert state == expected


@pytest.mark.parametrize("motif", ["1010", "10001"])
def test_log_prob_is_uniform_over_motif_strings_and_minus_inf_elsewhere(motif):
    n = 10
    process = MotifProcess(motif, n)
    strings = all_bit_strings(n)
    logp = process.log_prob(encode(strings))
    inside = torch.tensor([motif in s for s in strings])
    assert torch.all(torch.isneginf(logp[~inside]))
    assert torch.allclose(logp[inside], torch.full_like(logp[inside], -math.log(inside.sum().item())))
    assert torch.logsumexp(logp, 0).item() == pytest.approx(0.0, abs=1e-12)
    # wrong length and truncated rows are impossible under p_true
    other = encode(["1010" + "0" * 7, motif + "0" * (n - len(motif) - 1)])
    assert torch.all(torch.isneginf(process.log_prob(other)))
    no_eos = encode([motif + "0" * (n - len(motif))])[:, :n]
    assert torch.isneginf(process.log_prob(no_eos)).all()


@pytest.mark.parametrize("motif", ["1111", "1010", "10001"])
def test_sampler_is_uniform_chi_square(motif):
    n = 8
    process = MotifProcess(motif, n)
    support = [s for s in all_bit_strings(n) if motif in s]
    draws = 400 * len(support)
    samples = process.sample_strings(draws, np.random.default_rng(123))
    assert all(len(s) == n and motif in s for s in samples)
    index = {s: i for i, s in enumerate(support)}
    counts = np.bincount([index[s] for s in samples], minlength=len(support))
    p_value = stats.chisquare(counts).pvalue
    assert p_value > 1e-4, (p_value, counts.min(), counts.max())


def test_sampler_is_deterministic_for_a_seed():
    process = MotifProcess("10001011111000", 30)
    a = process.sample_strings(100, np.random.default_rng(5))
    b = process.sample_strings(100, np.random.default_rng(5))
    assert a == b and len(set(a)) > 95


@pytest.mark.parametrize("motif, n", [("10a1", 30), ("", 30), ("1" * 31, 30)])
def test_bad_motif_raises(motif, n):
    with pytest.raises(ValueError, match="motif"):
        MotifProcess(motif, n)
