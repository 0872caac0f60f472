import numpy as np
import pytest
import torch

from gam_rl.features import FeatureMaskError, Features, parse_mask
from gam_rl.tokens import encode

MOTIF = "10001011111000"


def slow_features(s: str, mask: str, motif: str, max_len: int = 100) -> list[float]:
    """Obviously-correct reference on Python strings (paper.md section 3)."""
    L = len(motif)
    letters, digits = mask[:-7], mask[-7:]
    patterns = [motif, motif + "0", motif[: L // 2], None,
                ("10101" * 10)[:L], ("1001001" * 10)[: L + 2], ("00110011" * 10)[: L // 2]]
    out = []
    for letter in letters:
        out.append(len(s) / max_len if letter == "M" else (len(s) / max_len) ** 2)
    for on, pattern in zip(digits, patterns, strict=True):
        if on == "1":
            out.append(float(not s.startswith("1")) if pattern is None else float(pattern not in s))
    return out


def random_strings(rng, count, motif):
    out = []
    for i in range(count):
        length = int(rng.integers(0, 45))
        s = "".join(rng.choice(["0", "1"], size=length))
        if i % 3 == 0 and length >= len(motif):  # plant patterns so both values occur
            at = int(rng.integers(0, length - len(motif) + 1))
            s = s[:at] + motif + s[at + len(motif):]
        out.append(s)
    return out + ["", "1", "0", motif, motif + "0", "1010110101101010"]


@pytest.mark.parametrize("mask", ["1001111", "Mv1001111", "0111111", "1111111", "vM0000001", "M1000000"])
@pytest.mark.parametrize("motif", [MOTIF, "1011100111001", "10001"])
def test_features_match_slow_reference_on_padded_batches(mask, motif):
    rng = np.random.default_rng(1)
    strings = random_strings(rng, 300, motif)
    phi = Features(mask, motif)(encode(strings))  # rows padded to the longest string
    expected = torch.tensor([slow_features(s, mask, motif) for s in strings], dtype=torch.float32)
    assert phi.shape == expected.shape
    assert torch.allclose(phi, expected, atol=1e-7)


def test_features_ignore_padding_width_and_truncation():
    f = Features("Mv1001111", MOTIF)
    x = encode(["1000101111100", "1"])
    wide = torch.cat([x, torch.full((2, 20), 3)], dim=1)
    assert torch.equal(f(x), f(wide))
    truncated = encode([MOTIF])[:, : len(MOTIF)]  # no EOS: hit the length limit
    assert f(truncated)[0, 2].item() == 0.0  # motif present -> feature 0


def test_mask_names_and_order():
    assert [s.name for s in parse_mask("Mv1001111", MOTIF)] == [
        "M", "v", "motif", "first_bit", "distractor_10101", "distractor_1001001", "distractor_00110011"]


@pytest.mark.parametrize("mask, fragment", [
    ("", "non-empty"), ("100111", "7 positional"), ("Xv1001111", "unknown feature letter"),
    ("10011a1", "must be 0/1"), ("MM1001111", "repeated"), ("0000000", "selects no feature"),
])
def test_bad_masks_raise_clear_errors(mask, fragment):
    with pytest.raises(FeatureMaskError, match=fragment):
        parse_mask(mask, MOTIF)


# ---- patterns.occurs: window codes against plain Python substring search ---------------------------

from gam_rl import patterns  # noqa: E402
from gam_rl.patterns import occurs, occurs_all  # noqa: E402
from gam_rl.tokens import EOS, PAD  # noqa: E402


def row_string(row: list[int]) -> str:
    """A token row as text: bits as 0/1, every other value as 'x' (never part of a match)."""
    return "".join(str(t) if t in (0, 1) else "x" for t in row)


def reference_occurs(tokens: torch.Tensor, pattern: str) -> list[bool]:
    return [pattern in row_string(row) for row in tokens.tolist()]


def random_patterns(rng, strings: list[str], lengths) -> list[str]:
    """Random bit patterns, and substrings of the strings (so that long patterns also occur)."""
    out = []
    for m in lengths:
        out.append("".join(rng.choice(["0", "1"], size=m)))
        long_enough = [s for s in strings if len(s) >= m]
        if long_enough:
            s = long_enough[int(rng.integers(len(long_enough)))]
            at = int(rng.integers(0, len(s) - m + 1))
            out.append(s[at : at + m])
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_occurs_matches_python_substring_on_random_variable_length_batches(seed):
    rng = np.random.default_rng(seed)
    strings = ["".join(rng.choice(["0", "1"], size=int(rng.integers(0, 80)), p=[0.3, 0.7] if seed else None))
               for _ in range(300)] + ["", "0", "1", "1" * 70, "0" * 31 + "1" * 32]
    tokens = encode(strings)
    lengths = list(range(1, 20)) + [29, 30, 31, 32, 33, 45, 61, 62, 63, 64, 65, 79, 80, 81, 200]
    checked = 0
    for pattern in random_patterns(rng, strings, lengths) + ["", "1" * 31, "1" * 32, "0" * 31 + "1"]:
        expected = [pattern in s for s in strings]
        assert occurs(tokens, pattern).tolist() == expected, (len(pattern), pattern)
        checked += any(expected)
    assert checked > 30  # many patterns occur somewhere, so matches are tested, not only misses


def test_occurs_all_matches_occurs_and_shares_codes_across_chunks(monkeypatch):
    rng = np.random.default_rng(5)
    strings = ["".join(rng.choice(["0", "1"], size=int(rng.integers(0, 40)))) for _ in range(203)]
    tokens = encode(strings)
    pats = random_patterns(rng, strings, [1, 3, 7, 14, 15, 16, 31, 32, 39, 40, 41])
    expected = torch.tensor([[p in s for p in pats] for s in strings], dtype=torch.bool).reshape(len(strings), -1)
    assert torch.equal(occurs_all(tokens, pats), expected)
    monkeypatch.setattr(patterns, "CPU_CHUNK_ROWS", 7)  # chunk boundaries inside the batch
    assert torch.equal(occurs_all(tokens, pats), expected)
    assert [occurs(tokens, p).tolist() for p in pats] == expected.t().tolist()


def test_occurs_never_matches_eos_pad_or_other_values_anywhere():
    rng = np.random.default_rng(7)
    odd = [EOS, PAD, -1, 4, 7, 255, 256, 2**31, 2**31 + 1, 2**32, 2**32 + 1, 2**40 + 1, -(2**31), -(2**40)]
    values = [0, 1, 0, 1, 0, 1] + odd  # mostly bits, non-bit values anywhere (also mid-row)
    tokens = torch.tensor(rng.choice(values, size=(400, 50)), dtype=torch.long)
    tokens[:50, 20:] = PAD
    tokens[50:100, :] = torch.tensor(rng.integers(0, 2, size=(50, 50)))  # all bits, no EOS (truncated)
    for pattern in random_patterns(rng, [row_string(r) for r in tokens[50:100].tolist()],
                                   [1, 2, 3, 5, 8, 13, 31, 32, 40, 50, 51]):
        assert occurs(tokens, pattern).tolist() == reference_occurs(tokens, pattern), pattern


def test_occurs_edge_cases():
    empty = encode([])  # (0, 1)
    assert occurs(empty, "1").shape == (0,) and occurs(empty, "").shape == (0,)
    assert occurs_all(empty, ["1", "0101"]).shape == (0, 2)
    assert occurs(torch.empty(0, 40, dtype=torch.long), "0" * 35).shape == (0,)
    short = encode(["", "0", "1"])  # length-1 rows (and an empty one): width 2
    assert occurs(short, "1").tolist() == [False, False, True]
    assert occurs(short, "0").tolist() == [False, True, False]
    assert occurs(short, "01").tolist() == [False, False, False]  # would straddle EOS
    assert occurs(short, "011").tolist() == [False] * 3  # longer than the width
    assert occurs(short, "").tolist() == [True] * 3  # the empty pattern occurs everywhere
    exact = encode(["1" * 40])[:, :40]  # no EOS, the pattern fills the whole width
    assert occurs(exact, "1" * 40).tolist() == [True] and occurs(exact, "1" * 41).tolist() == [False]
    with pytest.raises(ValueError, match="0/1"):
        occurs(short, "012")


@pytest.mark.parametrize("mask", ["1001111", "Mv1001111", "1111111"])
def test_features_match_slow_reference_across_row_chunks(mask, monkeypatch):
    monkeypatch.setattr(patterns, "CPU_CHUNK_ROWS", 16)
    rng = np.random.default_rng(3)
    strings = random_strings(rng, 150, MOTIF)
    phi = Features(mask, MOTIF)(encode(strings))
    expected = torch.tensor([slow_features(s, mask, MOTIF) for s in strings], dtype=torch.float32)
    assert torch.allclose(phi, expected, atol=1e-7)
    assert Features(mask, MOTIF)(encode([])).shape == (0, len(expected[0]))
